"""Thousands of generated URLs against every route: no answer is a server error, every HTML 4xx is the
site's error page, and no answer shows the run's absolute path."""

import collections
import json
import logging
import random
import re
import sqlite3
from urllib.parse import quote

from fastapi.testclient import TestClient

from saex.explorer.app import create_app

N_URLS = 2400
NUMBERS = ["0", "1", "3", "-1", "-0", "07", "+5", " 2 ", "1_0", "0x10", "1.5", "-1.5", "1e3", "-2", "-8", "308",
           "309", "-309", "1e308", "1e400", "-1e400", "nan", "NaN", "-nan", "inf", "-inf", "Infinity",
           str(2**63 - 1), str(2**63), str(-2**63), str(-2**63 - 1), str(2**64), "9" * 30, "9" * 5000]
TEXTS = ["", " ", "abc", "true", "on", "é", "日本語", "\u202e", "🙂", "%00", "a%00b", "%ff", "%", "%zz", "..", "../",
         "..%2F..%2Findex.sqlite", "%2e%2e%2fetc%2fpasswd", "/etc/passwd", "a" * 256, "b" * 5000, "x/" * 300,
         "%0d%0aSet-Cookie:x", "<script>", "'\"", "a&b=c", "%3Cb%3E", "\\..\\", "0.png", "pareto.svg", "app.js"]
FILTERS = ["jump", "entropy", "hide_cluster", "dmin", "dmax", "label", "candidates", "max_log_density", "seed",
           "mode", "feature", "round", "choice", "v", "example", "edits", "neighbours", "by", "offset", "method"]
METHODS = ["integrated-gradients", "gradient-x-input", "occlusion"]
EDITS = []  # edit lists, filled by the test from real ids: mostly hostile, a few valid (each runs the model once)


def edit_lists(feature: str, example: str) -> list[str]:
    def zero(**fields) -> str:
        return json.dumps([{"op": "zero", "features": [int(feature)], **fields}])

    def copy(source) -> str:
        return json.dumps([{"op": "copy", "source": source}])

    valid = ["[]", zero(), json.dumps([{"op": "add", "features": [int(feature)], "value": 5}]), copy(example)]
    hostile = [zero(value=1e300), zero(positions=[]), zero(positions=[999]), zero(positions=[-5]), zero(positions="ab"),
               zero(positions=[2**70]), zero(colour=1), zero(value=True), zero(value="x"), zero(source=["x"]),
               zero(features=[256]), zero(features=[-1]), zero(features=[2**70]), zero(features=["a"]),
               zero(features={"a": 1}), zero(features=None), '[{"op": "add", "features": [1], "value": 1e400}]',
               '[{"op": "clamp", "features": [1], "value": NaN}]', '[{"op": "scale", "features": [1], "value": -Infinity}]',
               *(copy(s) for s in ("../../etc/passwd", "/dev/zero", "0.png", "٣", "-1", str(2**64), True, None)),
               json.dumps([{"op": "pair", "source": example}]), json.dumps([{"op": "pair", "source": example, "target": "-3"}]),
               json.dumps([{"op": "copy", "source": str(i)} for i in range(5)]), json.dumps(json.loads(zero()) * 65),
               '[{"op": "zap"}]', '{"op": "zero"}', "[1, 2]", "[null]", '"[]"', "[[", "[" * 3000, "]", "{}", "null"]
    return valid + hostile


def _value(rng, real):
    pool = rng.choice([NUMBERS, TEXTS, real, EDITS])
    return quote(pool[rng.randrange(len(pool))], safe="%/")


def _query(rng, real, names):
    params = [(rng.choice(names or FILTERS) if rng.random() < 0.85 else rng.choice(FILTERS + TEXTS[:8]), _value(rng, real))
              for _ in range(rng.randrange(5))]
    return ("?" + "&".join(f"{quote(k, safe='%')}={v}" for k, v in params)) if params else ""


def urls(seed, real):
    """`N_URLS` URLs over every route, with real ids and names mixed among hostile values."""
    rng = random.Random(seed)
    routes = [("/", []), ("/feature/{}", FILTERS[:6]), ("/features", FILTERS[:6]), ("/example/{}", []),
              ("/game", ["candidates", "max_log_density", "seed", "mode"]), ("/api/scatter", []),
              ("/api/feature/{}", []), ("/api/example/{}/patches", ["feature"]), ("/api/game/check", ["round", "choice"]),
              ("/thumbs/{}", ["v"]), ("/plots/{}", ["v"]), ("/static/{}", ["v"]), ("/{}", []), ("/api/{}", []),
              ("/edit/{}", ["edits"]), ("/api/edit", ["example", "edits", "neighbours"]), ("/api/edits", ["edits"]),
              ("/ablation", ["by", "offset"]), ("/attribution/{}/{}.png", ["method", "v"]),
              ("/api/attribution/{}/{}", ["method", "v"])]
    for _ in range(N_URLS):
        path, names = rng.choice(routes)
        yield path.format(*(_value(rng, real) for _ in range(path.count("{}")))) + _query(rng, real, names)


def bad(r, run) -> bool:
    """A server error, the run's path shown, or a 4xx that is not the error page (JSON {"detail"} under /api/)."""
    if r.status_code >= 500 or str(run) in r.text:
        return True
    if not 400 <= r.status_code < 500:
        return False
    if (r.request.url.path + "/").startswith("/api/"):  # the path asked for, once the client resolved any ../
        return "detail" not in r.json()
    return not (r.headers["content-type"].startswith("text/html") and '<p class="error">' in r.text)


def test_no_generated_url_is_a_server_error(image_run, caplog):
    db = sqlite3.connect(image_run / "index" / "topk-k8" / "index.sqlite")
    real = [str(i) for (i,) in db.execute("SELECT id FROM features WHERE density > 0 LIMIT 5")]
    real += [str(e) for (e,) in db.execute("SELECT example FROM examples WHERE thumb IS NOT NULL LIMIT 5")]
    real += [t for (t,) in db.execute("SELECT thumb FROM examples WHERE thumb IS NOT NULL LIMIT 5")]
    EDITS[:] = edit_lists(real[0], real[5])
    app = create_app(image_run)
    client = TestClient(app, raise_server_exceptions=False)
    rounds = re.findall(r'data-round="([^"]+)"', client.get("/game").text + client.get("/game?mode=class").text)
    statuses, failures = collections.Counter(), []
    with caplog.at_level(logging.INFO):
        for url in urls(20240611, real + rounds + ["app.css", "pareto.svg", "topk-k8"] + METHODS):
            r = client.get(url)
            statuses[r.status_code] += 1
            if bad(r, image_run):
                failures.append((url[:120], r.status_code, r.text[:200]))
    print(f"{sum(statuses.values())} URLs; statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) == N_URLS >= 2000
    assert not failures, f"{len(failures)} bad answers, first: {failures[:5]}; statuses {dict(statuses)}"
    assert not [rec for rec in caplog.records if rec.exc_info or str(image_run) in rec.getMessage()]
    assert statuses[200] > 100 and statuses[404] > 100 and statuses[400] > 100  # it reached pages, not just errors
    lab = app.state.experiments
    print(f"{len(lab.effects)} effects and {lab.attributions_computed} attributions computed")
    assert lab.attributions_computed <= 6  # hostile URLs are refused from the index: only real ids run the model
