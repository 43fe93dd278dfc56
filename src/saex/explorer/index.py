"""The index stage: one resumable pass over a run's activations, then per-feature statistics, top
examples with thumbnails or token windows, each example's top features, and what ablating each feature
on its top examples changes downstream, in one SQLite file."""

from __future__ import annotations

import errno
import io
import json
import os
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from saex import config as configs
from saex.analysis.ablation import Ablation, NoReadout, ablate_features
from saex.analysis.alignment import neuron_alignment
from saex.analysis.clusters import low_density_cluster
from saex.analysis.labels import entropy_bits, label_distribution
from saex.analysis.lens import index_lens
from saex.atomic import atomic_write_bytes
from saex.data import reopen
from saex.explorer.scan import Scan
from saex.explorer.schema import SCHEMA
from saex.explorer.windows import token_windows
from saex.locks import exclusive, reading
from saex.runlog import JsonlLog, progress
from saex.sae.io import load_sae, saved_saes
from saex.statefile import load_state, save_state
from saex.store import ActivationStore

INDEX = "index.sqlite"
SCAN = "scan.safetensors"  # the pass's state while it runs (a kill resumes from it)


@dataclass
class IndexConfig:
    run: str = field(default="", metadata={"required": True})
    """Run folder with acts/ and saes/; the index goes to RUN/index/<sae>/."""
    sae: str | None = None
    """SAE to index, by name in RUN/saes/ (default: the only one)."""
    top: int = 32
    """Top activating examples kept per feature."""
    samples: int = 16
    """Random firing examples kept per feature (for the lower activation quantiles)."""
    per_example: int = 16
    """Top features kept per example."""
    chunk_rows: int = 8192
    """Rows encoded at a time."""
    thumb_size: int = 96
    """Longest side of image thumbnails, in pixels."""
    window: int = 12
    """Text: tokens shown on each side of a top example's strongest token."""
    device: str = "auto"
    """cpu, cuda, ...; auto picks cuda when there is one."""
    overwrite: bool = False
    """Rebuild an index that exists."""
    ablation: bool = True
    """Ablate each feature on its top examples and store the effect (--no-ablation skips it). It runs the model
    past the hook once per feature and example: seconds for a small vision model's class token, about 10 s
    per feature for minilm on 128-token texts on 2 CPU cores (there: fewer --ablation-examples, or a GPU)."""
    ablation_examples: int = 16
    """Top examples each feature is ablated on."""
    lens: bool = True
    """Read each feature's decoder and encoder vectors through the model's readout and classify its logit weights
    (analysis/lens.py, analysis/taxonomy.py; --no-lens skips it): two matrix products per feature over the
    vocabulary: 1.4 s for the fmnist-vit demo, 16 s for minilm's (3,072 features, 30,522 tokens), about 7 min for
    65,536 features over GPT-2's 50,257 tokens on 2 CPU cores."""


def build_index(cfg: IndexConfig) -> Path:
    if not cfg.run:
        raise ValueError("--run is required")
    run = Path(cfg.run)
    store = ActivationStore(run / "acts")
    folders = saved_saes(run / "saes", [cfg.sae] if cfg.sae else None)
    if len(folders) != 1:
        raise ValueError(f"{run / 'saes'} holds {[f.name for f in folders]}; name one with --sae")
    folder = folders[0]
    out = run / "index" / folder.name
    with exclusive([run / "locks" / f"index-{folder.name}.lock"], "saex index"), \
            reading(run / "locks" / "acts.lock", "saex index"):
        return _build(cfg, run, store, folder, out)


