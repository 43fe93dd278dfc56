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
    # a transcoder reads one column and reconstructs another, row for row
    target = store.acts(cfg.target).removeprefix("acts.") if cfg.target is not None else None
    if target == hook:
        raise ValueError(f"--target {cfg.target} is the input hook itself: a transcoder reconstructs another hook "
                         f"(the store has {store.hooks}); leave --target out to train an SAE")
    columns = [column] + ([f"acts.{target}"] if target else [])
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
    guard = Guard(store, columns, cfg.verify, defer=device.type != "cpu")

    torch.manual_seed(cfg.seed)
    rows = np.sort(np.random.default_rng(cfg.seed).choice(len(store), min(INIT_SAMPLE, len(store)), replace=False))
    samples = _split(guard.finite_rows(torch.cat([store.take(c, rows).float() for c in columns], 1),
                                       cfg.skip_nonfinite), d_in)
    scales = [input_scale(s) if cfg.normalize else 1.0 for s in samples]  # the input's, then the target's
    trainees = []
    for name, vcfg in variants:
        torch.manual_seed(vcfg.seed)  # each SAE starts as it would alone: a sweep member equals a solo run
        sae = SAE(vcfg.sae_config(d_in, store.d(target) if target else 0))
        with torch.no_grad():
            sae.b_dec.copy_(decoder_bias(samples[-1] * scales[-1], vcfg.b_dec_init))  # in what it reconstructs
        sae.arch.init_from_data(sae, samples[0] * scales[0])
        trainees.append(Trainee(name, vcfg, sae, device))

    start, skipped = 0, 0
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, identity, device)
        for t in trainees:
            t.load_state_dict(state["trainees"][t.name])
        scales = state["scales"] if "scales" in state else [state["scale"]]  # (checkpoints of saex before 0.2)
        start, skipped = state["step"], state.get("skipped_rows", 0)
        print(f"resuming {', '.join(outputs)} at step {start}")

    def save_checkpoint_at(step: int) -> None:
        guard.check(trainees)
        save_checkpoint(checkpoint, {"step": step, "scales": scales, "identity": identity,
                                     "skipped_rows": skipped, "trainees": {t.name: t.state_dict() for t in trainees}})

    log = JsonlLog(run, "train")
    wandb = WandbLog(cfg.wandb_project, run, ",".join(outputs), dataclasses.asdict(cfg)) if cfg.wandb_project else None
    log.write("start", step=start, saes=list(outputs), hook=hook, d_in=d_in, input_scale=scales[0],
              **({"target": target, "target_scale": scales[-1]} if target else {}))
    stream = store.iter_shuffled(columns, cfg.batch_size, seed=cfg.seed, skip_batches=start)
    bar = progress(cfg.steps, f"train {', '.join(outputs)}"[:60], "step", initial=start)
    t0 = time.perf_counter()
    tuner = ThreadTuner(cfg.threads, active=device.type == "cpu")  # CPU threads pace CPU steps only
    try:
        for step in range(start, cfg.steps):
            batch = [b.to(device, non_blocking=True).float() for b in next(stream)]
            if guard.defer and not cfg.skip_nonfinite:
                for b in batch:
                    guard.note_batch(b)
            elif not all(bool(torch.isfinite(b.sum())) for b in batch):  # a sum each (a per-row isfinite of bf16
                n = len(batch[0])                                        # takes 20 ms here)
                batch = _split(guard.finite_rows(torch.cat(batch, 1), cfg.skip_nonfinite), d_in)
                skipped += n - len(batch[0])
            x_BD, *y_BD = (b * s for b, s in zip(batch, scales))
            with tuner.timed():
                for t in trainees:
                    t.step(x_BD, step, *y_BD)
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

    _save_all(trainees, outputs, store, run, hook, target, scales, cfg)
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


def _split(rows_BD: torch.Tensor, d_in: int) -> list[torch.Tensor]:
    """The input's columns and, for a transcoder, the target's, of rows joined side by side."""
    return [rows_BD[:, :d_in]] + ([rows_BD[:, d_in:]] if rows_BD.shape[1] > d_in else [])


def _save_all(trainees: list[Trainee], outputs: dict[str, Path], store: ActivationStore, run: Path, hook: str,
              target: str | None, scales: list[float], cfg: TrainConfig) -> None:
    """Save every trained SAE, each folder whole with its train_config.json; members that a kill during a
    sweep's final save left saved are complete already and kept."""
    metadata = {k: store.manifest.get(k) for k in ("model", "model_family", "modality", "tokens", "dataset",
                                                   "context_size", "label_names")}
    for t in trainees:
        if (outputs[t.name] / CFG).exists() and not cfg.overwrite:
            continue
        t.sae.eval()
        t.sae.cpu().fold_input_scale(scales[0], scales[-1])
        transcoder = {"target_hook": target, "target_scale": scales[-1]} if target else {}
        save_sae(t.sae, outputs[t.name], {**metadata, "hook": hook, **transcoder, "run": str(run), "input_scale": scales[0],
                                          "steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size,
                                          "final": t.metrics()},
                 files={TRAIN_CONFIG: configs.to_json(t.cfg)})
