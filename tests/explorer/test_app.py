"""The explorer's HTTP surface: pages, JSON, bad input, path traversal, caching, server time, the game."""

import html
import json
import logging
import math
import random
import re
import sqlite3

import pytest
from fastapi.testclient import TestClient

from saex.explorer.app import IMAGE_SUFFIXES, Assets, create_app, find_index
from saex.explorer.db import IndexDB

BIG = 2**63  # one past SQLite's largest integer


@pytest.fixture(scope="module")
def client(image_run):
    return TestClient(create_app(image_run))


@pytest.fixture(scope="module")
def lenient(image_run):
    """A client that answers a server error with a 500 instead of raising it, as a browser would see it."""
    return TestClient(create_app(image_run), raise_server_exceptions=False)


def is_error_page(r, status):
    return r.status_code == status and "<html" in r.text and '<p class="error">' in r.text


def test_pages_render(client, image_run):
    db = sqlite3.connect(image_run / "index" / "topk-k8" / "index.sqlite")
    feature = db.execute("SELECT id FROM features WHERE density > 0 LIMIT 1").fetchone()[0]
    example = db.execute("SELECT example FROM examples WHERE thumb IS NOT NULL LIMIT 1").fetchone()[0]
    for path in ("/", f"/feature/{feature}", f"/example/{example}", "/game?seed=3"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert "saex" in r.text and re.search(r"<script src=\"/static/app.js\?v=\w+\"></script>", r.text)
    assert client.get("/static/app.css").status_code == 200
    assert client.get("/plots/pareto.svg").status_code == 200


def test_unknown_feature_is_a_404_page(client):
    r = client.get("/feature/999999")
    assert r.status_code == 404 and "feature 999999 does not exist" in r.text and "<html" in r.text
    assert client.get("/api/feature/999999").json()["detail"].startswith("feature 999999")
    assert client.get("/example/123456789").status_code == 404
    assert is_error_page(client.get("/feature/abc"), 404)  # not FastAPI's JSON 422
    assert is_error_page(client.get("/nowhere"), 404)
    assert client.get("/api/feature/abc").status_code == 404 and "detail" in client.get("/api/feature/abc").json()


@pytest.mark.parametrize("path", [f"/feature/{BIG}", f"/api/feature/{BIG}", f"/example/{BIG}", f"/example/{2**70}",
                                  f"/api/example/{BIG}/patches?feature=0", "/api/example/0/patches?feature=-1",
                                  f"/api/example/0/patches?feature={BIG}", f"/features?jump={BIG}", "/feature/-1",
                                  f"/feature/-{BIG}", "/features?jump=-3"])
def test_ids_past_sqlite_range_or_negative_are_404(lenient, path):
    r = lenient.get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert path.startswith("/api/") or is_error_page(r, 404)


def test_a_label_past_sqlite_range_is_400_naming_the_valid_labels(lenient):
    r = lenient.get(f"/features?label={BIG}")
    assert is_error_page(r, 400) and f"label='{BIG}' is out of range; valid: 0 to 9" in html.unescape(r.text)


@pytest.mark.parametrize("query", ["dmin=309", "dmax=1e400", "dmin=-1e400", "dmax=nan", "dmin=inf", "dmax=-Infinity"])
def test_huge_or_non_finite_log_densities_are_400(lenient, query):
    for path in ("/features", "/feature/1"):
        r = lenient.get(f"{path}?{query}")
        name, value = query.split("=")
        assert is_error_page(r, 400), (path, query, r.status_code)
        assert f"{name}={value!r} is out of range; valid: -308 to 308" in html.unescape(r.text)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "400", "1e400"])
def test_game_density_limit_must_be_finite_and_in_range(lenient, value):
    r = lenient.get(f"/game?max_log_density={value}")
    assert is_error_page(r, 400) and "max_log_density" in r.text and "-308 to 308" in r.text


def test_game_round_binds_the_density_limit(image_run):
    """A value is bound, never formatted into the SQL: nan used to read as a column name."""
    db = IndexDB(find_index(image_run))
    assert db.game_round(random.Random(0), 4, math.nan)["features"] == []  # nothing is <= NULL
    r = db.game_round(random.Random(0), 4, -1.0)
    assert all(f["density"] <= 0.1 for f in r["features"])


