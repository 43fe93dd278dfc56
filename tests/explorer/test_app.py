"""The explorer's HTTP surface: pages, JSON, bad input, path traversal, server time."""

import json
import sqlite3

import pytest
from fastapi.testclient import TestClient

from saex.explorer.app import create_app


@pytest.fixture(scope="module")
def client(image_run):
    return TestClient(create_app(image_run))


def test_pages_render(client, image_run):
    db = sqlite3.connect(image_run / "index" / "topk-k8" / "index.sqlite")
    feature = db.execute("SELECT id FROM features WHERE density > 0 LIMIT 1").fetchone()[0]
    example = db.execute("SELECT example FROM examples WHERE thumb IS NOT NULL LIMIT 1").fetchone()[0]
    for path in ("/", f"/feature/{feature}", f"/example/{example}", "/game?seed=3"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert "saex" in r.text and "<script src=\"/static/app.js\">" in r.text
    assert client.get("/static/app.css").status_code == 200
    assert client.get("/plots/pareto.svg").status_code == 200


def test_unknown_feature_is_a_404_page(client):
    r = client.get("/feature/999999")
    assert r.status_code == 404 and "feature 999999 does not exist" in r.text and "<html" in r.text
    assert client.get("/api/feature/999999").json()["detail"].startswith("feature 999999")
    assert client.get("/example/123456789").status_code == 404
    assert client.get("/feature/abc").status_code == 422


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
    assert r.status_code == 400 and "dmin='abc' is not a valid float" in r.text


def test_game_modes(client):
    assert client.get("/game?mode=bogus").status_code == 422
    page = client.get("/game?mode=class&seed=1").text
    assert page.count('data-correct="yes"') == 1 and "Ankle boot" in page


def test_explore_refuses_a_busy_port(image_run):
    import socket

    from saex.explorer.serve import ExploreConfig, explore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ValueError, match=r"cannot listen on 127\.0\.0\.1:\d+ .*pass another --port"):
            explore(ExploreConfig(run=str(image_run), port=s.getsockname()[1]))
