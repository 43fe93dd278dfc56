import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from saex.cli import main
from saex.sae.io import load_sae
from saex.statefile import load_state, save_state
from saex.train import TrainConfig, expand_sweep, train
from tests.train.synthetic import mmcs, toy_activations, write_store

D, N_FEATURES, K = 32, 64, 4


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("toy")
    x, features = toy_activations(16384, D, N_FEATURES, K)
    write_store(run / "acts", x)
    return run, features


@pytest.mark.parametrize("arch, extra", [("topk", []), ("batchtopk", []), ("topk", ["--matryoshka", "fixed"]),
                                         ("batchtopk", ["--matryoshka", "random"])])
def test_recovers_ground_truth_at_the_true_sparsity(toy_run, arch, extra):
    run, features = toy_run
    name = f"gt-{arch}-{'-'.join(extra[1:]) or 'plain'}"
    assert main(["train", "--run", str(run), "--architecture", arch, "--k", str(K), "--d-sae", str(N_FEATURES),
                 "--steps", "1200", "--batch-size", "256", "--lr", "3e-3", "--name", name, "--b-dec-init", "zero",
                 "--no-normalize", "--matryoshka-groups", "0.25", "0.25", "0.5", *extra]) == 0
    sae = load_sae(run / "saes" / name)
    score = mmcs(features, sae.W_dec.detach())
    assert score >= 0.9, f"{name}: mean max cosine {score:.3f}"


def test_every_architecture_trains_and_reduces_error(toy_run):
    run, _ = toy_run
    assert main(["train", "--run", str(run), "--sweep", "architecture=relu,jumprelu,gated,prolu",
                 "--d-sae", "64", "--steps", "150", "--batch-size", "256", "--lr", "3e-3",
                 "--sparsity-coefficient", "0.5", "--name", "all"]) == 0
    for arch in ("relu", "jumprelu", "gated", "prolu"):
        cfg = json.loads((run / "saes" / f"all-architecture{arch}" / "cfg.json").read_text())
        final = cfg["metadata"]["final"]
        assert final["fvu"] < 0.5 and final["l0"] < 64, (arch, final)


def _weights(folder):
    return load_file(folder / "sae_weights.safetensors")


