"""Server time of explorer pages on a 65,536-feature index (synthetic contents, real schema and app).

    .venv/bin/python benchmarks/explorer_latency.py [--features 65536] [--requests 200]

Prints JSON: median and p95 milliseconds per page, measured inside the app (Server-Timing header)."""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from saex.explorer.app import create_app
from saex.explorer.schema import SCHEMA


def build(folder: Path, n_features: int, n_examples: int = 50_000, top: int = 32, samples: int = 16) -> None:
    rng = random.Random(0)
    index = folder / "index" / "big"
    (index / "thumbs").mkdir(parents=True)
    db = sqlite3.connect(index / "index.sqlite")
    db.executescript(SCHEMA)
    labels = [f"class {i}" for i in range(1000)]
    meta = {"sae": "big", "hook": "blocks.22.hook_resid_post", "model": "synthetic", "modality": "image",
            "tokens": "cls", "label_names": labels, "d_sae": n_features, "rows": n_examples, "examples": n_examples,
            "top": top, "metrics": None, "patch_grid": None, "neuron_layer": 22, "neuron_random_range": [0.08, 0.14],
            "dense_cluster": {"threshold": -1.0, "mean_cos_in": 0.9, "mean_cos_out": 0.01, "size": 100}}
    db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
    db.executemany("INSERT INTO features VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", (
        (j, 10 ** rng.uniform(-6, -1), rng.random(), 2 * rng.random(), rng.random(), 3 * rng.random(),
         rng.randrange(1000), rng.random(), rng.random() * 0.3, rng.randrange(4096), rng.randrange(5),
         int(rng.random() < 0.3)) for j in range(n_features)))
    db.executemany("INSERT INTO examples VALUES (?,?,?,?,?,?,?)",
                   ((e, f"img/{e}.jpg", rng.randrange(1000), None, f"{e}.jpg", e, 1) for e in range(n_examples)))
    db.executemany("INSERT INTO feature_examples VALUES (?,?,?,?,?,?)", (
        (j, kind, r, rng.randrange(n_examples), rng.random(), None)
        for j in range(n_features) for kind, k in (("top", top), ("sample", samples)) for r in range(k)))
    db.executemany("INSERT INTO feature_labels VALUES (?,?,?)",
                   ((j, lab, 0.25) for j in range(n_features) for lab in rng.sample(range(1000), 4)))
    db.executemany("INSERT INTO example_features VALUES (?,?,?,?)",
                   ((e, r, rng.randrange(n_features), rng.random()) for e in range(n_examples) for r in range(16)))
    db.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=65536)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build(Path(tmp), args.features)
        built = time.perf_counter() - t0
        client = TestClient(create_app(tmp))
        rng = random.Random(1)
        result = {"features": args.features, "build_seconds": round(built, 1)}
        for name, path in (("feature", lambda: f"/feature/{rng.randrange(args.features)}"),
                           ("feature_filtered", lambda: f"/feature/{rng.randrange(args.features)}?entropy=true&hide_cluster=true&dmin=-4"),
                           ("example", lambda: f"/example/{rng.randrange(50_000)}"),
                           ("game", lambda: "/game"), ("scatter_json", lambda: "/api/scatter")):
            times = []
            for _ in range(args.requests if name != "scatter_json" else 10):
                r = client.get(path())
                assert r.status_code == 200, (path, r.status_code)
                times.append(float(r.headers["server-timing"].split("dur=")[1]))
            times.sort()
            result[name] = {"median_ms": round(statistics.median(times), 2),
                            "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2)}
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
