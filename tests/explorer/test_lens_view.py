"""The lens and taxonomy in the index and the explorer: the session's image run (fmnist-vit, read through its
classifier) and text run (a tiny BERT, read through its input embeddings), against the model's own modules."""

import html
import re
import sqlite3

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from saex.analysis.taxonomy import CLASSES
from saex.cli import main
from saex.explorer.app import create_app
from saex.models import load_model
from saex.sae.io import load_sae


def _index(run):
    return sqlite3.connect(run / "index" / "topk-k8" / "index.sqlite")


def _live(db, n=3):
    return [j for (j,) in db.execute("SELECT id FROM features WHERE density > 0 ORDER BY id LIMIT ?", (n,))]


@pytest.fixture(scope="module")
def client(image_run):
    return TestClient(create_app(image_run))


def test_index_stores_the_classifier_lens_of_every_feature(image_run):
    db = _index(image_run)
    sae = load_sae(image_run / "saes" / "topk-k8")
    model = load_model("fmnist-vit").model
    names = [model.config.id2label[i] for i in range(10)]
    assert [n for (n,) in db.execute("SELECT name FROM lens_outputs ORDER BY output")] == names
    assert db.execute("SELECT COUNT(*) FROM lens_stats").fetchone()[0] == sae.d_sae
    assert db.execute("SELECT COUNT(*) FROM lens").fetchone()[0] == sae.d_sae * 2 * 10  # 5 promoted, 5 suppressed
    ln, head = model.vit.layernorm, model.classifier
    for j in _live(db):
        for vector, w in (("dec", sae.W_dec[j]), ("enc", sae.W_enc[:, j])):
            with torch.no_grad():  # the model's own final LayerNorm and classifier, biases subtracted
                ref = (head(ln(w[None])) - head(ln.bias))[0].double().numpy()
            stored = db.execute("SELECT l.rank, o.name, l.weight FROM lens l JOIN lens_outputs o USING (output) "
                                "WHERE feature = ? AND vector = ? ORDER BY rank DESC", (j, vector)).fetchall()
            order = np.argsort(-ref)
            assert [n for r, n, _ in stored if r >= 0][::-1] == [names[i] for i in order[:5]]
            assert [n for r, n, _ in stored if r < 0] == [names[i] for i in order[::-1][:5]]
            np.testing.assert_allclose(sorted(w for _, _, w in stored), np.sort(ref), rtol=1e-3, atol=1e-4)
            if vector == "dec":
                skew, kurt, cls = db.execute("SELECT skew, kurtosis, lens_class FROM lens_stats WHERE feature = ?",
                                             (j,)).fetchone()
                assert skew == pytest.approx(scipy.stats.skew(ref), rel=1e-3, abs=1e-4)
                assert kurt == pytest.approx(scipy.stats.kurtosis(ref), rel=1e-3, abs=1e-4)
                assert cls in CLASSES


def test_text_index_reads_nearest_input_tokens(text_run, tiny_model_dir):
    db = _index(text_run)
    sae = load_sae(text_run / "saes" / "topk-k8")
    adapter = load_model(str(tiny_model_dir["bert"]))
    E = F.normalize(adapter.model.get_input_embeddings().weight.detach(), dim=1)
    for j in _live(db, 2):
        cos = F.normalize(sae.W_dec[j].detach(), dim=0) @ E.T
        best = cos.topk(10).indices.tolist()
        stored = db.execute("SELECT output, weight FROM lens WHERE feature = ? AND vector = 'dec' AND rank >= 0 "
                            "ORDER BY rank", (j,)).fetchall()
        assert [o for o, _ in stored] == best
        assert stored[0][1] == pytest.approx(cos.max().item(), abs=1e-5)
        name = db.execute("SELECT name FROM lens_outputs WHERE output = ?", (best[0],)).fetchone()[0]
        assert name == adapter.processor.decode([best[0]])


