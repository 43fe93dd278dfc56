"""The one training loop: every architecture, one SAE or a sweep of them on one activation stream."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from saex import config as configs
from saex.atomic import atomic_write_bytes
from saex.runlog import JsonlLog, WandbLog, progress
from saex.sae import SAE
from saex.sae.init import decoder_bias, input_scale
from saex.sae.io import CFG, save_sae
from saex.store import ActivationStore
from saex.train.config import TrainConfig, expand_sweep
from saex.train.host import tune_allocator
from saex.train.trainee import Trainee

INIT_SAMPLE = 1 << 14  # rows used for the input scale and the decoder-bias init


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


CHECKPOINT_FORMAT = 2  # 2: the encoder stored latent-major (W_enc_SD); older checkpoints do not resume


def _save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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
    column = store.acts(cfg.hook)
    hook = column.removeprefix("acts.")
    d_in = store.d(hook)
    variants = expand_sweep(cfg)
    outputs = {name: run / "saes" / name for name, _ in variants}
    done = [n for n, p in outputs.items() if (p / CFG).exists()]
    if done and not cfg.overwrite:
        if len(done) == len(outputs):
            print(f"already trained: {', '.join(str(outputs[n]) for n in done)} (--overwrite retrains)")
            return list(outputs.values())
        raise ValueError(f"SAEs {done} already exist in {run / 'saes'}; use --overwrite or other names")
    device = _device(cfg.device)
    if device.type == "cpu":
        tune_allocator()

    torch.manual_seed(cfg.seed)
    rows = np.random.default_rng(cfg.seed).choice(len(store), min(INIT_SAMPLE, len(store)), replace=False)
    sample = store.take(column, np.sort(rows)).float()
    scale = input_scale(sample) if cfg.normalize else 1.0
    trainees = []
    for name, vcfg in variants:
        torch.manual_seed(vcfg.seed)  # each SAE starts as it would alone: a sweep member equals a solo run
        sae = SAE(vcfg.sae_config(d_in))
        with torch.no_grad():
            sae.b_dec.copy_(decoder_bias(sample * scale, vcfg.b_dec_init))
        sae.arch.init_from_data(sae, sample * scale)
        trainees.append(Trainee(name, vcfg, sae, device))

    identity = {"variants": {n: dataclasses.asdict(v) for n, v in variants}, "store_rows": len(store), "hook": hook,
                "format": CHECKPOINT_FORMAT}
    identity["variants"] = {n: {k: v for k, v in d.items() if k not in ("overwrite", "checkpoint_every", "log_every")}
                            for n, d in identity["variants"].items()}
    key = hashlib.sha256(json.dumps(sorted(outputs)).encode()).hexdigest()[:12]
    checkpoint = run / "checkpoints" / f"train-{key}.pt"
    start = 0
    if checkpoint.exists() and not cfg.overwrite:
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["identity"] != identity:
            raise ValueError(f"{checkpoint} was written by a different training config; use --overwrite to start over")
        for t in trainees:
            t.load_state_dict(state["trainees"][t.name])
        start, scale = state["step"], state["scale"]
        print(f"resuming {', '.join(outputs)} at step {start}")

    log = JsonlLog(run, "train")
    wandb = WandbLog(cfg.wandb_project, run, ",".join(outputs), dataclasses.asdict(cfg)) if cfg.wandb_project else None
    log.write("start", step=start, saes=list(outputs), hook=hook, d_in=d_in, input_scale=scale)
    stream = store.iter_shuffled(column, cfg.batch_size, seed=cfg.seed, skip_batches=start)
    bar = progress(cfg.steps, f"train {', '.join(outputs)}"[:60], "step", initial=start)
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        x_BD = next(stream).to(device, torch.float32, non_blocking=True) * scale
        for t in trainees:
            t.step(x_BD, step)
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last:
            metrics = {t.name: t.metrics() for t in trainees}
            rate = (step + 1 - start) * cfg.batch_size / (time.perf_counter() - t0)
            log.write("step", step=step + 1, tokens=(step + 1) * cfg.batch_size, tokens_per_s=rate, saes=metrics)
            if wandb:
                wandb.log({f"{n}/{k}": v for n, m in metrics.items() for k, v in m.items()} | {"tokens_per_s": rate},
                          step=step + 1)
            m = metrics[trainees[0].name]
            bar.set_postfix_str(f"{rate:,.0f} tok/s L0 {m['l0']:.1f} FVU {m['fvu']:.3f} dead {100 * m['dead_frac']:.1f}%"
                                + (f" (+{len(trainees) - 1} SAEs)" if len(trainees) > 1 else ""))
        bar.update()
        if (step + 1) % cfg.checkpoint_every == 0 and not last:
            _save_checkpoint(checkpoint, {"step": step + 1, "scale": scale, "identity": identity,
                                          "trainees": {t.name: t.state_dict() for t in trainees}})
    bar.close()

    metadata = {k: store.manifest.get(k) for k in ("model", "model_family", "modality", "tokens", "dataset",
                                                   "context_size", "label_names")}
    for t in trainees:
        t.sae.eval()
        t.sae.cpu().fold_input_scale(scale)
        save_sae(t.sae, outputs[t.name], {**metadata, "hook": hook, "run": str(run), "input_scale": scale,
                                          "steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size,
                                          "final": t.metrics()})
        configs.save(t.cfg, outputs[t.name] / "train_config.json")
    checkpoint.unlink(missing_ok=True)
    if wandb:
        wandb.finish()
    seconds = time.perf_counter() - t0
    log.write("end", seconds=seconds, tokens_per_s=(cfg.steps - start) * cfg.batch_size / max(seconds, 1e-9))
    for t in trainees:
        m = t.metrics()
        print(f"{outputs[t.name]}: L0 {m['l0']:.1f}, FVU {m['fvu']:.4f} (last batch), dead {100 * m['dead_frac']:.1f}%")
    return list(outputs.values())
