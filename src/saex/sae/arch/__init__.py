"""Architectures by name."""

from saex.sae.arch.base import Architecture, TrainContext, TrainOutput
from saex.sae.arch.gated import Gated
from saex.sae.arch.jumprelu import JumpReLU
from saex.sae.arch.prolu import ProLU
from saex.sae.arch.relu import ReLU
from saex.sae.arch.topk import BatchTopK, TopK

REGISTRY: dict[str, type[Architecture]] = {
    "relu": ReLU, "topk": TopK, "batchtopk": BatchTopK, "jumprelu": JumpReLU, "gated": Gated, "prolu": ProLU,
}

__all__ = ["REGISTRY", "Architecture", "TrainContext", "TrainOutput"]
