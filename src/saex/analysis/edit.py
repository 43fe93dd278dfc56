"""One edit mechanism for every experiment on features: steering, ablation, transfer.

The model runs with the hooked activation of each selected token replaced by x + decode(f') - decode(f),
where f is the SAE's code of x and f' the code after the edits. The difference is (f' - f) W_dec, so
the SAE's error term x - decode(f) stays in place: with no edit the model computes exactly what it
computes without the SAE (the bug of splicing decode(f') alone, which loses the error), and adding a
feature adds exactly alpha times its decoder row to x.

Edits act on the dense code [T, S] of one example's selected tokens, in order:

| op | fields | f' |
|---|---|---|
| clamp | features, value | f[t, j] = value |
| scale | features, value | f[t, j] *= value |
| add | features, value | f[t, j] += value (x moves by value * W_dec[j]) |
| zero | features | f[t, j] = 0 (ablation) |
| copy | source, features (empty: those the source has where the input lacks them) | f[t, j] = source's f[t, j] |
| pair | source, target, features (empty: all) | f[t, :] += target's f[t] - source's f[t] |

A source is another example; token by token when it has as many selected tokens as the input (the
patches of two images), else its mean over its selected tokens. `positions` (token
positions, e.g. patches) limits an edit to those tokens; by default it applies to every selected one."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

OPS = {"clamp": "set features to value", "scale": "multiply features by value",
       "add": "add value times each feature's decoder direction", "zero": "ablate features",
       "copy": "copy features from the example `source`", "pair": "add the code of `target` minus that of `source`"}


@dataclass
class Edit:
    op: str
    """One of clamp, scale, add, zero, copy, pair."""
    features: list[int] = field(default_factory=list)
    """Latents the edit touches (copy: empty means those the source has and the input lacks; pair: all)."""
    value: float = 0.0
    """clamp: the value; scale: the factor; add: the strength alpha."""
    source: str | None = None
    """copy: the example to copy from; pair: A1, whose code is subtracted."""
    target: str | None = None
    """pair: A2, whose code is added."""
    positions: list[int] | None = None
    """Token positions to edit (None: every selected token)."""

    def check(self, d_sae: int) -> "Edit":
        if self.op not in OPS:
            raise ValueError(f"unknown edit op {self.op!r}; valid: {', '.join(OPS)}")
        bad = [j for j in self.features if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < d_sae]
        if bad:
            raise ValueError(f"{self.op}: features {bad} are not latents of this SAE (valid: 0..{d_sae - 1})")
        if self.op in ("clamp", "scale", "add", "zero") and not self.features:
            raise ValueError(f"{self.op} needs features (latent ids, 0..{d_sae - 1})")
        if self.op in ("copy", "pair") and self.source is None or self.op == "pair" and self.target is None:
            raise ValueError(f"{self.op} needs " + ("source and target examples" if self.op == "pair" else
                                                     "a source example"))
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool) or not math.isfinite(self.value):
            raise ValueError(f"{self.op}: value {self.value!r} must be a finite number")
        if self.positions is not None and (not isinstance(self.positions, list) or not self.positions or not all(
                isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in self.positions)):
            raise ValueError(f"{self.op}: positions {self.positions!r} must be a non-empty list of token positions "
                             "(integers >= 0), or absent for every selected token")
        return self

    def examples(self) -> list[str]:
        """The other examples this edit reads."""
        return [e for e in (self.source, self.target) if e is not None]


def parse_edits(items, d_sae: int, where: str = "edits") -> list[Edit]:
    """Edits from JSON-like dicts (an edit file's list), checked against an SAE of `d_sae` latents."""
    if not isinstance(items, list):
        raise ValueError(f"{where} must be a JSON list of edits, got {type(items).__name__}")
    names = set(Edit.__dataclass_fields__)
    edits = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "op" not in item:
            raise ValueError(f"{where}[{i}] must be an object with an 'op' ({', '.join(OPS)}), got {item!r}")
        unknown = sorted(set(item) - names)
        if unknown:
            raise ValueError(f"{where}[{i}] has unknown fields {unknown}; valid: {sorted(names)}")
        try:
            edit = Edit(**item)
            edit.features = [edit.features] if isinstance(edit.features, int) else list(edit.features)
            edits.append(edit.check(d_sae))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}[{i}]: {e}") from None
    return edits


