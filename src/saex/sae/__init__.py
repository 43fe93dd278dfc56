"""The SAE: one module, with the architecture as a small pluggable part; save and load."""

from saex.sae.code import Code
from saex.sae.config import ARCHITECTURES, SAEConfig
from saex.sae.model import SAE

__all__ = ["ARCHITECTURES", "SAE", "Code", "SAEConfig"]
