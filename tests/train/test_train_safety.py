"""saex train against what a received or damaged run folder can hold: crafted checkpoints, altered or
non-finite shards, a diverging run, a kill inside a sweep's final save, two trainings at once."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from saex.cli import main
from saex.locks import exclusive, reading
from saex.store import ActivationStore, StoreWriter
from saex.train.resume import checkpoint_path
from tests.crafted import crafted_pickle
from tests.train.synthetic import toy_activations

D = 16
BASE = ["--d-sae", "32", "--k", "4", "--steps", "30", "--batch-size", "64", "--checkpoint-every", "10"]


def _store(folder, n=640, nan_rows=()):
    """Toy activations in shards of 128 rows (batches of 64: a shard closes after its second)."""
    x, _ = toy_activations(n, D, 32, 4)
    x[list(nan_rows), 3] = float("nan")
    w = StoreWriter(folder / "acts", {"model": "toy", "hooks": ["blocks.0.hook_resid_post"], "tokens": "all",
                                      "dataset": {"kind": "toy"}, "label_names": None}, shard_rows=128)
    for start in range(0, n, 64):
        w.add({"acts.blocks.0.hook_resid_post": x[start:start + 64].to(torch.bfloat16),
               "example": torch.arange(start, start + 64)}, [str(i) for i in range(start, start + 64)])
    w.finish()
    return folder


def _train(run, *extra):
    return main(["train", "--run", str(run), *BASE, *extra])


def test_a_crafted_pickle_as_the_checkpoint_runs_nothing(tmp_path, capsys):
    run = _store(tmp_path)
    marker = tmp_path / "pwned"
    # where this saex keeps its checkpoint: read as safetensors, so the pickle is a corrupt file
    path = checkpoint_path(run, ["a"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(crafted_pickle(marker))
    assert _train(run, "--name", "a") == 2
    assert "is not a readable saex state" in capsys.readouterr().err and not marker.exists()
    # where older saex kept it (train-*.pt): never read at all
    path.unlink()
    path.with_suffix(".pt").write_bytes(crafted_pickle(marker))
    assert _train(run, "--name", "a") == 0 and not marker.exists()


def test_altered_shard_bytes_stop_training_before_anything_is_saved(tmp_path, capsys):
    run = _store(tmp_path)
    shard = run / "acts" / ActivationStore(run / "acts").shards[2]["file"]
    good = shard.read_bytes()
    acts = ActivationStore(run / "acts").shard(2, "acts.blocks.0.hook_resid_post")
    start = good.index(acts.contiguous().view(torch.uint8).numpy().tobytes()[:64])
    for new, reason in ((b"\x80\x3f", "finite"), (b"\xff\xff", "NaN")):  # bfloat16 1.0, then a NaN
        shard.write_bytes(good[:start + 6] + new * 4 + good[start + 14:])
        assert _train(run, "--name", "bad") == 2, reason
        err = capsys.readouterr().err
        assert f"{shard} does not match the sha256" in err, reason
        assert not (run / "saes" / "bad").exists()
    shard.write_bytes(good[:start + 6] + b"\x80\x3f" * 4 + good[start + 14:])
    assert _train(run, "--name", "unchecked", "--no-verify") == 0  # the user's choice: sizes and headers only


def test_a_truncated_shard_is_named_on_open(tmp_path, capsys):
    run = _store(tmp_path)
    shard = run / "acts" / ActivationStore(run / "acts").shards[1]["file"]
    shard.write_bytes(shard.read_bytes()[:-7])
    assert _train(run) == 2
    err = capsys.readouterr().err
    assert f"{shard} is truncated" in err and "Traceback" not in err


def test_nonfinite_rows_stop_training_naming_shard_and_row(tmp_path, capsys):
    nan_rows = [5, 130, 131, 300, 639]  # shards of 128 rows: shard 0 row 5, shard 1 rows 2 and 3, ...
    run = _store(tmp_path, nan_rows=nan_rows)
    assert _train(run, "--name", "nan") == 2
    err = capsys.readouterr().err
    assert "holds 5 activation rows with NaN or infinity" in err
    assert f"{run / 'acts' / 'shard_000000.safetensors'} row 5 (store row 5, dataset example 5)" in err
    assert "--skip-nonfinite" in err and not (run / "saes" / "nan").exists()
    assert _train(run, "--name", "skipped", "--skip-nonfinite") == 0
    weights = load_file(run / "saes" / "skipped" / "sae_weights.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    events = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    skipped = [e["skipped_rows"] for e in events if e["event"] == "end" and "skipped_rows" in e]
    # 30 batches of 64 from 640 rows: 3 epochs, each seeing every NaN row but those left in its remainder
    assert skipped and 5 <= skipped[-1] <= 15


def test_one_nan_value_in_the_scale_sample_is_caught(tmp_path, capsys):
    run = _store(tmp_path, nan_rows=[77])
    assert _train(run, "--name", "one") == 2
    assert "holds 1 activation rows" in capsys.readouterr().err


def test_a_diverging_run_stops_at_its_step_and_saves_nothing(tmp_path, capsys):
    run = _store(tmp_path)
    assert _train(run, "--name", "boom", "--architecture", "relu", "--lr", "1e38", "--grad-clip", "0",
                  "--lr-warmup", "0") == 2
    err = capsys.readouterr().err
    assert "boom diverged: its loss was not finite at step" in err
    assert not (run / "saes" / "boom").exists()


SWEEP = ["--sweep", "k=2,4,8", "--name", "sw"]


def test_a_kill_inside_a_sweeps_final_save_resumes_to_the_same_saes(tmp_path):
    run = _store(tmp_path)
    assert _train(run, *SWEEP) == 0
    whole = {n: load_file(run / "saes" / f"sw-k{n}" / "sae_weights.safetensors") for n in (2, 4, 8)}
    other = _store(tmp_path / "killed")
    crash = (  # a SIGKILL as the second member's folder is about to be written
        "import os, signal, sys\n"
        "from saex.train import loop\n"
        "calls = []\n"
        "orig = loop.save_sae\n"
        "def save(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(*a, **k)\n"
        "loop.save_sae = save\n"
        "from saex.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["train", "--run", str(other), *BASE, *SWEEP]
    assert subprocess.run([sys.executable, "-c", crash, *args], capture_output=True).returncode == -9
    assert sorted(p.name for p in (other / "saes").iterdir()) == ["sw-k2"]
    assert main(args) == 0  # no --overwrite: the final save resumes
    for n in (2, 4, 8):
        folder = other / "saes" / f"sw-k{n}"
        assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors",
                                                             "train_config.json"]
        got = load_file(folder / "sae_weights.safetensors")
        assert all(torch.equal(got[k], whole[n][k]) for k in got)
    assert not list((other / "checkpoints").iterdir())
    assert not [p for p in (other / "saes").iterdir() if p.name.startswith(".")]


def test_a_second_training_of_the_same_sae_is_refused(tmp_path, capsys):
    run = _store(tmp_path)
    with exclusive([run / "locks" / "train-topk.lock"], "saex train"):  # a training of topk in this process
        assert _train(run) == 2
        assert f"another saex process (pid {os.getpid()}) holds" in capsys.readouterr().err
    with exclusive([run / "locks" / "acts.lock"], "saex harvest"):  # a harvest rewriting the store
        assert _train(run) == 2
        assert "holds" in capsys.readouterr().err
    with reading(run / "locks" / "acts.lock", "saex train"):  # a training reading it: harvest waits
        assert main(["harvest", "--run", str(run), "--model", "fmnist-vit", "--max-examples", "4"]) == 2
        assert "which saex harvest needs" in capsys.readouterr().err
    assert _train(run) == 0
    assert _train(run, "--k", "8") == 2  # the same name, another config: not "already trained"
    assert "were trained with another config" in capsys.readouterr().err
    assert _train(run) == 0 and "already trained" in capsys.readouterr().out


@pytest.mark.parametrize("mask", [0o027, 0o002])
def test_run_files_follow_the_users_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        run = _store(tmp_path)
        assert _train(run, "--steps", "10") == 0
    finally:
        os.umask(old)
    files = [*(run / "acts").iterdir(), *(run / "saes" / "topk").iterdir()]
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}
    assert oct((run / "saes" / "topk").stat().st_mode & 0o777) == oct(0o777 & ~mask)


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    run = _store(tmp_path)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert _train(run, "--steps", "10", "--checkpoint-every", "5") == 2
    err = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("saex train"))
    assert err.startswith("saex train: error: no space left on the device writing ")
    assert str(run / "checkpoints") in err and "run the same command again" in err
