"""Hook point names, as TransformerLens and the rest of the field spell them."""

from __future__ import annotations

import re
from dataclasses import dataclass

# in the order a block computes them: its input, what attention adds to the residual stream, the MLP's input
# (after its norm), what the MLP adds, the block's output
SITES = ("hook_resid_pre", "hook_attn_out", "hook_mlp_in", "hook_mlp_out", "hook_resid_post")
_PATTERN = re.compile(r"^blocks\.(\d+)\.(\w+)$")


@dataclass(frozen=True)
class HookPoint:
    layer: int
    site: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.site}"

    @property
    def order(self) -> tuple[int, int]:
        """When the forward pass reaches this point: later points have larger orders."""
        return self.layer, SITES.index(self.site)

    def __str__(self) -> str:
        return self.name


def all_hook_names(n_layers: int) -> list[str]:
    return [HookPoint(layer, site).name for layer in range(n_layers) for site in SITES]


def parse_hook(name: str, n_layers: int) -> HookPoint:
    """`blocks.{L}.hook_resid_post` etc.; errors name the valid layers and sites."""
    m = _PATTERN.match(name.strip())
    if not m:
        raise ValueError(f"hook point {name!r} is not of the form blocks.<layer>.<site> with site in {list(SITES)}, "
                         f"e.g. blocks.{n_layers - 1}.hook_resid_post")
    layer, site = int(m.group(1)), m.group(2)
    if site not in SITES:
        raise ValueError(f"hook point {name!r}: unknown site {site!r}; valid sites: {list(SITES)}")
    if layer >= n_layers:
        raise ValueError(f"hook point {name!r}: layer {layer} does not exist; this model has layers 0..{n_layers - 1}")
    return HookPoint(layer, site)
