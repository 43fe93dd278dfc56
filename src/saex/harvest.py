"""The harvest stage: drive a model over a dataset and write its activations into the store."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from saex import config as configs
from saex.data import UnreadableExample, open_dataset
from saex.locks import exclusive
from saex.models import DEFAULT_TOKENS, load_model
from saex.models.adapter import Batch
from saex.runlog import JsonlLog, progress
from saex.store import StoreWriter, acts_column

STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HarvestConfig:
    run: str
    """Run folder; the activations go to RUN/acts/."""
    model: str = "fmnist-vit"
    """Zoo name (minilm, fmnist-vit), local model folder, or Hugging Face model id."""
    dataset: str = "fashion-mnist"
    """fashion-mnist, wiki, hf:<hub id>, an image folder (ImageFolder layout), a folder of IDX files,
    or a .txt / .jsonl file."""
    split: str = "train"
    """Dataset split (fashion-mnist: train or test; Hugging Face datasets: any split)."""
    data_path: str | None = None
    """Where a built-in dataset lives when not in its default place."""
    text_field: str | None = None
    """Column holding the text (default: "text" for JSONL; for Hugging Face datasets the image column
    when there is one, else the first of text, content, sentence, document)."""
    label_field: str | None = None
    """JSONL / Hugging Face column holding the label."""
    hook: list[str] = field(default_factory=list)
    """Hook points, e.g. blocks.3.hook_resid_post (several allowed, captured in one forward pass;
    default: the second-to-last block's hook_resid_post)."""
    tokens: str | None = None
    """Token selection: cls, patches, registers (models with register tokens, e.g. DINOv2 with registers)
    or all for images (default cls); content (no padding, no special tokens), all (no padding) or first
    for text (default content)."""
    max_examples: int | None = None
    """Harvest at most this many examples."""
    order: Literal["shuffled", "dataset"] = "shuffled"
    """Which examples come first: a seeded shuffle of the dataset, or the dataset's own order."""
    seed: int = 0
    """Seed of the shuffled order."""
    batch_size: int = 64
    """Examples per forward pass; a resumed harvest must use the same."""
    context_size: int = 128
    """Text: tokens per example, longer texts are truncated."""
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    """Precision of the stored activations."""
    device: str = "auto"
    """cpu, cuda, cuda:1...; auto picks cuda when there is one."""
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Precision of the model's forward pass; auto is bfloat16 on a GPU and float32 on the CPU."""
    shard_rows: int = 65536
    """Rows per shard (a shard closes at the first batch boundary past this)."""
    workers: int = -1
    """Processes that load and preprocess inputs; -1 picks 0 on the CPU and, on a GPU, one per core but
    one (at most 16)."""
    strict: bool = False
    """Stop at an unreadable input instead of skipping and reporting it."""
    overwrite: bool = False
    """Replace activations already in the run folder."""


def _load(dataset, strict: bool, index: int):
    try:
        return dataset[index]
    except UnreadableExample as e:
        if strict:
            raise
        return {"index": index, "id": e.example_id, "reason": e.reason}


def _collate(prepare, examples: list):
    """(the examples without their inputs, the skipped ones, the prepared batch). The decoded inputs stay
    in the loader process: the main process would otherwise unpickle every batch's images again (50 MB
    for 256 images of 256 x 256 pixels) while it should be feeding the GPU."""
    good = [e for e in examples if not isinstance(e, dict)]
    skipped = [e for e in examples if isinstance(e, dict)]
    batch = prepare([e.input for e in good]) if good else None
    return [dataclasses.replace(e, input=None) for e in good], skipped, batch


class _Ordered(torch.utils.data.Dataset):
    def __init__(self, dataset, order, strict):
        self.dataset, self.order, self.strict = dataset, order, strict

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return _load(self.dataset, self.strict, int(self.order[i]))


def _launch(adapter, batch, good, hooks, tokens, dtype) -> tuple[dict[str, torch.Tensor], int, torch.cuda.Event | None]:
    """Starts one batch: the forward pass, the selected tokens' rows, and on a GPU their copy into pinned
    host memory, all queued without waiting (the rows are selected by index: a boolean mask would wait
    for the GPU to count them). Returns the columns, how many tokens the model saw, and the event that
    marks the copies done (None on the CPU)."""
    if batch is None:
        empty = {acts_column(h.name): torch.empty(0, adapter.d_model, dtype=dtype) for h in hooks}
        return {**empty, **{k: torch.empty(0, dtype=torch.int64) for k in ("example", "position", "label", "token")}}, \
            0, None
    acts = adapter.capture(batch, hooks)
    n_tokens = next(iter(acts.values())).shape[1]
    mask = adapter.select(batch, n_tokens, tokens)
    b, pos = mask.nonzero(as_tuple=True)
    b_dev, pos_dev = b.to(adapter.device, non_blocking=True), pos.to(adapter.device, non_blocking=True)
    columns = {acts_column(h): a[b_dev, pos_dev].to(dtype) for h, a in acts.items()}
    done = None
    if adapter.device.type == "cuda":
        for name, rows in list(columns.items()):
            columns[name] = torch.empty(rows.shape, dtype=dtype, pin_memory=True).copy_(rows, non_blocking=True)
        done = torch.cuda.Event()  # on the model's device's stream, where the copies were queued (not cuda:0's)
        done.record(torch.cuda.current_stream(adapter.device))
    columns["example"] = torch.tensor([e.index for e in good], dtype=torch.int64)[b]
    columns["position"] = pos.to(torch.int64)
    columns["label"] = torch.tensor([e.label for e in good], dtype=torch.int64)[b]
    token_ids = batch.token_ids_BT[b, pos] if batch.token_ids_BT is not None else torch.full_like(pos, -1)
    columns["token"] = token_ids.to(torch.int64)
    seen = int(batch.attention_BT.sum()) if batch.attention_BT is not None else mask.numel()
    return columns, seen, done


def _split(r: range, n: int) -> list[range]:
    """r in at most n consecutive, nearly equal, non-empty pieces."""
    size = -(-len(r) // n)
    return [r[i:i + size] for i in range(0, len(r), size)]


def _whole_batches(pieces, counts: list[int], adapter):
    """The forward batches, each joined from its `counts[i]` pieces (on the model's device, where the
    pinned pieces copy without blocking)."""
    for count in counts:
        parts = [next(pieces) for _ in range(count)]
        good = [e for part in parts for e in part[0]]
        skipped = [s for part in parts for s in part[1]]
        prepared = [part[2] for part in parts if part[2] is not None]
        if len(prepared) > 1:  # images only (text is never split): pixel tensors of one shape
            prepared = [Batch({k: _join([b.inputs[k].to(adapter.device, non_blocking=True) for b in prepared],
                                        adapter) for k in prepared[0].inputs})]
        yield good, skipped, prepared[0] if prepared else None


def _join(tensors: list[torch.Tensor], adapter) -> torch.Tensor:
    """One batch from its pieces' pixels; pieces that prepare() left as uint8 are finished first when
    others came finished (a processor whose resize gave fractions for some images only)."""
    if len({t.dtype for t in tensors}) > 1:
        tensors = [adapter.finish_pixels(t) if t.dtype == torch.uint8 else t for t in tensors]
    return torch.cat(tensors)


def _default_workers() -> int:
    """Every core but the main process's, up to 16: decoding and resizing images must keep up with a GPU
    (an H100 runs ViT-L/14 at ~2,200 images/s; one core prepares ~300)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cores - 1))


def harvest(cfg: HarvestConfig) -> dict:
    """Run the harvest; returns the store's manifest. Resumes a killed harvest in the same run folder."""
    with exclusive([Path(cfg.run) / "locks" / "acts.lock"], "saex harvest"):  # no train or index reads it meanwhile
        return _harvest(cfg)


def _harvest(cfg: HarvestConfig) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    dataset = open_dataset(cfg.dataset, cfg.split, cfg.data_path, cfg.text_field, cfg.label_field)
    if len(dataset) == 0:
        raise ValueError(f"dataset {cfg.dataset!r} (split {cfg.split!r}) is empty")
    model_dtype = None if cfg.model_dtype == "auto" else MODEL_DTYPES[cfg.model_dtype]
    adapter = load_model(cfg.model, device, model_dtype)
    if adapter.modality != dataset.modality:
        raise ValueError(f"model {cfg.model!r} reads {adapter.modality} but dataset {cfg.dataset!r} holds "
                         f"{dataset.modality}")
    hook_names = cfg.hook or [f"blocks.{max(adapter.n_layers - 2, 0)}.hook_resid_post"]
    hooks = list(dict.fromkeys(adapter.hook(h) for h in hook_names))
    tokens = adapter.check_tokens(cfg.tokens or DEFAULT_TOKENS[adapter.modality])
    n = min(len(dataset), cfg.max_examples) if cfg.max_examples is not None else len(dataset)
    if n < 1:
        raise ValueError(f"max_examples must be >= 1, got {cfg.max_examples}")
    order = (np.random.default_rng(cfg.seed).permutation(len(dataset))[:n] if cfg.order == "shuffled"
             else np.arange(n))

    header = {
        "model": cfg.model, "model_family": adapter.family.name, "modality": adapter.modality,
        "d_model": adapter.d_model, "hooks": [h.name for h in hooks], "tokens": tokens,
        "dataset": dataset.describe(), "label_names": dataset.label_names, "examples_planned": n,
        "order": cfg.order, "seed": cfg.seed, "dtype": cfg.dtype, "batch_size": cfg.batch_size,
        "context_size": cfg.context_size if adapter.modality == "text" else None,
    }
    store = Path(cfg.run) / "acts"
    writer = StoreWriter(store, header, cfg.shard_rows, cfg.overwrite)
    configs.save(cfg, store / "config.json")
    log = JsonlLog(cfg.run, "harvest")
    if writer.complete:
        print(f"{store} is already complete ({writer.manifest['rows']} rows); nothing to do")
        return writer.manifest
    start = writer.examples_done
    log.write("start", resume_from=start, **header)
    workers = cfg.workers if cfg.workers >= 0 else (_default_workers() if device != "cpu" else 0)
    # images: each batch is prepared in pieces, one per worker, so that the first batch is ready after a
    # worker's share of it, not a whole batch's worth of decoding (1.1 s for 256 images on one core)
    n_pieces = workers if adapter.modality == "image" and workers > 1 else 1
    splits = [_split(range(b, min(b + cfg.batch_size, n)), n_pieces) for b in range(start, n, cfg.batch_size)]
    pieces = torch.utils.data.DataLoader(
        _Ordered(dataset, order, cfg.strict),
        batch_sampler=[piece for split in splits for piece in split],
        collate_fn=partial(_collate, partial(adapter.prepare, context_size=cfg.context_size)),
        num_workers=workers, pin_memory=adapter.device.type == "cuda")
    batches = _whole_batches(iter(pieces), [len(split) for split in splits], adapter)
    bar = progress(n, f"harvest {Path(cfg.model).name}", "ex", initial=start)
    t0, tokens_seen, rows = time.perf_counter(), 0, 0

    def finish(good, skipped, columns, seen, done):
        nonlocal tokens_seen, rows
        if done is not None:
            done.synchronize()  # this batch's rows are on the host; the next batch's forward is queued
        writer.add(columns, [e.id for e in good], skipped)
        for s in skipped:
            bar.write(f"skipped unreadable input {s['id']}: {s['reason']}", file=sys.stderr)
        tokens_seen += seen
        rows += len(columns["example"])
        bar.update(len(good) + len(skipped))
        bar.set_postfix_str(f"{tokens_seen / (time.perf_counter() - t0):,.0f} tok/s")

    # one batch in flight: batch i+1's forward runs on the GPU while batch i's rows are written
    pending = None
    for good, skipped, batch in batches:
        launched = (good, skipped, *_launch(adapter, batch, good, hooks, tokens, STORE_DTYPES[cfg.dtype]))
        if pending is not None:
            finish(*pending)
        pending = launched
    if pending is not None:
        finish(*pending)
    bar.close()
    seconds = time.perf_counter() - t0
    rates = {"seconds": seconds, "examples_per_s": (n - start) / seconds, "tokens_per_s": tokens_seen / seconds,
             "rows_per_s": rows / seconds}
    manifest = writer.finish()
    log.write("end", rows=manifest["rows"], skipped=len(manifest["skipped"]), **rates)
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} unreadable inputs (listed in {store / 'manifest.json'})")
    print(f"harvested {manifest['rows']:,} rows of {', '.join(header['hooks'])} from {n:,} examples into {store} "
          f"({rates['examples_per_s']:,.1f} examples/s, {rates['tokens_per_s']:,.0f} tokens/s)")
    return manifest
