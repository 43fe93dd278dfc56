"""The scalar that input attribution explains: one SAE feature's magnitude at chosen token positions, as a
differentiable function of the model's input (pixels for images, input embeddings for text).

F(input) = sum over the chosen positions t of m_j(x_t), where x_t is the hooked activation at t and m_j
the feature's continuous magnitude (`feature_magnitude`). m_j equals the feature's code value wherever
the feature fires, for every architecture; unlike the code it never jumps, so F is continuous in the
input (piecewise smooth) and integrated gradients' completeness holds for it:

| architecture | m_j(x) | code value where it differs from m_j |
|---|---|---|
| relu | ReLU(z_j), z = (x - b_dec) W_enc + b_enc | never |
| topk, batchtopk | ReLU(z_j) | 0 when j is not among the k kept (batchtopk: z_j below its threshold) |
| jumprelu | ReLU(z_j) | 0 when 0 < z_j <= threshold_j (the code jumps there; m_j does not) |
| prolu | ReLU(m), m = (x - b_dec) W_enc[:, j] (the bias only gates) | 0 when m + b_enc[j] <= 0 |
| gated | ReLU(exp(r_mag_j) m + b_mag_j) | 0 when the gate m + b_enc[j] is closed |

`FeatureFn.code_value` reports the SAE's own code on the clean input beside it."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from saex.models.adapter import Batch, ModelAdapter
from saex.models.hooks import HookPoint


class _Reached(Exception):
    """Raised from the hook to stop the forward pass once F is known."""


def check_feature(sae, feature: int) -> int:
    """The feature id as an int (numpy and torch integers welcome), or a ValueError naming the valid range."""
    try:
        j = operator.index(feature) if not isinstance(feature, bool) else None
    except TypeError:
        j = None
    if j is None or not 0 <= j < sae.d_sae:
        raise ValueError(f"feature {feature!r} does not exist: this SAE has features 0..{sae.d_sae - 1}")
    return j


def feature_preact(sae, x_ND: torch.Tensor, feature: int) -> torch.Tensor:
    """[N]: what m_j is the ReLU of (module docstring's table), at each row of x; computes only column j of
    the encoder, so that it is cheap at any d_sae."""
    x_ND = x_ND.to(sae.W_enc_SD.dtype)
    m_N = (x_ND - sae.b_dec) @ sae.W_enc_SD[feature]
    arch = sae.cfg.architecture
    if arch == "prolu":
        return m_N
    if arch == "gated":
        return torch.exp(sae.arch.r_mag[feature]) * m_N + sae.arch.b_mag[feature]
    return m_N + sae.b_enc[feature]


def feature_magnitude(sae, x_ND: torch.Tensor, feature: int) -> torch.Tensor:
    """[N]: the continuous magnitude m_j of feature j at each row of x."""
    return torch.relu(feature_preact(sae, x_ND, feature))


@dataclass
class FeatureFn:
    """F for one input: call it on N inputs shaped like `input_1X` (pixels [N, C, H, W] or input embeddings
    [N, T, D]) to get F [N] (float32, differentiable with respect to them)."""

    adapter: ModelAdapter
    sae: object
    point: HookPoint
    feature: int
    positions: list[int]  # the token positions whose magnitudes F sums
    input_1X: torch.Tensor  # the clean input, detached
    attention_1T: torch.Tensor | None  # text only
    input_ids_T: torch.Tensor | None  # text only
    code_value: float  # the SAE's own code for the feature, summed over `positions`, on the clean input

    @property
    def modality(self) -> str:
        return self.adapter.modality

    def preacts(self, x_NX: torch.Tensor) -> torch.Tensor:
        """[N, P] float32: what m_j is the ReLU of, at each of the P positions, for each of N inputs."""
        out = {}

        def read(acts_NTD):
            pos = torch.as_tensor(self.positions, device=acts_NTD.device)
            out["z"] = feature_preact(self.sae, acts_NTD[:, pos], self.feature)
            raise _Reached

        handle = self.adapter._register(self.point, read)
        try:
            if self.modality == "image":
                self.adapter.backbone(pixel_values=x_NX)
            else:
                mask = self.attention_1T.expand(len(x_NX), -1)
                self.adapter.backbone(inputs_embeds=x_NX, attention_mask=mask)
        except _Reached:
            pass
        finally:
            handle.remove()
        if "z" not in out:
            raise RuntimeError(f"the forward pass of {self.adapter.name} never reached {self.point}")
        return out["z"].float()

    def __call__(self, x_NX: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.preacts(x_NX)).sum(-1)

    def value(self, x_NX: torch.Tensor, chunk: int = 16, pre: bool = False) -> torch.Tensor:
        """F [N] without gradients, `chunk` inputs per forward pass (pre: the pre-activations [N, P])."""
        f = self.preacts if pre else self
        with torch.no_grad():
            return torch.cat([f(x_NX[i:i + chunk]) for i in range(0, len(x_NX), chunk)])

    def grad(self, x_NX: torch.Tensor, weights_NP: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(F [N], dF/dx shaped like x); with `weights`, the gradient of sum_t w_t z_t instead (each
        position's pre-activation z_t, weighted). Rows are independent inputs, so the gradient of the sum
        is each row's own gradient."""
        with torch.inference_mode(False), torch.enable_grad():
            x = x_NX.detach().clone().requires_grad_(True)
            z_NP = self.preacts(x)
            f_N = torch.relu(z_NP).sum(-1)
            target = f_N if weights_NP is None else z_NP * weights_NP.to(z_NP.device)
            (g,) = torch.autograd.grad(target.sum(), x)
        return f_N.detach(), g

    def per_unit(self, t_1X: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the input, summed to one value per pixel [H, W] or per token [T]."""
        return t_1X[0].sum(0) if self.modality == "image" else t_1X[0].sum(-1)

    def token_strings(self) -> list[str] | None:
        if self.input_ids_T is None:
            return None
        return list(self.adapter.processor.convert_ids_to_tokens(self.input_ids_T.tolist()))


def feature_fn(adapter: ModelAdapter, sae, point: str | HookPoint, tokens: str, feature: int, batch: Batch,
               positions: list[int] | None = None) -> FeatureFn:
    """F of feature `feature` at hook `point` for the one input in `batch` (from adapter.prepare), summed over
    the positions that token selection `tokens` picks (or the given `positions`, each among them)."""
    point = adapter.hook(point) if isinstance(point, str) else point
    feature = check_feature(sae, feature)
    tokens = adapter.check_tokens(tokens)
    n = len(next(iter(batch.inputs.values())))
    if n != 1:
        raise ValueError(f"attribution explains one input at a time; this batch holds {n}")
    acts_1TD = adapter.capture(batch, [point])[point.name]
    selected = adapter.select(batch, acts_1TD.shape[1], tokens)[0].nonzero().flatten().tolist()
    if not selected:
        raise ValueError(f"token selection {tokens!r} selects no token of this input")
    if positions is None:
        positions = selected
    else:
        positions = [int(p) for p in positions]
        outside = [p for p in positions if p not in selected]
        if outside or not positions:
            raise ValueError(f"positions {outside or positions} are not among the tokens that {tokens!r} selects "
                             f"(valid: {_spans(selected)})")
    code_value = _code_value(sae, acts_1TD[0, positions], feature)
    batch = adapter.on_device(batch)
    with torch.inference_mode(False):
        if adapter.modality == "image":
            x = batch.inputs["pixel_values"].clone()
            return FeatureFn(adapter, sae, point, feature, positions, x, None, None, code_value)
        ids = batch.inputs["input_ids"].clone()
        with torch.no_grad():
            x = adapter.model.get_input_embeddings()(ids).detach()
        mask = batch.inputs["attention_mask"].clone()
        return FeatureFn(adapter, sae, point, feature, positions, x, mask, ids[0].cpu(), code_value)


def _code_value(sae, acts_PD: torch.Tensor, feature: int) -> float:
    with torch.inference_mode():
        x = acts_PD.to(sae.W_enc_SD.device, sae.W_enc_SD.dtype)
        return float(sae.encode(x).dense()[:, feature].sum())


def _spans(positions: list[int]) -> str:
    """[0, 1, 2, 5] -> '0..2, 5' (a selection of 256 patches reads as one span)."""
    spans, start = [], positions[0]
    for a, b in zip(positions, positions[1:] + [None]):
        if b != a + 1:
            spans.append(f"{start}..{a}" if a > start else f"{a}")
            start = b
    return ", ".join(spans)
