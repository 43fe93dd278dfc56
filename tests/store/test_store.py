import json

import pytest
import torch

from saex.store import ActivationStore, StoreMismatch, StoreWriter


def _write(folder, n_batches=5, batch=7, d=4, shard_rows=10, header=None):
    w = StoreWriter(folder, header or {"model": "m"}, shard_rows=shard_rows)
    rows = []
    for b in range(n_batches):
        acts = torch.randn(batch, d).to(torch.bfloat16)
        ex = torch.arange(b * batch, (b + 1) * batch)
        w.add({"acts.h": acts, "example": ex}, [f"id{int(i)}" for i in ex])
        rows.append(acts)
    w.finish()
    return torch.cat(rows)


def test_roundtrip_ordered_and_random_access(tmp_path):
    expected = _write(tmp_path)
    store = ActivationStore(tmp_path)
    assert len(store) == 35 and store.hooks == ["h"] and store.d("h") == 4
    assert [s["rows"] for s in store.shards] == [14, 14, 7]  # shards close at batch boundaries
    store.verify()
    got = torch.cat([b["acts.h"] for b in store.iter_ordered(["acts.h"], batch_size=8)])
    assert torch.equal(got, expected)
    idx = [34, 0, 15, 15, 7]
    assert torch.equal(store.take("acts.h", idx), expected[idx])
    assert store.example_ids(1) == [f"id{i}" for i in range(14, 28)]
    with pytest.raises(IndexError, match=r"row indices must lie in \[0, 35\)"):
        store.take("acts.h", [35])


def test_shard_files_are_memory_mapped_bfloat16(tmp_path):
    _write(tmp_path)
    t = ActivationStore(tmp_path).shard(0, "acts.h")
    assert t.dtype == torch.bfloat16 and t.shape == (14, 4)


@pytest.mark.parametrize("window_rows", [1, 14, 20, 1000])
def test_shuffled_stream_visits_every_row_once_per_epoch(tmp_path, window_rows):
    _write(tmp_path, header={"model": "m"})
    store = ActivationStore(tmp_path)
    ex = [b for _, b in zip(range(5), store.iter_shuffled("example", batch_size=7, window_rows=window_rows))]
    seen = torch.cat(ex)
    assert sorted(seen.tolist()) == list(range(35))  # 5 batches of 7 = one epoch, no row twice
    assert seen.tolist() != list(range(35))
    again = [b for _, b in zip(range(9), store.iter_shuffled("example", batch_size=7, window_rows=window_rows))]
    resumed = [b for _, b in zip(range(6), store.iter_shuffled("example", 7, window_rows=window_rows, skip_batches=3))]
    assert all(torch.equal(a, b) for a, b in zip(again[3:], resumed))


def test_shuffled_stream_carries_leftover_rows(tmp_path):
    _write(tmp_path)
    store = ActivationStore(tmp_path)
    epoch = torch.cat([b for _, b in zip(range(7), store.iter_shuffled("example", batch_size=5, window_rows=14))])
    assert sorted(epoch.tolist()) == list(range(35))


def test_resume_drops_orphans_and_keeps_listed_shards(tmp_path):
    w = StoreWriter(tmp_path, {"model": "m"}, shard_rows=4)
    w.add({"acts.h": torch.ones(4, 2)}, ["a"] * 4)
    (tmp_path / "shard_000001.safetensors").write_bytes(b"half-written")
    (tmp_path / ".shard_000002.safetensors.x.tmp").write_bytes(b"")
    w2 = StoreWriter(tmp_path, {"model": "m"}, shard_rows=4)
    assert w2.examples_done == 4 and not (tmp_path / "shard_000001.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_other_activations_in_the_folder_are_refused(tmp_path):
    StoreWriter(tmp_path, {"model": "a", "tokens": "cls"}).finish()
    with pytest.raises(StoreMismatch, match=r"model: store has 'a', asked for 'b'.*--overwrite"):
        StoreWriter(tmp_path, {"model": "b", "tokens": "cls"})
    assert StoreWriter(tmp_path, {"model": "b"}, overwrite=True).examples_done == 0


def test_corrupt_shard_is_detected(tmp_path):
    _write(tmp_path)
    path = tmp_path / "shard_000000.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the sha256"):
        ActivationStore(tmp_path).verify()


def test_manifest_records_rows_and_shards(tmp_path):
    _write(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["rows"] == 35 and m["examples"] == 35 and m["complete"]
    assert m["columns"]["acts.h"] == {"dtype": "bfloat16", "shape": [4]}
    assert all(len(s["sha256"]) == 64 for s in m["shards"])


def test_shuffled_batches_are_the_permuted_window_rows(tmp_path):
    """Batches gathered from the shards equal the rows of the concatenated window, permuted by the same
    draws (what the stream was before it stopped concatenating windows), carry and resume included."""
    import numpy as np

    _write(tmp_path, n_batches=6, batch=7, shard_rows=6)  # shards of 7 rows
    store = ActivationStore(tmp_path)
    rows = torch.cat([store.shard(i, "example") for i in range(len(store.shards))])
    for batch_size, window_rows in ((3, 15), (5, 100)):
        stream = store.iter_shuffled("example", batch_size, seed=3, window_rows=window_rows)
        rng = np.random.default_rng([3, 0])
        order = rng.permutation(len(store.shards))
        expected, carry, start = [], rows[:0], 0
        while start < len(order):  # the first epoch, window by window, as the docstring has it
            stop, n = start, 0
            while stop < len(order) and (n == 0 or n + store.shards[order[stop]]["rows"] <= window_rows):
                n += store.shards[order[stop]]["rows"]
                stop += 1
            window = torch.cat([carry] + [store.shard(int(i), "example") for i in order[start:stop]])
            window = window[torch.from_numpy(rng.permutation(len(window)))]
            full = len(window) // batch_size * batch_size
            expected += list(window[:full].split(batch_size))
            carry, start = window[full:], stop
        assert all(torch.equal(next(stream), e) for e in expected)
