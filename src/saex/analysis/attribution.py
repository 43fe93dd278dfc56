"""Input attribution for one SAE feature on one input: gradient x input, integrated gradients (with its
completeness check) and occlusion; heat-map overlays for images, (token, value) lists for text.

Every method explains the same scalar F: the feature's continuous magnitude summed over the chosen token
positions (saex.analysis.feature_fn: equal to the feature's code value wherever it fires). Images are
attributed in the model's input space (normalised `pixel_values` [1, C, H, W]) and summed over channels to
[H, W]; text in the input embeddings (the backbone runs on `inputs_embeds`) and summed over the embedding
dimension to [T].

Baselines (integrated gradients' start and occlusion's filler), or a tensor shaped like the input:
- images: "zeros" (the default), the all-zero model input: for a normalising processor the dataset's mean
  colour; "black", pixel value 0 after normalisation.
- text: "pad" (the default), the pad token's embedding at every position (position embeddings, where the
  model adds them, stay); "zeros", the zero embedding. Not zeros by default: RMS-normalised models
  (Llama) scale a small embedding up to unit size, so F changes steeply just off a zero baseline and the
  integral there needs many more steps (completeness errors up to 50 % at 64 steps on a tiny Llama from
  zeros, under 0.1 % from the pad token). BERT's pad embedding is zero (its padding_idx).

Integrated gradients' quadrature: F is smooth wherever the model is (GELU, softmax, norms) but for the kink
of its ReLU where a position's pre-activation z_t crosses zero along the path. The plain midpoint rule
(rule="midpoint") errs by O(1/steps) at each kink: up to 1-12 % of F(x) - F(baseline) at 64 steps on
the tiny test models. The default rule="kinks" takes the same midpoints but weights each position's gradient
by the fraction of its cell over which z_t > 0, on a piecewise-linear model of z_t through a first,
gradient-free pass over the path (1.3-1.5x the time); its error is O(1/steps^2) at the kinks too:
under 0.2 % at 64 steps on the same models (1e-4 typical). rule="gausslegendre" (Captum's default) is
more accurate where F is smooth, no better at the kinks. The completeness check reports the error."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saex.analysis.feature_fn import FeatureFn, feature_fn
from saex.models.adapter import Batch, ModelAdapter
from saex.models.hooks import HookPoint

BASELINES = {"image": ("zeros", "black"), "text": ("pad", "zeros")}  # the first is the default
EPS = 1e-8  # relative_error's floor for |delta|: a feature silent at both ends reports its absolute error


@dataclass
class Attribution:
    kind: str  # gradient_x_input, integrated_gradients or occlusion
    feature: int
    values: torch.Tensor  # float32 [H, W] (images) or [T] (text)
    value: float  # F(x)
    code_value: float  # the SAE's own code value, summed over `positions` (F where the feature fires)
    point: str
    positions: list[int]
    params: dict = field(default_factory=dict)  # steps, baseline, window, stride
    completeness: dict | None = None  # integrated gradients: sum, delta, relative_error
    tokens: list[str] | None = None  # text: the token strings

    def token_values(self) -> list[tuple[str, float]]:
        """Text: (token, attribution) pairs in order."""
        if self.tokens is None:
            raise ValueError("token_values is for text attributions; this one is an image map "
                             f"{list(self.values.shape)}")
        return list(zip(self.tokens, self.values.tolist()))

    def to_json(self) -> dict:
        return {"kind": self.kind, "feature": self.feature, "value": self.value, "code_value": self.code_value,
                "point": self.point, "positions": self.positions, "params": self.params,
                "shape": list(self.values.shape), "values": self.values.tolist(),
                "completeness": self.completeness, "tokens": self.tokens}


def gradient_x_input(adapter: ModelAdapter, sae, point: str | HookPoint, tokens: str, feature: int, batch: Batch,
                     positions: list[int] | None = None) -> Attribution:
    """dF/dx * x, per pixel or per token."""
    fn = feature_fn(adapter, sae, point, tokens, feature, batch, positions)
    f_1, g = fn.grad(fn.input_1X)
    return _result(fn, "gradient_x_input", fn.per_unit(g.float() * fn.input_1X.float()), float(f_1[0]), {})


def integrated_gradients(adapter: ModelAdapter, sae, point: str | HookPoint, tokens: str, feature: int,
                         batch: Batch, positions: list[int] | None = None, steps: int = 64,
                         baseline: str | torch.Tensor | None = None, chunk: int = 16,
                         rule: str = "kinks") -> Attribution:
    """(x - x0) times the mean gradient along the straight path from the baseline x0 to x, over `steps`
    points (`chunk` per forward pass), by `rule` ("kinks", "midpoint" or "gausslegendre": the module
    docstring). `completeness` compares the attributions' sum with delta = F(x) - F(x0), which it equals
    in the limit of many steps: relative_error = |sum - delta| / max(|delta|, 1e-8)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    _check_chunk(chunk)
    alphas, weights = _rule(steps, rule)
    fn = feature_fn(adapter, sae, point, tokens, feature, batch, positions)
    x, (x0, base) = fn.input_1X, _baseline(fn, baseline)
    shape = (-1, *[1] * (x.dim() - 1))

    def path(a_K):
        return x0 + a_K.to(x.device, x.dtype).view(shape) * (x - x0)

    z_2P = fn.value(torch.cat([x, x0]), pre=True)  # z at the input and at the baseline
    f_x, f_0 = torch.relu(z_2P).sum(-1).tolist()
    gates = None
    if rule == "kinks":  # each position's ReLU gate, integrated over each cell: a first pass reads z
        gates = _gate_fractions(fn.value(path(alphas), chunk, pre=True), z_2P[1], z_2P[0])
    total = torch.zeros_like(x, dtype=torch.float32)
    for i in range(0, steps, chunk):
        _, g = fn.grad(path(alphas[i:i + chunk]), None if gates is None else gates[i:i + chunk])
        total += (g.float() * weights[i:i + chunk].to(x.device, torch.float32).view(shape)).sum(0, keepdim=True)
    attr = fn.per_unit((x - x0).float() * total)
    s, delta = float(attr.sum()), f_x - f_0
    completeness = {"sum": s, "delta": delta, "relative_error": abs(s - delta) / max(abs(delta), EPS),
                    "f_input": f_x, "f_baseline": f_0}
    return _result(fn, "integrated_gradients", attr, f_x, {"steps": steps, "rule": rule, "baseline": base},
                   completeness)


