"""Ablation of every feature on its own top examples: the model runs with the feature zeroed at the
selected tokens of each example (the edit mechanism, `splice_edit`, error term kept) and the readout
is compared with the clean run's.

Per feature, over up to `examples` of its top examples: the mean KL(clean || ablated) of the output
distribution, the mean change of each output's probability (classes, label prompts; the next token),
the output that loses most and the one that gains most, and `loss_delta`, the mean increase of the
downstream loss: the cross-entropy of the example's true label (classifiers, zero-shot), the mean
next-token loss over the example's positions (causal LMs), 1 - cosine with the clean embedding
(sentence encoders, whose KL is undefined). These are measured on the feature's top examples, where it
fires most, not on held-out ones: a held-out example where the feature is silent costs a forward pass
and shows nothing, and the stage's time budget has no room for the many that would be needed.

Rows are batched across features: one clean row per example, then one row per (feature, example) pair
that example takes part in. For images the rows of one example share its forward pass up to the hook
(the hook fans the example's activations out to its rows), since nothing before the hook differs."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from saex.analysis.edit import Edit, splice_edit
from saex.models.heads import head_kind, prompt_features, readout
from saex.runlog import progress
from saex.threads import ThreadTuner

ALL_OUTPUTS = 100  # up to this many outputs (classes, prompts): each one's change is kept; beyond: the extremes
EXTREMES = 10  # ... the outputs whose probability drops most and the ones that rise most
LOGITS_BYTES = 1 << 28  # next-token logits [rows, tokens, vocab] of one forward stay below this


class NoReadout(ValueError):
    """The model has nothing downstream to compare (no classifier, prompts, next token or embedding)."""


@dataclass
class FeatureAblation:
    feature: int
    examples: int
    """Top examples it was ablated on."""
    kl: float | None
    """Mean KL(clean || ablated) of the readout's distribution, nats (None for sentence embeddings)."""
    loss_delta: float | None
    """Mean increase of the downstream loss (None where no example has a true label)."""
    outputs: list[tuple[str, float]]
    """(output, mean change of its probability): every output, or the extremes of a long vocabulary."""
    loses: tuple[str, float] | None
    """The output whose probability drops most, and the mean change (None if none drops)."""
    gains: tuple[str, float] | None


@dataclass
class Ablation:
    readout: str
    """classifier, zero_shot, next_token or embedding (models.heads.head_kind)."""
    examples_per_feature: int
    features: list[FeatureAblation]
    seconds: float


