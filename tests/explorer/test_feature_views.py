"""The feature page's experiment views: the ablation chart and ranking with and without the index's
ablation tables (made here in a copy of the index, as the index's contract has them), and attributions
against the attribution API called directly, with their cache."""

import html
import io
import json
import math
import os
import re
import sqlite3
import time

import pytest
from fastapi.testclient import TestClient

from saex.analysis.experiment import Experiment
from saex.explorer.app import create_app
from tests.explorer.conftest import copy_run, url


@pytest.fixture(scope="module")
def ablated(image_run, tmp_path_factory):
    """Three ablated features (the first with every class's change), as the index's ablation pass writes them."""
    run, db = copy_run(image_run, tmp_path_factory.mktemp("ablated") / "run", ablation=True)
    f1, f2, f3 = [j for (j,) in db.execute("SELECT id FROM features WHERE density > 0 ORDER BY id LIMIT 3")]
    db.executemany("INSERT INTO ablation VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   [(f1, 16, 0.25, 0.125, "Sneaker", -0.3, "Sandal", 0.2), (f2, 16, 0.5, 0.75, "Bag", -0.5, "Coat", 0.1),
                    (f3, 16, 0.125, None, None, None, None, None)])
    names = json.loads(db.execute("SELECT value FROM meta WHERE key = 'label_names'").fetchone()[0])
    deltas = [0.2, -0.3, 0.05, 0.0, -0.1, 0.15, 0.0, 0.01, -0.01, 0.0]
    db.executemany("INSERT INTO ablation_outputs VALUES (?, ?, ?)", [(f1, n, d) for n, d in zip(names, deltas)])
    db.execute("INSERT OR REPLACE INTO meta VALUES ('ablation', ?)",
               (json.dumps({"readout": "classifier", "examples_per_feature": 16, "seconds": 1.0}),))
    db.commit()
    return run, (f1, f2, f3), dict(zip(names, deltas))


def test_the_ablation_chart_shows_the_tables(ablated):
    run, (f1, f2, _), deltas = ablated
    client = TestClient(create_app(run))
    page = client.get(f"/feature/{f1}").text
    section = html.unescape(page.split('<section id="ablation">')[1].split("</section>")[0])
    assert 'id="ablation-kl">0.25<' in section and 'id="ablation-loss">+0.125<' in section
    assert 'id="ablation-loses">Sneaker<' in section and "(-0.3)" in section and "Sandal</b> (+0.2)" in section
    rows = re.findall(r'data-delta="([^"]+)"><span>([^<]+)</span>\s*<i class="neg"><b style="width: ([\d.]+)%"></b></i>'
                      r'<i class="pos"><b style="width: ([\d.]+)%"></b></i>', section)
    assert [name for _, name, _, _ in rows] == sorted(deltas, key=lambda n: (-deltas[n], n))  # largest first
    for delta, name, neg, pos in rows:  # width: |delta| / the largest |delta| (0.3), on its side of zero
        assert float(delta) == deltas[name]
        assert (float(neg), float(pos)) == pytest.approx((100 * max(-deltas[name], 0) / 0.3, 100 * max(deltas[name], 0) / 0.3),
                                                         abs=0.06)
    assert '<a href="/ablation">ablation</a>' in page  # in the navigation
    assert '<section id="ablation">' in client.get(f"/feature/{f2}").text  # outputs-less: the numbers alone
    assert "no ablation" not in page


def test_the_ablation_ranking(ablated):
    run, (f1, f2, f3), _ = ablated
    client = TestClient(create_app(run))

    def ranked(query):
        return [int(j) for j in re.findall(r'<td><a href="/feature/(\d+)">', client.get(f"/ablation{query}").text)]

    assert ranked("") == [f2, f1, f3]  # loss change 0.75, 0.125, none last
    assert ranked("?by=kl") == [f2, f1, f3]  # 0.5, 0.25, 0.125
    assert ranked("?offset=1") == [f1, f3]
    assert ranked("?offset=5") == []
    page = client.get("/ablation").text
    assert "+0.75" in page and "3 features" in page and "16 top examples" in page


def test_without_ablation_tables_the_pages_still_render(image_run, tmp_path):
    run, _ = copy_run(image_run, tmp_path / "run", ablation=False)
    client = TestClient(create_app(run))
    j = int(client.get("/features", follow_redirects=False).headers["location"].split("/")[2])
    page = client.get(f"/feature/{j}")
    assert page.status_code == 200 and '<section id="ablation">' not in page.text and 'id="steer"' in page.text
    assert 'href="/ablation"' not in page.text
    r = client.get("/ablation")
    assert r.status_code == 404 and "no ablation effects" in r.text and '<p class="error">' in r.text


def test_non_finite_numbers_become_null():
    from saex.explorer.experiments import finite

    assert finite({"a": [1.0, math.inf, {"b": math.nan}], "c": "x", "d": 2}) == {"a": [1.0, None, {"b": None}], "c": "x",
                                                                                  "d": 2}


# Attributions, on a copy of the index: its cache starts empty.

@pytest.fixture(scope="module")
def attr_run(image_run, tmp_path_factory):
    return copy_run(image_run, tmp_path_factory.mktemp("attr") / "run", ablation=False)[0]


