"""The one training loop: every architecture, one SAE or a sweep of them on one activation stream."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from saex import config as configs
from saex.locks import exclusive
from saex.runlog import JsonlLog, WandbLog, progress
from saex.sae import SAE
from saex.sae.init import decoder_bias, input_scale
from saex.sae.io import CFG, save_sae
from saex.store import ActivationStore
from saex.train.config import TrainConfig, expand_sweep
from saex.train.host import tune_allocator
from saex.train.resume import (TRAIN_CONFIG, checkpoint_path, finished, load_checkpoint, remove_unfinished_saves,
                               run_identity, save_checkpoint)
from saex.train.threads import ThreadTuner
from saex.train.trainee import Trainee

INIT_SAMPLE = 1 << 14  # rows used for the input scale and the decoder-bias init


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def train(cfg: TrainConfig) -> list[Path]:
    """Train the SAE(s) of `cfg`; resumes from RUN/checkpoints/ after a kill. Returns the saved folders."""
    if not cfg.run:
        raise ValueError("--run is required: the run folder that holds acts/ from saex harvest")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {cfg.steps} and {cfg.batch_size}")
    run = Path(cfg.run)
    store = ActivationStore(run / "acts")
    if not store.manifest["complete"]:
        raise ValueError(f"{run / 'acts'} is an unfinished harvest; finish it first (run saex harvest again)")
    variants = expand_sweep(cfg)
    outputs = {name: run / "saes" / name for name, _ in variants}
    with exclusive([run / "locks" / f"train-{name}.lock" for name in outputs], "saex train"):
        return _train(cfg, run, store, variants, outputs)


def _train(cfg: TrainConfig, run: Path, store: ActivationStore, variants, outputs: dict[str, Path]) -> list[Path]:
    column = store.acts(cfg.hook)
    hook = column.removeprefix("acts.")
    d_in = store.d(hook)
    identity = run_identity(variants, len(store), hook)
    checkpoint = checkpoint_path(run, list(outputs))
    remove_unfinished_saves(run / "saes", list(outputs))
    if cfg.overwrite:
        checkpoint.unlink(missing_ok=True)
    elif finished(outputs, variants, resumable=checkpoint.exists()):
        checkpoint.unlink(missing_ok=True)  # left by a kill after the last save
        print(f"already trained: {', '.join(str(p) for p in outputs.values())} (--overwrite retrains)")
        return list(outputs.values())
    device = _device(cfg.device)
    if device.type == "cpu":
        tune_allocator()
    verified = store.verify_in_background() if cfg.verify else None

    torch.manual_seed(cfg.seed)
    rows = np.random.default_rng(cfg.seed).choice(len(store), min(INIT_SAMPLE, len(store)), replace=False)
    sample = _finite_rows(store.take(column, np.sort(rows)).float(), store, column, cfg.skip_nonfinite)
    scale = input_scale(sample) if cfg.normalize else 1.0
    trainees = []
    for name, vcfg in variants:
        torch.manual_seed(vcfg.seed)  # each SAE starts as it would alone: a sweep member equals a solo run
        sae = SAE(vcfg.sae_config(d_in))
        with torch.no_grad():
            sae.b_dec.copy_(decoder_bias(sample * scale, vcfg.b_dec_init))
        sae.arch.init_from_data(sae, sample * scale)
        trainees.append(Trainee(name, vcfg, sae, device))

    start, skipped = 0, 0
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, identity, device)
        for t in trainees:
            t.load_state_dict(state["trainees"][t.name])
        start, scale, skipped = state["step"], state["scale"], state.get("skipped_rows", 0)
        print(f"resuming {', '.join(outputs)} at step {start}")

    def save_checkpoint_at(step: int) -> None:
        _check(trainees, verified)
        save_checkpoint(checkpoint, {"step": step, "scale": scale, "identity": identity, "skipped_rows": skipped,
                                     "trainees": {t.name: t.state_dict() for t in trainees}})

    log = JsonlLog(run, "train")
    wandb = WandbLog(cfg.wandb_project, run, ",".join(outputs), dataclasses.asdict(cfg)) if cfg.wandb_project else None
    log.write("start", step=start, saes=list(outputs), hook=hook, d_in=d_in, input_scale=scale)
    stream = store.iter_shuffled(column, cfg.batch_size, seed=cfg.seed, skip_batches=start)
    bar = progress(cfg.steps, f"train {', '.join(outputs)}"[:60], "step", initial=start)
    t0 = time.perf_counter()
    all_finite = torch.tensor(True, device=device)
    tuner = ThreadTuner(cfg.threads, active=device.type == "cpu")  # CPU threads pace CPU steps only
    try:
        for step in range(start, cfg.steps):
            x_BD = next(stream).to(device, non_blocking=True).float()
            # one sum says whether the batch is finite (a per-row isfinite of bf16 takes 20 ms on 2 cores);
            # the CPU asks at once, a GPU when it logs (asking would wait for it), unless rows are skipped
            finite = torch.isfinite(x_BD.sum())
            if device.type == "cpu" or cfg.skip_nonfinite:
                if not bool(finite):
                    n = len(x_BD)
                    x_BD = _finite_rows(x_BD, store, column, cfg.skip_nonfinite)
                    skipped += n - len(x_BD)
            else:
                all_finite &= finite
            x_BD = x_BD * scale
            with tuner.timed():
                for t in trainees:
                    t.step(x_BD, step)
            last = step + 1 == cfg.steps
            if device.type == "cpu":
                _check(trainees, None)
            if (step + 1) % cfg.log_every == 0 or last:
                if not bool(all_finite):
                    _finite_rows(torch.full((1, 1), float("nan")), store, column, skip=False)  # names the rows
                _check(trainees, verified)
                metrics = {t.name: t.metrics() for t in trainees}
                rate = (step + 1 - start) * cfg.batch_size / (time.perf_counter() - t0)
                log.write("step", step=step + 1, tokens=(step + 1) * cfg.batch_size, tokens_per_s=rate, saes=metrics,
                          **({"threads": tuner.current} if tuner.active else {}), **({"skipped_rows": skipped} if skipped else {}))
                if wandb:
                    wandb.log({f"{n}/{k}": v for n, m in metrics.items() for k, v in m.items()} | {"tokens_per_s": rate},
                              step=step + 1)
                m = metrics[trainees[0].name]
                bar.set_postfix_str(f"{rate:,.0f} tok/s L0 {m['l0']:.1f} FVU {m['fvu']:.3f} dead {100 * m['dead_frac']:.1f}%"
                                    + (f" (+{len(trainees) - 1} SAEs)" if len(trainees) > 1 else ""))
            bar.update()
            # a sweep's members are saved one folder at a time: the final checkpoint makes their saving one
            # resumable step (a kill between two folders resumes here and saves the rest)
            if (step + 1) % cfg.checkpoint_every == 0 and not last or last and len(trainees) > 1:
                save_checkpoint_at(step + 1)
    finally:
        bar.close()  # before any error message, not over it
    if verified is not None:
        verified.result()  # every shard's hash checked before anything is saved
    _check(trainees, None)

    _save_all(trainees, outputs, store, run, hook, scale, cfg)
    checkpoint.unlink(missing_ok=True)
    if wandb:
        wandb.finish()
    seconds = time.perf_counter() - t0
    log.write("end", seconds=seconds, tokens_per_s=(cfg.steps - start) * cfg.batch_size / max(seconds, 1e-9),
              **({"skipped_rows": skipped} if skipped else {}))
    if skipped:
        print(f"skipped {skipped:,} activation rows holding NaN or infinity (--skip-nonfinite)")
    for t in trainees:
        m = t.metrics()
        print(f"{outputs[t.name]}: L0 {m['l0']:.1f}, FVU {m['fvu']:.4f} (last batch), dead {100 * m['dead_frac']:.1f}%")
    return list(outputs.values())


def _save_all(trainees: list[Trainee], outputs: dict[str, Path], store: ActivationStore, run: Path, hook: str,
              scale: float, cfg: TrainConfig) -> None:
    """Save every trained SAE, each folder whole with its train_config.json; members that a kill during a
    sweep's final save left saved are complete already and kept."""
    metadata = {k: store.manifest.get(k) for k in ("model", "model_family", "modality", "tokens", "dataset",
                                                   "context_size", "label_names")}
    for t in trainees:
        if (outputs[t.name] / CFG).exists() and not cfg.overwrite:
            continue
        t.sae.eval()
        t.sae.cpu().fold_input_scale(scale)
        save_sae(t.sae, outputs[t.name], {**metadata, "hook": hook, "run": str(run), "input_scale": scale,
                                          "steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size,
                                          "final": t.metrics()},
                 files={TRAIN_CONFIG: configs.to_json(t.cfg)})


def _check(trainees: list[Trainee], verified: Future | None) -> None:
    """Stop at a diverged SAE or a shard whose hash failed, before anything more is written."""
    for t in trainees:
        t.check_finite()
    if verified is not None and verified.done():
        verified.result()


def _finite_rows(x_BD: torch.Tensor, store: ActivationStore, column: str, skip: bool) -> torch.Tensor:
    """`x_BD` without its rows holding NaN or infinity when skipping them; otherwise an error that says
    where in the store they are."""
    finite_B = torch.isfinite(x_BD).all(1)
    if bool(finite_B.all()):
        return x_BD  # only the sum overflowed
    if skip:
        return x_BD[finite_B]
    bad = store.nonfinite_rows(column)
    store.verify(sorted({shard for shard, _ in bad}))  # altered bytes are the likelier cause: say so first
    raise ValueError(f"{store.folder} holds {len(bad):,} activation rows with NaN or infinity, at "
                     f"{store.describe_rows(bad)}; re-harvest (a float16 store overflows past 65,504: "
                     "--dtype bfloat16 does not), or train without them with --skip-nonfinite")
