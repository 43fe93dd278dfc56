"""The one training loop: every architecture, one SAE or a sweep of them on one activation stream."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from saex import config as configs
from saex.locks import exclusive, reading
from saex.runlog import JsonlLog, WandbLog, progress
from saex.sae import SAE
from saex.sae.init import decoder_bias, input_scale
from saex.sae.io import CFG, save_sae
from saex.store import ActivationStore
from saex.train.config import TrainConfig, expand_sweep
from saex.train.host import tune_allocator
from saex.train.resume import (TRAIN_CONFIG, checkpoint_path, finished, load_checkpoint, remove_unfinished_saves,
                               run_identity, save_checkpoint)
from saex.train.guard import Guard
from saex.threads import ThreadTuner
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
    threads = torch.get_num_threads()
    with exclusive([run / "locks" / f"train-{name}.lock" for name in outputs], "saex train"), \
            reading(run / "locks" / "acts.lock", "saex train"):
        try:
            return _train(cfg, run, store, variants, outputs)
        finally:
            torch.set_num_threads(threads)  # process-wide: the tuner's or --threads' count ends with the run


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
    guard = Guard(store, column, cfg.verify, defer=device.type != "cpu")

    torch.manual_seed(cfg.seed)
    rows = np.random.default_rng(cfg.seed).choice(len(store), min(INIT_SAMPLE, len(store)), replace=False)
    sample = guard.finite_rows(store.take(column, np.sort(rows)).float(), cfg.skip_nonfinite)
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
        guard.check(trainees)
        save_checkpoint(checkpoint, {"step": step, "scale": scale, "identity": identity, "skipped_rows": skipped,
                                     "trainees": {t.name: t.state_dict() for t in trainees}})

    log = JsonlLog(run, "train")
    wandb = WandbLog(cfg.wandb_project, run, ",".join(outputs), dataclasses.asdict(cfg)) if cfg.wandb_project else None
    log.write("start", step=start, saes=list(outputs), hook=hook, d_in=d_in, input_scale=scale)
    stream = store.iter_shuffled(column, cfg.batch_size, seed=cfg.seed, skip_batches=start)
    bar = progress(cfg.steps, f"train {', '.join(outputs)}"[:60], "step", initial=start)
    t0 = time.perf_counter()
    tuner = ThreadTuner(cfg.threads, active=device.type == "cpu")  # CPU threads pace CPU steps only
    try:
        for step in range(start, cfg.steps):
            x_BD = next(stream).to(device, non_blocking=True).float()
            if guard.defer and not cfg.skip_nonfinite:
                guard.note_batch(x_BD)
            elif not bool(torch.isfinite(x_BD.sum())):  # one sum (a per-row isfinite of bf16 takes 20 ms here)
                n = len(x_BD)
                x_BD = guard.finite_rows(x_BD, cfg.skip_nonfinite)
                skipped += n - len(x_BD)
            x_BD = x_BD * scale
            with tuner.timed():
                for t in trainees:
                    t.step(x_BD, step)
            last = step + 1 == cfg.steps
            if not guard.defer:
                guard.check(trainees, hashes=False)
            if (step + 1) % cfg.log_every == 0 or last:
                guard.check(trainees)
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
    except BaseException:
        guard.stop()
        raise
    finally:
        bar.close()  # before any error message, not over it
    guard.finish(trainees)

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