def load_edits(path: str | Path, d_sae: int) -> list[Edit]:
    path = Path(path)
    try:
        items = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"edit file {path} does not exist") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    return parse_edits(items, d_sae, where=str(path))


def edits_json(edits: list[Edit]) -> list[dict]:
    """The edit file's form: only the fields an edit uses."""
    return [{k: v for k, v in asdict(e).items() if v not in (None, [], 0.0) or k == "op"} for e in edits]


def edit_code(f_TS: torch.Tensor, positions_T: torch.Tensor, edits: list[Edit],
              sources: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """f' from the dense code f [T, S] of one example's selected tokens at token positions [T];
    `sources` maps the example ids that copy and pair name to their codes [S]."""
    out = f_TS.clone()
    sources = sources or {}
    for e in edits:
        rows = slice(None) if e.positions is None else torch.isin(positions_T, torch.tensor(e.positions))
        if e.positions is not None:
            outside = sorted(set(e.positions) - set(positions_T.tolist()))
            if outside:
                raise ValueError(f"{e.op}: positions {outside} hold none of the selected tokens "
                                 f"{_span(positions_T.tolist())}")
        cols = torch.tensor(e.features, dtype=torch.long, device=out.device)
        block = out[rows]
        if e.op == "clamp":
            block[:, cols] = e.value
        elif e.op == "scale":
            block[:, cols] *= e.value
        elif e.op == "add":
            block[:, cols] += e.value
        elif e.op == "zero":
            block[:, cols] = 0
        elif e.op == "copy":
            src = _source(sources, e.source, len(out))[rows]
            if len(cols):
                block[:, cols] = src[:, cols]
            else:  # what the source has where this token lacks it
                block = torch.where((src > 0) & (block <= 0), src, block)
        else:  # pair
            delta = _source(sources, e.target, len(out))[rows] - _source(sources, e.source, len(out))[rows]
            if len(cols):
                block[:, cols] += delta[:, cols]
            else:
                block += delta
        out[rows] = block
    return out


def _span(positions: list[int]) -> str:
    return f"{positions}" if len(positions) <= 8 else f"{positions[:3]} ... {positions[-3:]}"


def _source(sources: dict[str, torch.Tensor], name: str, T: int) -> torch.Tensor:
    """Another example's code as [T, S]: token by token when it has as many selected tokens as the input
    (images of one model always do), else its mean over its tokens."""
    if name not in sources:
        raise ValueError(f"no code for example {name!r}; known: {sorted(sources)}")
    code = sources[name]
    if code.dim() == 2 and code.shape[0] == T:
        return code
    return (code.mean(0) if code.dim() == 2 else code).expand(T, -1)


def splice_edit(sae, mask_BT: torch.Tensor, positions_BT: torch.Tensor, edits: list[Edit] | list[list[Edit]],
                sources: dict[str, torch.Tensor] | None = None):
    """The function for ModelAdapter.run_edited: replaces each batch row's selected tokens' activations
    by x + (f' - f) W_dec. `edits` apply to every row, or (a list per row) each row gets its own."""
    per_row = bool(edits) and isinstance(edits[0], list)

    def replace(a_BTD: torch.Tensor) -> torch.Tensor:
        out = a_BTD.clone()
        mask = mask_BT.to(a_BTD.device)
        W_dec = sae.W_dec.float()
        for b in range(a_BTD.shape[0]):
            x_TD = a_BTD[b][mask[b]].float()
            f_TS = sae.encode(x_TD).dense()
            row_edits = edits[b] if per_row else edits
            delta_TS = edit_code(f_TS, positions_BT[b][mask[b].cpu()], row_edits, sources) - f_TS
            out[b][mask[b]] = (x_TD + delta_TS @ W_dec).to(a_BTD.dtype)
        return out

    return replace