def ablate_features(adapter, sae, point, tokens: str, dataset, example_SK: torch.Tensor, examples: int = 16,
                    label_names: list[str] | None = None, context: int = 128, batch_rows: int = 256,
                    show_progress: bool = True) -> Ablation:
    """Ablate every feature with top examples (row j of `example_SK`: dataset indices, best first, -1 for
    none) on its first `examples` of them. `tokens`: the token selection the SAE was trained on.
    Raises NoReadout for a model with no readout."""
    if examples < 1 or batch_rows < 2:
        raise ValueError(f"examples ({examples}) must be >= 1 and batch_rows ({batch_rows}) >= 2")
    start = time.perf_counter()
    kind = head_kind(adapter)
    if kind is None:
        raise NoReadout(f"{adapter.name} has no readout (classifier, zero-shot prompts, next token or embedding) "
                        f"to compare an ablation with")
    if kind == "zero_shot" and not label_names:
        raise NoReadout(f"{adapter.name} reads out through label prompts, and the dataset has no label names")
    prompts = prompt_features(adapter, label_names) if kind == "zero_shot" else None
    top_SN = example_SK[:, :examples].cpu()
    todo = {j: [e for e in row if e >= 0] for j, row in enumerate(top_SN.tolist())}
    todo = {j: exs for j, exs in todo.items() if exs}
    # images: an example's rows fan out at the hook (nothing before it differs); text rows carry their own
    # attention masks, so each row is its own input there
    fan_out = adapter.modality == "image" and point.site in ("hook_resid_post", "hook_resid_pre")
    if kind == "next_token":  # every position's logits: rows * context * vocab floats
        vocab = adapter.model.get_output_embeddings().weight.shape[0]
        batch_rows = min(batch_rows, max(2, LOGITS_BYTES // (4 * context * vocab)))
    sums = _Sums(kind, label_names if kind == "zero_shot" else None, adapter, todo)
    bar = progress(len(todo), f"ablate {len(todo):,} features", "features") if show_progress else None
    # Many small forward passes and a few tiny ops per row: beside a busy process on the same cores torch's
    # thread team waits on every op (the demo's pass on 2 cores: 3 s alone; beside one busy loop 120 s with
    # 2 threads, 4 s with 1, 5-8 s tuned). The tuner of saex/threads.py picks the count; it probes at once,
    # since a pass of seconds cannot wait for a slowdown to show against a typical time.
    threads, tuner = torch.get_num_threads(), ThreadTuner(active=adapter.device.type == "cpu")
    tuner.probe()
    try:
        # a long vocabulary keeps per-feature sums only while a feature is in flight: features in order;
        # otherwise each example's rows go together, once
        for chunk in _chunks(todo, by_example=kind != "next_token", batch_rows=batch_rows):
            items = [dataset[e] for e, _ in chunk]
            rows = _Rows(chunk)
            with tuner.timed():
                out = _forward(adapter, sae, point, tokens, kind, prompts, context, items, rows, fan_out)
            done = sums.add(rows, out)
            if bar is not None:
                bar.update(done)
    finally:
        torch.set_num_threads(threads)  # process-wide: the tuner's count ends with the pass
        if bar is not None:
            bar.close()
    return Ablation(kind, examples, [sums.result(j) for j in sorted(todo)], time.perf_counter() - start)


def _chunks(todo: dict[int, list[int]], by_example: bool, batch_rows: int):
    """Lists of (example, features to ablate on it) with at most batch_rows rows (one clean row per example
    plus one per feature). by_example: every example once, with all its features, in the order the features'
    lists reach it (so features finish progressively); else pairs in feature order."""
    if by_example:
        features_of = defaultdict(list)
        for j, exs in todo.items():
            for e in exs:
                features_of[e].append(j)
        units = [(e, features_of[e]) for e in dict.fromkeys(e for exs in todo.values() for e in exs)]
    else:
        units = [(e, [j]) for j, exs in todo.items() for e in exs]
    chunk, rows = {}, 0
    for e, features in units:
        while features:
            room = batch_rows - rows - (e not in chunk)
            if room < 1:
                yield list(chunk.items())
                chunk, rows = {}, 0
                continue
            rows += (e not in chunk) + min(room, len(features))
            chunk.setdefault(e, []).extend(features[:room])
            features = features[room:]
    if chunk:
        yield list(chunk.items())


class _Rows:
    """A chunk's rows: first one clean row per example, then one per (feature, example) pair."""

    def __init__(self, chunk: list[tuple[int, list[int]]]):
        self.n_examples = len(chunk)
        pair_example = [k for k, (_, features) in enumerate(chunk) for _ in features]
        self.example_R = torch.tensor(list(range(len(chunk))) + pair_example)  # position of its example
        self.feature_P = torch.tensor([j for _, features in chunk for j in features])

    def __len__(self) -> int:
        return len(self.example_R)


@torch.inference_mode()
def _forward(adapter, sae, point, tokens, kind, prompts, context, items, rows: _Rows, fan_out: bool) -> dict:
    """The readout of every row, with "loss" [R] (the true label's cross-entropy or the next-token loss)."""
    inputs = [it.input for it in items] if fan_out else [items[k].input for k in rows.example_R.tolist()]
    batch = adapter.prepare(inputs, context)
    source_R = rows.example_R if fan_out else torch.arange(len(rows))
    E = rows.n_examples

    def ablate(a_BTD: torch.Tensor) -> torch.Tensor:
        a_RTD = a_BTD.index_select(0, source_R.to(a_BTD.device))
        mask_RT = adapter.select(batch, a_BTD.shape[1], tokens).index_select(0, source_R)
        positions_PT = torch.arange(a_BTD.shape[1]).expand(len(rows) - E, -1)
        edits = [[Edit("zero", [j])] for j in rows.feature_P.tolist()]
        a_RTD[E:] = splice_edit(sae, mask_RT[E:], positions_PT, edits)(a_RTD[E:])
        return a_RTD

    labels_R = torch.tensor([it.label for it in items])[rows.example_R].to(adapter.device)
    return adapter.run_edited(lambda: _readout_and_loss(adapter, batch, kind, prompts, labels_R), point, ablate)


def _readout_and_loss(adapter, batch, kind, prompts, labels_R) -> dict:
    if kind == "next_token":  # one forward for both: the loss needs the logits at every position
        inputs = adapter.on_device(batch).inputs
        logits_RTV = adapter.model(**inputs).logits.float()
        mask_RT = inputs["attention_mask"]
        last_R = mask_RT.sum(1) - 1  # readout's next token after the last real one
        ids_RT, valid_RT = inputs["input_ids"][:, 1:], (mask_RT[:, 1:] * mask_RT[:, :-1]).bool()
        nll_RT = F.cross_entropy(logits_RTV[:, :-1].transpose(1, 2), ids_RT, reduction="none")
        loss_R = (nll_RT * valid_RT).sum(1) / valid_RT.sum(1)  # nan for a one-token example
        return {"logits": logits_RTV[torch.arange(len(logits_RTV)), last_R], "loss": loss_R}
    out = readout(adapter, batch, kind, prompts)
    if "logits" in out:
        valid_R = (labels_R >= 0) & (labels_R < out["logits"].shape[1])
        nll_R = F.cross_entropy(out["logits"].float(), labels_R.clamp(0, out["logits"].shape[1] - 1),
                                reduction="none")
        out["loss"] = torch.where(valid_R, nll_R, torch.full_like(nll_R, float("nan")))
    return out


def row_effect(clean_PC: torch.Tensor, ablated_PC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the change of each output's probability [P, C] and KL(clean || ablated) [P], nats
    (effect.mean_effect is their mean over rows)."""
    p, q = F.log_softmax(clean_PC.float(), -1), F.log_softmax(ablated_PC.float(), -1)
    return q.exp() - p.exp(), (p.exp() * (p - q)).sum(-1)


class _Sums:
    """Per feature in flight: sums over the examples done so far; a feature's result once all are done."""

    def __init__(self, kind: str, label_names, adapter, todo: dict[int, list[int]]):
        self.kind, self.label_names, self.adapter = kind, label_names, adapter
        self.left = {j: len(exs) for j, exs in todo.items()}
        self.n = {j: len(exs) for j, exs in todo.items()}
        self.partial: dict[int, list] = {}  # feature -> [delta sum [C] or None, kl sum, loss sum, loss count]
        self.results: dict[int, FeatureAblation] = {}

    def add(self, rows: _Rows, out: dict) -> int:
        """Adds a chunk's rows; returns how many features it finished."""
        E, clean_P = rows.n_examples, rows.example_R[rows.n_examples:]
        device = next(iter(out.values())).device
        clean_P, feature_P = clean_P.to(device), rows.feature_P.to(device)
        if self.kind == "embedding":
            emb = out["embedding"].float()
            loss_P, delta_PC, kl_P = 1 - F.cosine_similarity(emb[E:], emb[clean_P], dim=-1), None, None
        else:
            delta_PC, kl_P = row_effect(out["logits"][clean_P], out["logits"][E:])
            loss_P = out["loss"][E:] - out["loss"][clean_P]
        features, inverse = feature_P.unique(return_inverse=True)
        U = len(features)

        def by_feature(x_P):
            return torch.zeros((U, *x_P.shape[1:]), dtype=torch.float64, device=device).index_add_(
                0, inverse, x_P.double()).cpu()

        has_loss = ~torch.isnan(loss_P)
        delta = by_feature(delta_PC) if delta_PC is not None else [None] * U
        kl = by_feature(kl_P).tolist() if kl_P is not None else [0.0] * U
        loss, loss_n = by_feature(torch.where(has_loss, loss_P, 0)).tolist(), by_feature(has_loss).tolist()
        counts = torch.bincount(inverse, minlength=U).tolist()
        finished = 0
        for u, j in enumerate(features.tolist()):
            acc = self.partial.setdefault(j, [None, 0.0, 0.0, 0.0])
            if delta[u] is not None:
                acc[0] = delta[u] if acc[0] is None else acc[0] + delta[u]
            acc[1] += kl[u]
            acc[2] += loss[u]
            acc[3] += loss_n[u]
            self.left[j] -= counts[u]
            if not self.left[j]:
                self.results[j] = self._finish(j, *self.partial.pop(j))
                finished += 1
        return finished

    def _finish(self, j: int, delta_C, kl: float, loss: float, loss_n: float) -> FeatureAblation:
        n = self.n[j]
        loss_delta = loss / loss_n if loss_n else None
        if delta_C is None:
            return FeatureAblation(j, n, None, loss_delta, [], None, None)
        mean_C = (delta_C / n).float()
        if len(mean_C) <= ALL_OUTPUTS:
            keep = list(range(len(mean_C)))
        else:
            k = min(EXTREMES, len(mean_C))
            keep = [i for i in mean_C.topk(k, largest=False).indices.tolist() if mean_C[i] < 0] + \
                [i for i in mean_C.topk(k).indices.tolist() if mean_C[i] > 0]
        name = self._name
        low, high = int(mean_C.argmin()), int(mean_C.argmax())
        return FeatureAblation(j, n, kl / n, loss_delta, [(name(i), float(mean_C[i])) for i in keep],
                               (name(low), float(mean_C[low])) if mean_C[low] < 0 else None,
                               (name(high), float(mean_C[high])) if mean_C[high] > 0 else None)

    def _name(self, i: int) -> str:
        """What the model calls output i: its class, the label of the prompt, the token."""
        if self.kind == "zero_shot":
            return self.label_names[i]
        if self.kind == "next_token":
            return self.adapter.processor.decode([i])
        return (self.adapter.model.config.id2label or {}).get(i, str(i))

    def result(self, j: int) -> FeatureAblation:
        return self.results[j]