def occlusion(adapter: ModelAdapter, sae, point: str | HookPoint, tokens: str, feature: int, batch: Batch,
              positions: list[int] | None = None, window: int | None = None, stride: int | None = None,
              baseline: str | torch.Tensor | None = None, chunk: int = 16) -> Attribution:
    """F(x) - F(x with a window replaced by the baseline), for every window; a pixel or token gets the mean
    over the windows that cover it (0 if none does). Images: square windows of `window` pixels (default the
    model's patch size) every `stride` pixels (default `window`); text: `window` tokens (default 1) every
    `stride` tokens (default 1). The last window is moved back to end at the edge, so every unit is covered."""
    _check_chunk(chunk)
    fn = feature_fn(adapter, sae, point, tokens, feature, batch, positions)
    x, (x0, base) = fn.input_1X, _baseline(fn, baseline)
    image = fn.modality == "image"
    sizes = tuple(x.shape[-2:]) if image else (x.shape[1],)
    window = (adapter.backbone.config.patch_size if image else 1) if window is None else window
    stride = (window if image else 1) if stride is None else stride
    for name, v in (("window", window), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= min(sizes):
            what = "pixels" if image else "tokens"
            raise ValueError(f"{name} must be an integer in 1..{min(sizes)} ({what} of this input), got {v!r}")
    starts = [_starts(n, window, stride) for n in sizes]
    boxes = [(a, b) for a in starts[0] for b in starts[1]] if image else [(a,) for a in starts[0]]
    drops, covered = torch.zeros(sizes), torch.zeros(sizes)
    per_pass = max(chunk - 1, 1)  # windows per forward pass, beside the clean input
    for i in range(0, len(boxes), per_pass):
        part = boxes[i:i + per_pass]
        # the clean input rides in every forward pass: BLAS sums a batch of one in another order, and a
        # window that F never reads should show exactly 0, not rounding noise
        inputs = x.repeat(len(part) + 1, *[1] * (x.dim() - 1))
        for r, box in enumerate(part, 1):
            inputs[(r, *_region(box, window, image))] = x0[(0, *_region(box, window, image))]
        f_clean, *f_occluded = fn.value(inputs, len(inputs)).tolist()
        for box, f in zip(part, f_occluded):
            drops[_region(box, window, False)] += f_clean - f
            covered[_region(box, window, False)] += 1
    f_x = f_clean
    values = torch.where(covered > 0, drops / covered.clamp_min(1), torch.zeros(()))
    return _result(fn, "occlusion", values, f_x, {"window": window, "stride": stride, "baseline": base})


def _region(box: tuple, window: int, channels: bool) -> tuple:
    """The index of one window in [H, W] or [T] (with `channels`: in [C, H, W]; [T, D] needs none)."""
    spatial = tuple(slice(s, s + window) for s in box)
    return (slice(None), *spatial) if channels else spatial


def _starts(n: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, n - window + 1, stride))
    if starts[-1] + window < n:
        starts.append(n - window)
    return starts


RULES = ("kinks", "midpoint", "gausslegendre")