def test_feature_page_shows_both_lenses_the_cosine_and_the_class(image_run, client):
    db = _index(image_run)
    j = _live(db, 1)[0]
    page = client.get(f"/feature/{j}").text
    section = page[page.index('<section id="lens">'):page.index("</section>", page.index('<section id="lens">'))]
    cls, skew = db.execute("SELECT lens_class, skew FROM lens_stats WHERE feature = ?", (j,)).fetchone()
    enc_dec = db.execute("SELECT enc_dec_cos FROM features WHERE id = ?", (j,)).fetchone()[0]
    assert f'id="lens-class">{cls}<' in section and f"{enc_dec:.3f}" in section and f"{skew:.2f}" in section
    for vector in ("dec", "enc"):
        fig = section[section.index(f'id="lens-{vector}"'):]
        fig = fig[:fig.index("</figure>")]
        top = db.execute("SELECT o.name FROM lens l JOIN lens_outputs o USING (output) WHERE feature = ? AND "
                         "vector = ? AND rank = 0", (j, vector)).fetchone()[0]
        low = db.execute("SELECT o.name FROM lens l JOIN lens_outputs o USING (output) WHERE feature = ? AND "
                         "vector = ? AND rank = -1", (j, vector)).fetchone()[0]
        shown = [html.unescape(s) for s in re.findall(r'<span title="[^"]*">([^<]*)</span>', fig)]
        assert shown[:2] == [top, low]  # rows of (promoted, suppressed), strongest first
        assert len(shown) == 10
    assert section.count("<rect") >= 2  # the histogram's bars
    api = client.get(f"/api/feature/{j}").json()["lens"]
    assert api["lens_class"] == cls and len(api["dec"]["top"]) == 5 and sum(api["hist"]) == 10


def test_filter_by_class_walks_only_that_class(image_run, client):
    db = _index(image_run)
    counts = dict(db.execute("SELECT lens_class, COUNT(*) FROM lens_stats JOIN features ON id = feature "
                             "WHERE density > 0 GROUP BY lens_class"))
    cls = max(counts, key=counts.get)
    members = [j for (j,) in db.execute("SELECT id FROM features JOIN lens_stats ON feature = id WHERE density > 0 "
                                        "AND lens_class = ? ORDER BY id", (cls,))]
    r = client.get(f"/features?lens_class={cls}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/feature/{members[0]}?lens_class={cls}"
    page = client.get(r.headers["location"]).text
    if len(members) > 1:
        assert f'href="/feature/{members[1]}?lens_class={cls}"' in page
    assert f'<option value="{cls}" selected>' in page
    bad = client.get("/features?lens_class=bogus")
    assert bad.status_code == 400 and "valid: prediction, suppression, partition, none" in bad.text


def test_overview_counts_classes_and_links_the_scatter(image_run, client):
    db = _index(image_run)
    page = client.get("/").text
    table = page[page.index('id="taxonomy-counts"'):page.index("</table>", page.index('id="taxonomy-counts"'))]
    for cls in CLASSES:
        n = db.execute("SELECT COUNT(*) FROM lens_stats WHERE lens_class = ?", (cls,)).fetchone()[0]
        assert f'<a href="/features?lens_class={cls}">{cls}</a></td>\n    <td>{n:,}</td>' in table
    svg = page[page.index('<svg id="taxonomy-scatter"'):page.index("</svg>", page.index('<svg id="taxonomy-scatter"'))]
    linked = [int(j) for j in re.findall(r'<a href="/feature/(\d+)"><circle', svg)]
    with_stats = db.execute("SELECT COUNT(*) FROM lens_stats WHERE skew IS NOT NULL").fetchone()[0]
    assert len(linked) == len(set(linked)) == min(with_stats, 4 * 400) and len(linked) > 0


def test_no_lens_and_toy_runs_show_no_lens(image_run, tmp_path, capsys):
    run = tmp_path / "toy"
    assert main(["toy", "--run", str(run), "--n-features", "16", "--d", "8", "--rows", "2048", "--l0", "3"]) == 0
    assert main(["train", "--run", str(run), "--architecture", "topk", "--k", "3", "--d-sae", "16", "--steps", "10",
                 "--batch-size", "256"]) == 0
    assert main(["index", "--run", str(run), "--top", "4", "--samples", "2"]) == 0
    assert "lens skipped: a toy store has no model" in capsys.readouterr().err
    db = sqlite3.connect(next((run / "index").glob("*/index.sqlite")))
    assert db.execute("SELECT COUNT(*) FROM lens_stats").fetchone()[0] == 0
    client = TestClient(create_app(run))
    j = next(j for j in range(16) if client.get(f"/api/feature/{j}").json()["density"] > 0)
    assert 'id="lens"' not in client.get(f"/feature/{j}").text and 'id="taxonomy"' not in client.get("/").text
    r = client.get("/features?lens_class=prediction")
    assert r.status_code == 400 and "no lens taxonomy" in r.text
