import json
import shutil
import socket
import sqlite3
import threading
import time
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from saex.analysis.experiment import Experiment
from saex.explorer.app import create_app


def serve(app):
    """Run the app on a free loopback port in a thread; returns (base url, server)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the explorer did not start"
    return f"http://127.0.0.1:{port}", server


@pytest.fixture(scope="module")
def app(image_run):
    return create_app(image_run)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


@pytest.fixture(scope="module")
def experiment(image_run):
    """The independent path: the run's Experiment, made by the test, not by the app."""
    return Experiment(image_run, "topk-k8")


@pytest.fixture(scope="module")
def ids(image_run):
    """Two indexed examples with thumbnails, the first one's strongest feature, and an id the index lacks."""
    db = sqlite3.connect(image_run / "index" / "topk-k8" / "index.sqlite")
    ex, other = [e for (e,) in db.execute("SELECT example FROM examples WHERE thumb IS NOT NULL ORDER BY example "
                                          "LIMIT 2")]
    top = db.execute("SELECT feature FROM example_features WHERE example = ? ORDER BY rank LIMIT 1", (ex,)).fetchone()[0]
    indexed = {e for (e,) in db.execute("SELECT example FROM examples")}
    missing = next(i for i in range(10**6) if i not in indexed)
    return {"ex": ex, "other": other, "top": top, "missing": missing}


def url(ex, items, **extra) -> str:
    query = "".join(f"&{k}={v}" for k, v in extra.items())
    return f"/api/edit?example={ex}&edits={quote(json.dumps(items))}{query}"


ABLATION = """
DROP TABLE IF EXISTS ablation; DROP TABLE IF EXISTS ablation_outputs;
CREATE TABLE ablation (feature INTEGER PRIMARY KEY, examples INTEGER, kl REAL, loss_delta REAL, loses TEXT,
                       loses_delta REAL, gains TEXT, gains_delta REAL);
CREATE TABLE ablation_outputs (feature INTEGER, name TEXT, delta REAL);
"""


def copy_run(image_run, folder, ablation: bool):
    """A run folder that shares the fixture's activations, SAEs and eval, with its own copy of the index."""
    folder.mkdir()
    for name in ("acts", "saes", "eval"):
        (folder / name).symlink_to(image_run / name, target_is_directory=True)
    shutil.copytree(image_run / "index", folder / "index")
    db = sqlite3.connect(folder / "index" / "topk-k8" / "index.sqlite")
    if ablation:
        db.executescript(ABLATION)
    else:
        db.executescript("DROP TABLE IF EXISTS ablation; DROP TABLE IF EXISTS ablation_outputs;")
    db.commit()
    return folder, db