def _build(cfg: IndexConfig, run: Path, store: ActivationStore, folder: Path, out: Path) -> Path:
    if (out / INDEX).exists() and not cfg.overwrite and not (out / SCAN).exists():  # (a scan left: unfinished)
        print(f"{out / INDEX} exists (--overwrite rebuilds it)")
        return out
    if cfg.ablation_examples < 1:
        raise ValueError(f"--ablation-examples must be >= 1, got {cfg.ablation_examples} (--no-ablation skips it)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    sae = load_sae(folder, device)
    hook = sae.metadata.get("hook") or store.hooks[0]
    column = store.acts(hook)
    scan = Scan(sae.d_sae, cfg.top, cfg.samples, cfg.per_example)
    state_path = out / SCAN
    identity = {"sae": folder.name, "rows": len(store), "top": cfg.top, "samples": cfg.samples,
                "per_example": cfg.per_example}
    if state_path.exists() and not cfg.overwrite:
        state = load_state(state_path)
        if isinstance(state, dict) and state.get("identity") == identity:
            try:
                scan.load_state_dict(state["scan"])
            except (KeyError, TypeError, AttributeError, RuntimeError) as e:
                raise ValueError(f"{state_path} is not a scan this saex wrote ({e!r}); delete it to start over, "
                                 "or pass --overwrite") from None
    log = JsonlLog(run, "index")
    log.write("start", sae=folder.name, resume_rows=scan.rows)
    bar = progress(len(store), f"index {folder.name}", "rows", initial=scan.rows)
    for shard in range(scan.next_shard, len(store.shards)):
        scan.scan_shard(sae, store, shard, column, cfg.chunk_rows)
        save_state(state_path, {"identity": identity, "scan": scan.state_dict()})
        bar.update(store.shards[shard]["rows"])
    bar.close()
    # not resumable: a kill recomputes it (3 s of the demo's 16 on 2 CPU cores, 5 s beside a busy process)
    ablation = _ablation(cfg, store, sae, hook, scan, device) if cfg.ablation else None
    try:
        _write(out, cfg, store, sae.cpu(), hook, scan, ablation)
    except sqlite3.OperationalError as e:  # SQLite's "database or disk is full" names no file
        if "full" not in str(e):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from e
    configs.save(cfg, out / "config.json")
    state_path.unlink(missing_ok=True)
    log.write("end", sae=folder.name, rows=scan.rows)
    print(f"indexed {sae.d_sae:,} features of {folder.name} over {scan.rows:,} rows into {out / INDEX}")
    return out


def _feature_table(store, sae, hook, scan) -> tuple[list[tuple], list[tuple], dict]:
    """Rows of the features table, of the feature_labels table, and index-wide meta."""
    S, manifest = sae.d_sae, store.manifest
    density = (scan.fires_S / max(scan.rows, 1)).float()
    mean_act = torch.where(scan.fires_S > 0, scan.sum_S / scan.fires_S.clamp_min(1), torch.zeros(S, dtype=torch.float64))
    values = scan.top.value_SK
    filled = scan.top.example_SK >= 0
    mean_top20 = (values[:, :20] * filled[:, :20]).sum(1) / filled[:, :20].sum(1).clamp_min(1)
    examples = scan.example_table()
    label_of = dict(zip(examples[:, 0].tolist(), examples[:, 3].tolist()))
    labels_SK = torch.tensor([[label_of.get(e, -1) for e in row] for row in scan.top.example_SK.tolist()])
    names = manifest.get("label_names") or []
    entropy, top_label = torch.full((S,), float("nan")), torch.full((S,), -1)
    label_rows = []
    if names:
        dist = label_distribution(labels_SK, values * filled, len(names), top=20)
        label_rows = [(f, lab, w) for (f, lab), w in zip(dist.nonzero().tolist(), dist[dist > 0].tolist())]
        entropy = entropy_bits(dist)
        top_label = torch.where(dist.sum(1) > 0, dist.argmax(1), torch.full((S,), -1))
    enc_dec = torch.nn.functional.cosine_similarity(sae.W_enc.T, sae.W_dec, dim=1).detach()
    meta = {}
    align = None
    parts = hook.split(".")  # blocks.L.site; a toy store's hook names no layer of a model
    layer = int(parts[1]) - (1 if hook.endswith("hook_resid_pre") else 0) if len(parts) == 3 and parts[1].isdigit() \
        else -1
    if layer >= 0 and manifest.get("modality") != "toy":
        try:
            from saex.models import load_model

            adapter = load_model(manifest["model"])
            align = neuron_alignment(sae.W_enc.detach(), adapter.mlp_out_directions(layer))
            meta["neuron_random_range"] = align["random_range"]
            meta["neuron_layer"] = layer
        except (ValueError, OSError) as e:
            print(f"neuron alignment skipped: {e}", file=sys.stderr)
    live = (density > 0).numpy()
    log_mean = np.log10(np.maximum(mean_top20.numpy(), 1e-12))
    cluster = low_density_cluster(log_mean, live, sae.W_enc.detach())
    meta["dense_cluster"] = {k: v for k, v in cluster.items() if k != "member"} | {"size": int(cluster["member"].sum())}
    rows = []
    for j in range(S):
        rows.append((j, float(density[j]), float(mean_act[j]), float(scan.max_S[j]), float(mean_top20[j]),
                     None if torch.isnan(entropy[j]) else float(entropy[j]), int(top_label[j]), float(enc_dec[j]),
                     float(align["max_cos"][j]) if align else None, int(align["neuron"][j]) if align else None,
                     int(align["n_above_random"][j]) if align else None, int(cluster["member"][j])))
    return rows, label_rows, meta


def _ablation(cfg: IndexConfig, store, sae, hook: str, scan: Scan, device: str) -> Ablation | None:
    """Each feature ablated on its top examples (None, with a message, for a model with no readout)."""
    from saex.models import load_model

    manifest = store.manifest
    if manifest.get("modality") == "toy":
        print("ablation skipped: a toy store has no model to read the effect through", file=sys.stderr)
        return None
    try:
        adapter = load_model(manifest["model"], device)
    except (ValueError, OSError) as e:  # as the neuron alignment: an index without the model is still an index
        print(f"ablation skipped: {e}", file=sys.stderr)
        return None
    try:
        return ablate_features(adapter, sae, adapter.hook(hook), manifest["tokens"], reopen(manifest["dataset"]),
                               scan.top.example_SK, cfg.ablation_examples, manifest.get("label_names"),
                               manifest.get("context_size") or 128)
    except NoReadout as e:
        print(f"ablation skipped: {e}", file=sys.stderr)
        return None


def _ablation_rows(ablation: Ablation) -> tuple[list[tuple], list[tuple]]:
    """Rows of the ablation and ablation_outputs tables."""
    rows, outputs = [], []
    for a in ablation.features:
        loses, gains = a.loses or (None, None), a.gains or (None, None)
        rows.append((a.feature, a.examples, a.kl, a.loss_delta, *loses, *gains))
        outputs += [(a.feature, name, delta) for name, delta in a.outputs]
    return rows, outputs


def _write(out: Path, cfg: IndexConfig, store, sae, hook, scan, ablation: Ablation | None = None) -> None:
    manifest = store.manifest
    out.mkdir(parents=True, exist_ok=True)
    dataset = reopen(manifest["dataset"])
    features, label_rows, meta = _feature_table(store, sae, hook, scan)
    examples = scan.example_table()
    referenced = set(scan.top.example_SK[scan.top.example_SK >= 0].tolist()) | \
        set(scan.sample.example_SK[scan.sample.example_SK >= 0].tolist())
    windows = token_windows(store, sae, hook, scan, examples, manifest, cfg.window) if manifest["modality"] == "text" else {}
    for stale in out.glob(f".{INDEX}.*"):  # a killed run's database and its journal (the lock is ours)
        stale.unlink()
    tmp = out / f".{INDEX}.{os.getpid()}.tmp"
    db = sqlite3.connect(tmp)
    db.executescript(SCHEMA)
    metrics_path = Path(cfg.run) / "saes" / sae.metadata.get("name", out.name) / "metrics.json"
    grid = manifest["modality"] == "image" and manifest["tokens"] in ("patches", "all")
    meta["patch_grid"] = _patch_grid(store, examples) if grid else None
    meta.update(sae=out.name, hook=hook, model=manifest["model"], modality=manifest["modality"],
                tokens=manifest["tokens"], label_names=manifest.get("label_names"), d_sae=sae.d_sae,
                rows=scan.rows, examples=len(examples), top=cfg.top,
                metrics=json.loads(metrics_path.read_text()) if metrics_path.exists() else None)
    meta["metrics"] = {k: v for k, v in (meta["metrics"] or {}).items() if k != "density"} or None
    if ablation is not None:
        meta["ablation"] = {"readout": ablation.readout, "examples_per_feature": ablation.examples_per_feature,
                            "seconds": round(ablation.seconds, 3)}
        rows, outputs = _ablation_rows(ablation)
        db.executemany("INSERT INTO ablation VALUES (?,?,?,?,?,?,?,?)", rows)
        db.executemany("INSERT INTO ablation_outputs VALUES (?,?,?)", outputs)
    lens = index_lens(manifest, sae, cfg.device) if cfg.lens else None  # None: toy store, no model or readout
    if lens is not None:
        meta["lens"] = lens.meta
        for table, rows in lens.tables.items():
            db.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})", rows)
    db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
    db.executemany("INSERT INTO features VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", features)
    for kind, table in (("top", scan.top), ("sample", scan.sample)):
        rows = []
        for j, (exs, vals) in enumerate(zip(table.example_SK.tolist(), table.value_SK.tolist())):
            order = sorted((-v, e) for e, v in zip(exs, vals) if e >= 0) if kind == "sample" else \
                [(-v, e) for e, v in zip(exs, vals) if e >= 0]
            rows += [(j, kind, r, e, -nv, windows.get((j, e))) for r, (nv, e) in enumerate(order)]
        db.executemany("INSERT INTO feature_examples VALUES (?,?,?,?,?,?)", rows)
    thumbs = out / "thumbs"
    thumbs.mkdir(exist_ok=True)
    example_rows = []
    for ex, first, n, label in examples.tolist():
        item = dataset[ex]
        thumb = _thumbnail(item.input, thumbs, ex, cfg.thumb_size) if ex in referenced and manifest["modality"] == "image" else None
        text = item.input if manifest["modality"] == "text" else None
        example_rows.append((ex, item.id, label, text, thumb, first, n))
    db.executemany("INSERT INTO examples VALUES (?,?,?,?,?,?,?)", example_rows)
    ef = []
    for shard_examples, feats in zip(scan.examples, scan.example_features):
        for ex, row in zip(shard_examples[:, 0].tolist(), feats.tolist()):
            ef += [(ex, r, int(f), v) for r, (f, v) in enumerate(row) if f >= 0]
    db.executemany("INSERT INTO example_features VALUES (?,?,?,?)", ef)
    db.executemany("INSERT INTO feature_labels VALUES (?,?,?)", label_rows)
    db.commit()
    db.close()
    os.replace(tmp, out / INDEX)
    kept = {row[4] for row in example_rows}
    for stale in thumbs.iterdir():  # after the new index is in place: a killed run's temporaries, old thumbnails
        if stale.name not in kept and stale.is_file():
            stale.unlink()


def _patch_grid(store, examples: torch.Tensor) -> dict | None:
    """Where an example's patch tokens sit: positions offset .. offset + side^2 - 1, after a class token and
    any register tokens (the smallest offset after which the rest, most of the example, is a square)."""
    if not len(examples):
        return None
    first, n = int(examples[0, 1]), int(examples[0, 2])
    positions = store.take("position", torch.arange(first, first + n)).tolist()
    for offset in sorted(set(positions)):
        patches = [p for p in positions if p >= offset]
        side = round(len(patches) ** 0.5)
        if 2 * len(patches) < len(positions):
            break
        if side >= 2 and side * side == len(patches) and patches == list(range(offset, offset + side * side)):
            return {"offset": offset, "side": side}
    return None


def _thumbnail(image, folder: Path, example: int, size: int) -> str:
    from PIL import Image

    im = image.copy()
    scale = size / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.NEAREST if scale >= 2 else Image.BICUBIC)
    name = f"{example}.png" if im.mode == "L" else f"{example}.jpg"
    buffer = io.BytesIO()
    im.save(buffer, format="PNG" if im.mode == "L" else "JPEG", quality=88)
    atomic_write_bytes(folder / name, buffer.getvalue())
    return name
