"""The feature lens: each feature's decoder vector (what it writes) and encoder vector (what it reads) read
through the model's readout (models.heads.lens_readout), as the logit lens reads a residual stream: the outputs
(tokens, classes, label prompts, nearest input tokens) each vector promotes and suppresses most, the
distribution of its weights over all outputs, the cosine of the two vectors' weight profiles, and the decoder's
logit-weight class (analysis/taxonomy.py).

The vector takes the direct path: the blocks after the hooked layer are skipped and the vector goes straight
into the final norm and the head. The norm is applied as it would be to a residual stream equal to the vector:
LayerNorm centres it, both norms divide it by its own root mean square (eps left out) and multiply by their
weight; the norm's bias and the head's bias are left out, since they add the same logits whatever the vector.
The division by the vector's own scale makes the weights of different features comparable (logits of a
residual at the norm's unit scale) and changes no ranking, cosine, skew or kurtosis. Readouts by cosine (nearest
input tokens of a sentence encoder, CLIP's label prompts) ignore the scale anyway.

Weights are computed a chunk of features at a time (chunk_bytes per [features, outputs] block), so 65,536
features over a 50k vocabulary never hold the dense matrix."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from saex.analysis.taxonomy import CLASSES, HEAVY, SIDED, SPLIT, SPLIT_MIN_OUTPUTS, classify, skew_kurtosis
from saex.runlog import progress

TOP = 10  # outputs kept per side and vector
BINS = 32  # bins of the logit-weight histogram
CHUNK_BYTES = 1 << 26  # one [features, outputs] float32 block; a chunk holds a few of them at once
SCATTER_PER_CLASS = 400  # points per class in the overview's skew-kurtosis scatter


@dataclass
class VectorLens:
    top_ids_SK: torch.Tensor  # outputs promoted most, strongest first
    top_SK: torch.Tensor
    bottom_ids_SK: torch.Tensor  # outputs suppressed most, most suppressed first
    bottom_SK: torch.Tensor


@dataclass
class FeatureLens:
    kind: str
    path: str
    names: list[str]
    dec: VectorLens
    enc: VectorLens
    vector_cos_S: torch.Tensor  # cosine of the encoder and decoder vectors
    weights_cos_S: torch.Tensor  # cosine of their weight profiles over all outputs
    skew_S: torch.Tensor  # of the decoder's weights (NaN: no spread)
    kurtosis_S: torch.Tensor  # Fisher (excess)
    classes: list[str]
    hist_SB: torch.Tensor  # counts of the decoder's weights in min(BINS, outputs) equal bins from lo_S to hi_S
    lo_S: torch.Tensor
    hi_S: torch.Tensor
    seconds: float = 0.0
    random: dict = field(default_factory=dict)  # the same statistics for random directions (random_baseline)


def output_weights(readout: dict, vectors_CD: torch.Tensor, out_VE: torch.Tensor | None = None) -> torch.Tensor:
    """[C, V] weight of every output for each vector, by the direct path (module docstring). `out_VE`: the
    readout's outputs already on the vectors' device (and normalised for a cosine readout)."""
    x = vectors_CD.float()
    pre = readout["pre_DE"].to(x.device)
    if out_VE is None:
        out_VE = readout["out_VE"].to(x.device)
        out_VE = F.normalize(out_VE, dim=1) if readout["cosine"] else out_VE
    if readout["norm"] == "layernorm":
        x = x - x.mean(1, keepdim=True)
    if readout["norm"] is not None:
        x = x / x.pow(2).mean(1, keepdim=True).sqrt().clamp_min(torch.finfo(x.dtype).tiny)
    y = x @ pre
    if readout["cosine"]:
        y = F.normalize(y, dim=1)
    return y @ out_VE.T


def _histogram(w_CV: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: counts in `bins` equal bins over [min, max] (the last bin closed), min, max."""
    lo, hi = w_CV.min(1).values, w_CV.max(1).values
    width = (hi - lo).clamp_min(torch.finfo(w_CV.dtype).tiny)
    b = ((w_CV - lo[:, None]) / width[:, None] * bins).long().clamp_(0, bins - 1)
    b += torch.arange(len(w_CV), device=w_CV.device)[:, None] * bins
    return torch.bincount(b.flatten(), minlength=len(w_CV) * bins).reshape(len(w_CV), bins), lo, hi