def _rule(steps: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Path points alpha [K] in (0, 1) and their quadrature weights [K] (float64)."""
    if rule in ("kinks", "midpoint"):
        alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
        return alphas, torch.full((steps,), 1 / steps, dtype=torch.float64)
    if rule == "gausslegendre":
        import numpy as np

        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)
    raise ValueError(f"rule {rule!r} is not one of {list(RULES)}")


def _gate_fractions(z_KP: torch.Tensor, z_start_P: torch.Tensor, z_end_P: torch.Tensor) -> torch.Tensor:
    """[K, P]: the fraction of midpoint cell k over which position p's pre-activation is positive, on the
    piecewise-linear path through its values at the cells' midpoints and at the two ends (a cell's inner
    edges take the mean of the midpoints on either side)."""
    edges = torch.cat([z_start_P[None], (z_KP[:-1] + z_KP[1:]) / 2, z_end_P[None]])
    return (_positive_part(edges[:-1], z_KP) + _positive_part(z_KP, edges[1:])) / 2


def _positive_part(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The fraction of the straight segment from a to b on which it is positive."""
    crossing = torch.maximum(a, b).clamp_min(0) / (a - b).abs().clamp_min(1e-30)
    return torch.where((a > 0) & (b > 0), 1.0, torch.where((a <= 0) & (b <= 0), 0.0, crossing.clamp(0, 1)))


def _check_chunk(chunk: int) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk (inputs per forward pass) must be an integer >= 1, got {chunk!r}")


def _baseline(fn: FeatureFn, baseline: str | torch.Tensor | None) -> tuple[torch.Tensor, str]:
    """The baseline input [1, ...] and its name."""
    x = fn.input_1X
    if isinstance(baseline, torch.Tensor):
        if baseline.shape not in (x.shape, x.shape[1:]):
            raise ValueError(f"baseline of shape {list(baseline.shape)} does not match the input "
                             f"{list(x.shape)} (or {list(x.shape[1:])})")
        return baseline.to(x.device, x.dtype).reshape(x.shape), "tensor"
    valid = BASELINES[fn.modality]
    name = valid[0] if baseline is None else baseline
    if name not in valid:
        raise ValueError(f"baseline {name!r} is not valid for {fn.modality}; valid: {list(valid)} or a tensor "
                         f"shaped like the input {list(x.shape)}")
    if name == "zeros":
        return torch.zeros_like(x), name
    if name == "black":
        return fn.adapter.finish_pixels(torch.zeros(x.shape, device=x.device)).to(x.dtype), name
    pad = fn.adapter.processor.pad_token_id
    emb = fn.adapter.model.get_input_embeddings()
    with torch.no_grad():
        return emb(torch.full(x.shape[:2], pad, device=x.device)).detach().to(x.dtype), name


def _result(fn: FeatureFn, kind: str, values: torch.Tensor, value: float, params: dict,
            completeness: dict | None = None) -> Attribution:
    return Attribution(kind, fn.feature, values.detach().float().cpu(), value, fn.code_value, fn.point.name,
                       fn.positions, params, completeness, fn.token_strings())


# -- figures ----------------------------------------------------------------------------------------


def model_image(adapter: ModelAdapter, batch: Batch):
    """The first image of `batch` as the model sees it (after resizing and cropping), as a PIL image."""
    from PIL import Image

    pixels = batch.inputs["pixel_values"][0].detach().float().cpu()
    if batch.inputs["pixel_values"].dtype != torch.uint8:  # finished: undo normalise and rescale
        zero = adapter.finish_pixels(torch.zeros(1, *pixels.shape))[0]
        one = adapter.finish_pixels(torch.ones(1, *pixels.shape))[0]
        pixels = (pixels - zero) / (one - zero)
    array = pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def overlay_png(image, values_HW: torch.Tensor, path: str | Path | None = None, cmap: str = "RdBu_r",
                alpha: float = 0.5, colorbar: bool = True) -> bytes:
    """PNG bytes (also written to `path` if given) of the image in grey under a heat map of the attributions,
    on a colour scale symmetric about zero (red: raises the feature, blue: lowers it). The image is resized
    to the map's [H, W]; `model_image` gives it as the model saw it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = values_HW.detach().float().cpu()
    if values.dim() != 2:
        raise ValueError(f"overlay_png needs a [H, W] map, got shape {list(values.shape)}")
    H, W = values.shape
    grey = image.convert("L").resize((W, H))
    vmax = float(values.abs().max()) or 1.0
    fig, ax = plt.subplots(figsize=(4.5 if colorbar else 4, 4), dpi=100)
    ax.imshow(grey, cmap="gray", interpolation="nearest")
    heat = ax.imshow(values.numpy(), cmap=cmap, alpha=alpha, vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    if colorbar:
        fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


METHODS = ("integrated-gradients", "gradient-x-input", "occlusion")


def compute(method: str, adapter: ModelAdapter, sae, point: str | HookPoint, tokens: str, feature: int, batch: Batch,
            positions: list[int] | None = None, steps: int = 64, window: int | None = None) -> Attribution:
    """The attribution by one of METHODS' names (those of `saex attribute --method` and the explorer)."""
    if method == "integrated-gradients":
        return integrated_gradients(adapter, sae, point, tokens, feature, batch, positions, steps=steps)
    if method == "gradient-x-input":
        return gradient_x_input(adapter, sae, point, tokens, feature, batch, positions)
    if method == "occlusion":
        return occlusion(adapter, sae, point, tokens, feature, batch, positions, window=window, stride=window)
    raise ValueError(f"unknown attribution method {method!r}; valid: {', '.join(METHODS)}")
