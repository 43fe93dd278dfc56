"""A seeded fuzz of damaged activation stores and saved configs: every damage is either harmless (the
store reads, and a later hash check may still refuse it) or a ValueError / FileNotFoundError naming
what is wrong; never another exception, and reading never writes."""

import collections
import json
import random
import shutil

import pytest
import torch

from saex import config as configs
from saex.cli import main
from saex.store import ActivationStore, StoreWriter
from saex.train import TrainConfig

N_CASES = 700  # + the train_config.json cases below
CLEAN = (ValueError, FileNotFoundError)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pristine") / "acts"
    w = StoreWriter(folder, {"model": "toy", "hooks": ["h"], "tokens": "all", "dataset": {"kind": "toy"}},
                    shard_rows=24)
    g = torch.Generator().manual_seed(0)
    for start in range(0, 72, 12):
        w.add({"acts.h": torch.randn(12, 8, generator=g).to(torch.bfloat16), "example": torch.arange(start, start + 12),
               "position": torch.zeros(12, dtype=torch.int64)}, [str(i) for i in range(start, start + 12)])
    w.finish()
    return folder


def _read_all(folder):
    store = ActivationStore(folder)
    for batch in store.iter_ordered(list(store.manifest["columns"]), 10):
        assert batch["acts.h"].shape[1:] == (8,) and len(batch["acts.h"]) == len(batch["example"])
    store.take("acts.h", list(range(len(store))))
    for i in range(len(store.shards)):
        store.example_ids(i)
    store.verify()
    return store


def _mutate_json(value, rng):
    """One random edit of a JSON value: a field deleted, retyped, renumbered, or a list entry changed."""
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        choice = rng.random()
        if choice < 0.2:
            del value[key]
        elif choice < 0.6:
            value[key] = rng.choice([None, -1, 0, 2**63, 1.5, "x", "../../etc/passwd", [], {}, True, float("nan")])
        else:
            value[key] = _mutate_json(value[key], rng)
        return value
    if isinstance(value, list) and value:
        i = rng.randrange(len(value))
        value[i] = _mutate_json(value[i], rng) if rng.random() < 0.7 else rng.choice([None, "x", 7, {}])
        return value
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, -value, 0, value * 1000])
    if isinstance(value, str):
        return rng.choice(["", value[:-1], value + "x", "float32", "BF16", "I64"])
    return rng.choice([None, 0, "x"])


def _damage(folder, rng) -> str:
    shards = sorted(folder.glob("shard_*.safetensors"))
    manifest = folder / "manifest.json"
    kind = rng.choice(["truncate", "flip", "header", "manifest-bytes", "manifest-field", "delete"])
    if kind == "truncate":
        p = rng.choice(shards + [manifest])
        data = p.read_bytes()
        p.write_bytes(data[:rng.randrange(len(data))])
    elif kind == "flip":
        p = rng.choice(shards)
        data = bytearray(p.read_bytes())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(data))
    elif kind == "header":  # a shard whose header parses but says other things
        p = rng.choice(shards)
        data = p.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = _mutate_json(json.loads(data[8:8 + n]), rng)
        text = json.dumps(header).encode()
        p.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    elif kind == "manifest-bytes":
        data = bytearray(manifest.read_bytes())
        data[rng.randrange(len(data))] = rng.randrange(256)
        manifest.write_bytes(bytes(data))
    elif kind == "manifest-field":
        manifest.write_text(json.dumps(_mutate_json(json.loads(manifest.read_text()), rng)))
    else:
        rng.choice(shards + [manifest]).unlink()
    return kind


def test_damaged_stores_fail_cleanly(pristine, tmp_path):
    rng = random.Random(0)
    outcomes = collections.Counter()
    for case in range(N_CASES):
        folder = tmp_path / f"case{case}"
        shutil.copytree(pristine, folder)
        kind = _damage(folder, rng)
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        try:
            _read_all(folder)
            outcomes[f"{kind}: read"] += 1
        except CLEAN as e:
            assert str(folder) in str(e), f"case {case} ({kind}): the message names no file: {e}"
            outcomes[f"{kind}: refused"] += 1
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "reading wrote to the store"
        shutil.rmtree(folder)
    print(dict(sorted(outcomes.items())))
    assert sum(outcomes.values()) == N_CASES
    assert sum(v for k, v in outcomes.items() if k.endswith("refused")) > N_CASES // 2


def test_damaged_train_configs_fail_cleanly(tmp_path):
    rng = random.Random(1)
    good = configs.to_json(TrainConfig(run="r"))
    refused = 0
    for case in range(300):
        path = tmp_path / f"c{case}.json"
        if rng.random() < 0.5:
            data = bytearray(good.encode())
            data[rng.randrange(len(data))] = rng.randrange(256)
            path.write_bytes(bytes(data[:rng.randrange(len(data) + 1)] if rng.random() < 0.3 else data))
        else:
            path.write_text(json.dumps(_mutate_json(json.loads(good), rng)))
        try:
            configs.load(TrainConfig, path)
        except ValueError as e:
            assert str(path) in str(e)
            refused += 1
    assert refused > 50


def test_train_on_damaged_stores_says_one_line(pristine, tmp_path, capsys):
    rng = random.Random(2)
    for case in range(12):
        run = tmp_path / f"run{case}"
        shutil.copytree(pristine, run / "acts")
        _damage(run / "acts", rng)
        rc = main(["train", "--run", str(run), "--d-sae", "16", "--k", "2", "--steps", "3", "--batch-size", "8"])
        err = capsys.readouterr().err
        assert rc in (0, 2) and "Traceback" not in err and "bug in saex" not in err, err