@pytest.mark.parametrize("name", ["a%00.png", "%00", "..%00.png", "a" * 256 + ".png", "b" * 5000, "x/" * 3000 + "y.png"])
@pytest.mark.parametrize("folder", ["thumbs", "plots", "static"])
def test_null_bytes_and_long_names_are_404_without_a_trace(lenient, image_run, caplog, folder, name):
    with caplog.at_level(logging.DEBUG):
        r = lenient.get(f"/{folder}/{name}")
    assert is_error_page(r, 404), r.status_code
    assert str(image_run) not in r.text and "Traceback" not in r.text
    assert not [rec for rec in caplog.records if str(image_run) in rec.getMessage() or rec.exc_info]


@pytest.mark.parametrize("path", ["/thumbs/..%2F..%2F..%2Fsaes%2Ftopk-k8%2Fcfg.json", "/thumbs/%2Fetc%2Fpasswd",
                                  "/thumbs/../index.sqlite", "/plots/..%2F..%2Facts%2Fmanifest.json",
                                  "/static/..%2F..%2Fapp.py", "/thumbs/nope.png"])
def test_path_traversal_is_refused(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert "format" not in r.text and "root:" not in r.text


def test_filters_and_navigation(client, image_run):
    db = sqlite3.connect(image_run / "index" / "topk-k8" / "index.sqlite")
    live = [i for (i,) in db.execute("SELECT id FROM features WHERE density > 0 ORDER BY id")]
    r = client.get("/features", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith(f"/feature/{live[0]}")
    page = client.get(f"/feature/{live[0]}").text
    assert f'href="/feature/{live[1]}"' in page  # next skips dead features
    assert client.get("/features?jump=7", follow_redirects=False).headers["location"] == "/feature/7"
    entropic = [i for (i,) in db.execute("SELECT id FROM features WHERE density > 0 AND label_entropy > 0 ORDER BY id")]
    r = client.get("/features?entropy=true", follow_redirects=False)
    assert r.headers["location"].startswith(f"/feature/{entropic[0]}")
    label = db.execute("SELECT top_label FROM features WHERE density > 0 LIMIT 1").fetchone()[0]
    r = client.get(f"/features?label={label}", follow_redirects=False)
    assert db.execute("SELECT top_label FROM features WHERE id = ?",
                      (int(r.headers["location"].split("/")[2].split("?")[0]),)).fetchone()[0] == label


def test_scatter_and_heatmap_json(client, image_run):
    scatter = client.get("/api/scatter").json()
    assert len(scatter["id"]) == len(scatter["density"]) > 0
    db = sqlite3.connect(image_run / "index" / "topk-k8" / "index.sqlite")
    ex, feature = db.execute("SELECT example, feature FROM example_features WHERE rank = 0 LIMIT 1").fetchone()
    heat = client.get(f"/api/example/{ex}/patches?feature={feature}").json()
    assert heat["side"] == 4 and len(heat["values"]) == 16 and max(heat["values"]) == pytest.approx(heat["max"])
    value = db.execute("SELECT value FROM example_features WHERE example = ? AND rank = 0", (ex,)).fetchone()[0]
    assert heat["max"] == pytest.approx(value, rel=1e-4)  # the example's strongest patch is its max
    assert json.loads(json.dumps(heat))


def test_server_timing_header(client):
    r = client.get("/feature/1")
    assert r.headers["server-timing"].startswith("app;dur=")


def test_empty_form_fields_mean_no_filter_and_bad_numbers_are_400(client):
    r = client.get("/features?jump=&entropy=&hide_cluster=true&dmin=&dmax=&label=", follow_redirects=False)
    assert r.status_code == 303 and "hide_cluster=true" in r.headers["location"]
    r = client.get("/features?dmin=abc")
    assert is_error_page(r, 400) and "dmin='abc' is not a valid float" in html.unescape(r.text)
    assert is_error_page(client.get("/features?label=x"), 400)
    assert is_error_page(client.get("/game?candidates=99"), 400)
    r = client.get("/features?jump=5&x=a%26b", follow_redirects=False)
    assert r.headers["location"] == "/feature/5?x=a%26b"  # the other parameters pass on encoded


def test_assets_are_cached_by_version(client, image_run):
    page = client.get("/").text
    urls = re.findall(r'(?:src|href)="(/(?:static|plots)/[^"]+)"', page)
    assert {u.split("?")[0] for u in urls} == {"/static/app.css", "/static/app.js", "/plots/pareto.svg"}
    db = sqlite3.connect(image_run / "index" / "topk-k8" / "index.sqlite")
    example = db.execute("SELECT example FROM examples WHERE thumb IS NOT NULL LIMIT 1").fetchone()[0]
    urls += re.findall(r'src="(/thumbs/[^"]+)"', client.get(f"/example/{example}").text)
    for url in urls:  # a page links each file with its version: the browser may keep it for good
        assert "?v=" in url, url
        r = client.get(url)
        assert r.status_code == 200 and r.headers["cache-control"] == "public, max-age=31536000, immutable", url
        unversioned = client.get(url.split("?")[0])  # anyone else's link: keep, but ask whether it changed
        assert unversioned.headers["cache-control"] == "no-cache" and unversioned.headers["etag"]
        again = client.get(url.split("?")[0], headers={"if-none-match": unversioned.headers["etag"]})
        assert again.status_code == 304
    assert client.get("/static/app.js?v=stale").headers["cache-control"] == "no-cache"


def _round(client, query):
    page = client.get(f"/game?{query}").text
    token = re.search(r'id="options" data-round="([^"]+)"', page).group(1)
    return page, token, [int(c) for c in re.findall(r'data-choice="(-?\d+)"', page)]


def test_game_modes(client):
    assert is_error_page(client.get("/game?mode=bogus"), 400)
    page, _, choices = _round(client, "mode=class&seed=1")
    assert len(choices) == 10 and "Ankle boot" in page


@pytest.mark.parametrize("mode", ["input", "class"])
def test_the_game_answer_is_told_only_after_the_guess(client, image_run, mode):
    db = IndexDB(find_index(image_run))
    r = db.game_round(random.Random(7), 4, None)
    answer = r["answer"] if mode == "input" else db.example(r["answer"])["label"]
    page, token, choices = _round(client, f"seed=7&mode={mode}")
    buttons = re.findall(r"<button[^>]*>", page)  # a choice and nothing else: the token is random, not the answer
    assert len(buttons) == len(choices) and all(re.fullmatch(r'<button class="option" data-choice="\d+">', b)
                                                for b in buttons)
    assert "correct" not in page.lower() and answer in choices
    wrong = next(c for c in choices if c != answer)
    assert client.get(f"/api/game/check?round={token}&choice={wrong}").json() == {"correct": False, "answer": answer}
    assert client.get(f"/api/game/check?round={token}&choice={answer}").status_code == 404  # one guess a round
    _, token, _ = _round(client, f"seed=7&mode={mode}")
    assert client.get(f"/api/game/check?round={token}&choice={answer}").json() == {"correct": True, "answer": answer}
    assert client.get("/api/game/check?round=nope&choice=1").status_code == 404
    assert client.get(f"/api/game/check?round={token}&choice={BIG}").status_code == 404


def test_explore_refuses_a_busy_port(image_run):
    import socket

    from saex.explorer.serve import ExploreConfig, explore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ValueError, match=r"cannot listen on 127\.0\.0\.1:\d+ .*pass another --port"):
            explore(ExploreConfig(run=str(image_run), port=s.getsockname()[1]))



def test_a_missing_folder_of_assets_is_404_not_a_crash(tmp_path):
    """A run without thumbnails (text) or plots (no eval yet) has no such folder."""
    from starlette.applications import Starlette

    app = Starlette()
    app.mount("/thumbs", Assets(tmp_path / "thumbs", "/thumbs", IMAGE_SUFFIXES))
    assert TestClient(app, raise_server_exceptions=False).get("/thumbs/0.png").status_code == 404