def feature_lens(readout: dict, W_dec_SD: torch.Tensor, W_enc_SD: torch.Tensor, top: int = TOP, bins: int = BINS,
                 device: str | torch.device = "cpu", chunk_bytes: int = CHUNK_BYTES,
                 show_progress: bool = True) -> FeatureLens:
    """The lens of every feature: rows of W_dec_SD (decoder vectors) and of W_enc_SD (encoder vectors, latent-major:
    the SAE's W_enc.T). `top` outputs per side, at most half the outputs (10 classes: 5 promoted, 5 suppressed)."""
    if W_dec_SD.shape != W_enc_SD.shape or W_dec_SD.dim() != 2:
        raise ValueError(f"W_dec {tuple(W_dec_SD.shape)} and W_enc (latent-major) {tuple(W_enc_SD.shape)} must both be "
                         "[d_sae, d_in]")
    if W_dec_SD.shape[1] != readout["pre_DE"].shape[0]:
        raise ValueError(f"the SAE's d_in {W_dec_SD.shape[1]} is not the model's width {readout['pre_DE'].shape[0]}")
    start = time.perf_counter()
    S, V = W_dec_SD.shape[0], readout["out_VE"].shape[0]
    k = max(1, min(top, V // 2))
    bins = min(bins, V)  # 10 classes: 10 bins
    out_VE = readout["out_VE"].to(device).float()
    out_VE = F.normalize(out_VE, dim=1) if readout["cosine"] else out_VE
    chunk = max(1, chunk_bytes // (4 * V))
    parts: dict[str, list] = {n: [] for n in ("dt", "dti", "db", "dbi", "et", "eti", "eb", "ebi", "wcos", "skew", "kurt",
                                              "hist", "lo", "hi")}
    bar = progress(S, "lens", "features") if show_progress else None
    with torch.inference_mode():
        for c0 in range(0, S, chunk):
            dec = output_weights(readout, W_dec_SD[c0:c0 + chunk].to(device), out_VE)
            enc = output_weights(readout, W_enc_SD[c0:c0 + chunk].to(device), out_VE)
            for name, w in (("d", dec), ("e", enc)):
                t, b = w.topk(k, dim=1), w.topk(k, dim=1, largest=False)
                parts[name + "t"].append(t.values.cpu()), parts[name + "ti"].append(t.indices.cpu())
                parts[name + "b"].append(b.values.cpu()), parts[name + "bi"].append(b.indices.cpu())
            parts["wcos"].append(F.cosine_similarity(dec, enc, dim=1).cpu())
            del enc
            skew, kurt = skew_kurtosis(dec)
            hist, lo, hi = _histogram(dec, bins)
            for name, v in (("skew", skew), ("kurt", kurt), ("hist", hist), ("lo", lo), ("hi", hi)):
                parts[name].append(v.cpu())
            if bar is not None:
                bar.update(len(dec))
    if bar is not None:
        bar.close()
    cat = {n: torch.cat(v) for n, v in parts.items()}
    vector_cos = F.cosine_similarity(W_dec_SD.float(), W_enc_SD.float(), dim=1).cpu()
    return FeatureLens(readout["kind"], readout["path"], readout["names"],
                       VectorLens(cat["dti"], cat["dt"], cat["dbi"], cat["db"]),
                       VectorLens(cat["eti"], cat["et"], cat["ebi"], cat["eb"]),
                       vector_cos, cat["wcos"], cat["skew"], cat["kurt"], classify(cat["skew"], cat["kurt"], V),
                       cat["hist"], cat["lo"], cat["hi"], time.perf_counter() - start)


def random_baseline(readout: dict, n: int = 512, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """The taxonomy's statistics for `n` random Gaussian directions through the same readout: where a direction
    with no structure falls (1st, 50th, 99th percentiles) and which classes it is given (a false-class rate)."""
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n, readout["pre_DE"].shape[0], generator=g).to(device)
    skew, kurt = skew_kurtosis(output_weights(readout, vectors))
    q = torch.tensor([0.01, 0.5, 0.99])
    counts = dict.fromkeys(CLASSES, 0)
    for c in classify(skew, kurt, readout["out_VE"].shape[0]):
        counts[c] += 1
    return {"n": n, "skew": [round(v, 4) for v in torch.nanquantile(skew.cpu().double(), q.double()).tolist()],
            "kurtosis": [round(v, 4) for v in torch.nanquantile(kurt.cpu().double(), q.double()).tolist()],
            "classes": counts}


def _symlog(x: float) -> float:
    return math.copysign(math.log10(1 + abs(x)), x)


def lens_meta(lens: FeatureLens, seed: int = 0) -> dict:
    """What the overview shows: counts per class, a skew-kurtosis scatter (up to SCATTER_PER_CLASS features of
    each class, at symlog10 coordinates sign(x) log10(1 + |x|)), the thresholds and the random baseline."""
    counts = dict.fromkeys(CLASSES, 0)
    by_class: dict[str, list[int]] = {c: [] for c in CLASSES}
    for j, c in enumerate(lens.classes):
        counts[c] += 1
        by_class[c].append(j)
    g = torch.Generator().manual_seed(seed)
    points = []
    skew, kurt = lens.skew_S.tolist(), lens.kurtosis_S.tolist()
    for c, members in by_class.items():
        if len(members) > SCATTER_PER_CLASS:
            members = sorted(members[i] for i in torch.randperm(len(members), generator=g)[:SCATTER_PER_CLASS].tolist())
        points += [[j, c, round(_symlog(skew[j]), 4), round(_symlog(kurt[j]), 4)] for j in members
                   if skew[j] == skew[j] and kurt[j] == kurt[j]]
    rnd = lens.random
    xs = [p[2] for p in points] + [_symlog(-SIDED), _symlog(SIDED)] + [_symlog(v) for v in rnd.get("skew", [])]
    ys = [p[3] for p in points] + [_symlog(SPLIT), _symlog(HEAVY)] + [_symlog(v) for v in rnd.get("kurtosis", [])]
    extent = {"x": [min(xs) - 0.05, max(xs) + 0.05], "y": [min(ys) - 0.05, max(ys) + 0.05]}
    ticks = {axis: [[v, round(_symlog(v), 4)] for v in (-1000, -100, -10, -3, -1, 0, 1, 3, 10, 100, 1000, 10000)
                    if lo <= _symlog(v) <= hi] for axis, (lo, hi) in extent.items()}
    return {"kind": lens.kind, "path": lens.path, "outputs": len(lens.names), "top": int(lens.dec.top_SK.shape[1]),
            "counts": counts, "points": points, "per_class": SCATTER_PER_CLASS, "extent": extent, "ticks": ticks,
            "thresholds": {"heavy": HEAVY, "sided": SIDED,
                           "split": SPLIT if len(lens.names) >= SPLIT_MIN_OUTPUTS else None,
                           "symlog": {"heavy": _symlog(HEAVY), "sided": _symlog(SIDED),
                                      "split": _symlog(SPLIT) if len(lens.names) >= SPLIT_MIN_OUTPUTS else None}},
            "random": rnd | ({"symlog": {"skew": [_symlog(v) for v in rnd["skew"]],
                                         "kurtosis": [_symlog(v) for v in rnd["kurtosis"]]}} if rnd else {}),
            "seconds": round(lens.seconds, 3)}


def lens_tables(lens: FeatureLens) -> dict[str, list[tuple]]:
    """Rows of the index's lens tables (explorer/schema.py): lens (feature, vector, rank, output, weight; rank
    0, 1, ... promoted, -1, -2, ... suppressed), lens_outputs (output, name) and lens_stats (feature, skew,
    kurtosis, lens_class, weights_cos, hist_lo, hist_hi, hist: JSON counts)."""
    rows = []
    for vector, v in (("dec", lens.dec), ("enc", lens.enc)):
        for j, (ti, tw, bi, bw) in enumerate(zip(v.top_ids_SK.tolist(), v.top_SK.tolist(), v.bottom_ids_SK.tolist(),
                                                 v.bottom_SK.tolist())):
            rows += [(j, vector, r, o, w) for r, (o, w) in enumerate(zip(ti, tw))]
            rows += [(j, vector, -1 - r, o, w) for r, (o, w) in enumerate(zip(bi, bw))]
    nan = lambda x: None if x != x else x  # noqa: E731  (SQLite stores NaN as NULL anyway; say so)
    stats = [(j, nan(s), nan(k), c, nan(wc), lo, hi, json.dumps(h))
             for j, (s, k, c, wc, lo, hi, h) in enumerate(zip(
                 lens.skew_S.tolist(), lens.kurtosis_S.tolist(), lens.classes, lens.weights_cos_S.tolist(),
                 lens.lo_S.tolist(), lens.hi_S.tolist(), lens.hist_SB.tolist()))]
    return {"lens": rows, "lens_outputs": list(enumerate(lens.names)), "lens_stats": stats}


@dataclass
class IndexLens:
    tables: dict[str, list[tuple]]
    meta: dict


def index_lens(manifest: dict, sae, device: str = "auto", model=None) -> IndexLens | None:
    """The lens and taxonomy that `saex index` stores, or None (with a message) where there is no model to read
    through: a toy store, a model that does not load, a model without readout, CLIP without label names."""
    from saex.models import load_model
    from saex.models.heads import lens_readout

    if manifest.get("modality") == "toy":
        print("lens skipped: a toy store has no model to read its features through", file=sys.stderr)
        return None
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    start = time.perf_counter()
    try:
        adapter = model or load_model(manifest["model"], device)
        readout = lens_readout(adapter, manifest.get("label_names"))
    except (ValueError, OSError) as e:
        print(f"lens skipped: {e}", file=sys.stderr)
        return None
    if readout is None:
        print(f"lens skipped: {manifest['model']} has no readout (LM head, classifier, label prompts or input "
              "embeddings) to read features through", file=sys.stderr)
        return None
    lens = feature_lens(readout, sae.W_dec.detach(), sae.W_enc_SD.detach(), device=device)
    lens.random = random_baseline(readout, device=device)
    lens.seconds = time.perf_counter() - start
    return IndexLens(lens_tables(lens), lens_meta(lens))