def direct_overlay(experiment, ex, feature, method="integrated-gradients") -> bytes:
    """The overlay as the attribution API makes it, called here, on one thread as the app computes it."""
    import torch

    from saex.analysis.attribution import gradient_x_input, integrated_gradients, model_image, occlusion, overlay_png

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inp, _ = experiment.input_of(str(ex))
        batch = experiment.adapter.prepare([inp], experiment.context)
        args = (experiment.adapter, experiment.sae, experiment.point, experiment.tokens, feature, batch)
        result = {"integrated-gradients": lambda: integrated_gradients(*args, positions=None, steps=64),
                  "gradient-x-input": lambda: gradient_x_input(*args), "occlusion": lambda: occlusion(*args)}[method]()
        return overlay_png(model_image(experiment.adapter, batch), result.values, colorbar=False)
    finally:
        torch.set_num_threads(threads)


def pixels(png: bytes):
    import numpy as np
    from PIL import Image

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as im:
        im.verify()
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGBA"))


def test_an_attribution_overlay_is_integrated_gradients_and_is_cached(attr_run, experiment, ids, monkeypatch):
    app = create_app(attr_run)
    client, lab = TestClient(app), app.state.experiments
    ex, j = ids["ex"], ids["top"]
    assert client.get(url(ex, [])).status_code == 200  # loads the model: the times below are the overlay's
    link = f"/attribution/{ex}/{j}.png?method=integrated-gradients&v={lab.version()}"
    start = time.perf_counter()
    r = client.get(link)
    first = time.perf_counter() - start
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:300]
    expected = direct_overlay(experiment, ex, j)
    assert r.content == expected or (pixels(r.content) == pixels(expected)).all()
    cache = attr_run / "index" / "topk-k8" / "attributions" / f"{ex}-{j}-integrated-gradients.png"
    assert cache.read_bytes() == r.content and lab.attributions_computed == 1
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"  # this build's URL

    def no_model():
        raise AssertionError("a cached attribution ran the model")

    monkeypatch.setattr(lab, "_experiment", no_model)
    start = time.perf_counter()
    again = client.get(link)
    cached = time.perf_counter() - start
    print(f"attribution overlay: first {1000 * first:.0f} ms, cached {1000 * cached:.1f} ms")
    assert again.status_code == 200 and again.content == r.content and lab.attributions_computed == 1
    assert client.get(f"/attribution/{ex}/{j}.png").headers["cache-control"] == "no-cache"  # unversioned: revalidate
    etag = again.headers["etag"]
    assert client.get(link, headers={"If-None-Match": etag}).status_code == 304
    assert cached < first
    monkeypatch.undo()
    # a rebuilt index: the file is older than it, so it is computed again, under a new version
    old = lab.version()
    built, written = time.time_ns() - 10**9, time.time_ns() - 2 * 10**9  # the index built after the file
    os.utime(cache, ns=(written, written))
    os.utime(attr_run / "index" / "topk-k8" / "index.sqlite", ns=(built, built))
    assert lab.version() != old and lab.cached(cache) is None
    stale = client.get(link)
    assert stale.headers["cache-control"] == "no-cache" and lab.attributions_computed == 2
    assert lab.cached(cache) is not None and stale.headers["etag"] != etag


def test_each_attribution_method_has_its_overlay(attr_run, experiment, ids):
    client = TestClient(create_app(attr_run))
    ex, j = ids["other"], ids["top"]
    got = {}
    for method in ("gradient-x-input", "occlusion"):
        r = client.get(f"/attribution/{ex}/{j}.png?method={method}")
        assert r.status_code == 200, r.text[:300]
        expected = direct_overlay(experiment, ex, j, method)
        assert r.content == expected or (pixels(r.content) == pixels(expected)).all(), method
        got[method] = r.content
    assert got["gradient-x-input"] != got["occlusion"]


def test_a_text_run_attributes_its_tokens(text_run):
    from saex.analysis.attribution import integrated_gradients

    db = sqlite3.connect(text_run / "index" / "topk-k8" / "index.sqlite")
    ex, j = db.execute("SELECT example, feature FROM example_features ORDER BY example, rank LIMIT 1").fetchone()
    (text_run / "index" / "topk-k8" / "attributions" / f"{ex}-{j}-integrated-gradients.json").unlink(missing_ok=True)
    client = TestClient(create_app(text_run))
    r = client.get(f"/attribution/{ex}/{j}.png")
    assert r.status_code == 404 and f"/api/attribution/{ex}/{j} gives each token" in r.text
    r = client.get(f"/api/attribution/{ex}/{j}")
    assert r.status_code == 200, r.text[:300]
    got = r.json()
    exp = Experiment(text_run, "topk-k8")
    inp, _ = exp.input_of(str(ex))
    batch = exp.adapter.prepare([inp], exp.context)
    result = integrated_gradients(exp.adapter, exp.sae, exp.point, exp.tokens, j, batch, positions=None, steps=64)
    assert [t for t, _ in got["tokens"]] == [t for t, _ in result.token_values()]
    assert len(got["text"]) == len(got["tokens"]) and "".join(got["text"]).strip()  # the pieces as they read
    assert [v for _, v in got["tokens"]] == pytest.approx([v for _, v in result.token_values()], rel=1e-4, abs=1e-6)
    assert got["value"] == pytest.approx(result.value, rel=1e-5) and got["value"] > 0  # the example's own feature
    assert client.get(f"/api/attribution/{ex}/{j}?method=zap").status_code == 400
    page = client.get(f"/feature/{j}").text
    assert 'id="attribution"' in page and '<li data-example="' in page