def test_sweep_members_equal_solo_runs(toy_run):
    run, _ = toy_run
    common = ["train", "--run", str(run), "--d-sae", "64", "--steps", "30", "--batch-size", "128", "--threads", "1",
              "--name", "sw"]  # pinned threads: the tuner must not move in one run and not the other
    assert main(common + ["--sweep", "k=2,6"]) == 0
    assert main(common[:-1] + ["solo", "--k", "6"]) == 0
    a, b = _weights(run / "saes" / "sw-k6"), _weights(run / "saes" / "solo")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_training_resumes_to_identical_weights(toy_run, tmp_path, capsys):
    run, _ = toy_run
    args = ["train", "--run", str(run), "--architecture", "topk", "--matryoshka", "random", "--k", "4",
            "--d-sae", "64", "--steps", "60", "--batch-size", "128", "--checkpoint-every", "20", "--threads", "1",
            "--resort-every", "15", "--dead-tokens", "2000"]
    assert main(args + ["--name", "whole"]) == 0
    # a real SIGKILL in the middle of step 45 (after the checkpoint of step 40)
    crash = (
        "import os, signal, sys\n"
        "from saex.train import trainee\n"
        "orig = trainee.Trainee.step\n"
        "def step(self, x, s):\n"
        "    if s == 45: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(self, x, s)\n"
        "trainee.Trainee.step = step\n"
        "from saex.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", crash, *args, "--name", "killed"], capture_output=True)
    assert proc.returncode == -9
    assert list((run / "checkpoints").glob("train-*.safetensors")), "a checkpoint must survive the kill"
    # a checkpoint of another format is refused by name, not half-loaded
    checkpoint = next((run / "checkpoints").glob("train-*.safetensors"))
    good = checkpoint.read_bytes()
    state = load_state(checkpoint)
    del state["identity"]["format"]
    save_state(checkpoint, state)
    assert main(args + ["--name", "killed"]) == 2
    assert "different training config" in capsys.readouterr().err
    checkpoint.write_bytes(good)
    assert main(args + ["--name", "killed"]) == 0
    a, b = _weights(run / "saes" / "whole"), _weights(run / "saes" / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((run / "checkpoints").glob("train-*"))


def test_sweep_errors():
    with pytest.raises(ValueError, match="cannot sweep 'steps'; sweepable fields:"):
        expand_sweep(TrainConfig(run="x", sweep=["steps=1,2"]))
    with pytest.raises(ValueError, match="is not of the form key=v1,v2"):
        expand_sweep(TrainConfig(run="x", sweep=["k"]))
    names = [n for n, _ in expand_sweep(TrainConfig(run="x", sweep=["k=8,16", "architecture=topk,batchtopk"]))]
    assert names == ["topk-k8", "batchtopk-k8", "topk-k16", "batchtopk-k16"]


def test_training_needs_a_finished_harvest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no activation store"):
        train(TrainConfig(run=str(tmp_path)))


def test_metrics_mirror_to_wandb_offline(toy_run, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (it comes with the interop extra)")
    run, _ = toy_run
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(["train", "--run", str(run), "--d-sae", "64", "--steps", "10", "--batch-size", "64",
                 "--log-every", "5", "--name", "wb", "--wandb-project", "saex-test"]) == 0
    history = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert history and history[0].stat().st_size > 0


def _fvu(run, name):
    from saex.store import ActivationStore

    store = ActivationStore(run / "acts")
    x = next(store.iter_ordered([store.acts()], len(store)))[store.acts()].float()
    with torch.no_grad():
        x_hat = load_sae(run / "saes" / name)(x)
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu", "gated", "prolu"])
def test_fast_path_trains_as_well_as_the_reference(toy_run, arch, monkeypatch):
    run, _ = toy_run
    # the toy's codes are denser than the density routing's bounds (d_sae / 24 or / 32): lift them, so
    # that every fast step after the first takes the sparse kernels
    for routed in ("relu.ReLU", "jumprelu.JumpReLU", "gated.Gated", "prolu.ProLU"):
        monkeypatch.setattr(f"saex.sae.arch.{routed}.sparse_max_density", 1.0)
    common = ["train", "--run", str(run), "--architecture", arch, "--k", "4", "--d-sae", "64", "--steps", "300",
              "--batch-size", "256", "--lr", "3e-3", "--sparsity-coefficient", "0.1", "--jumprelu-init-l0", "4"]
    assert main(common + ["--encoder-kernel", "dense", "--select-precision", "float32", "--no-autocast",
                          "--name", f"ref-{arch}"]) == 0
    assert main(common + ["--name", f"fast-{arch}"]) == 0  # the defaults: sparse kernels, auto precision
    ref, fast = _fvu(run, f"ref-{arch}"), _fvu(run, f"fast-{arch}")
    assert abs(fast - ref) <= 0.01 * ref + 1e-4, (ref, fast)


def test_dead_count_waits_for_the_window_then_recounts_every_few_updates():
    """The host counts the dead without a GPU sync per step: none before `window` tokens have passed,
    then a count every RECOUNT_EVERY updates; the count survives a checkpoint."""
    from saex.train.dead import DeadTracker

    tracker = DeadTracker(8, window=100, device="cpu")
    fired = torch.zeros(8, dtype=torch.bool)
    fired[:3] = True
    for _ in range(4):
        tracker.update(fired, 30)
        assert tracker.count() == 0 or tracker.total >= 100
    assert tracker.total == 120 and tracker.count() == 5
    fired[3] = True  # latent 3 revives: the count lags until the next recount
    for i in range(tracker.RECOUNT_EVERY):
        assert tracker.count() == 5, i
        tracker.update(fired, 30)
        if i == 10:  # a resumed run keeps the stale count, as the run it continues did
            restored = DeadTracker(8, window=100, device="cpu")
            restored.load_state_dict(tracker.state_dict())
            assert restored.count() == 5 and int(restored.dead().sum()) == 4
    assert tracker.count() == 4
