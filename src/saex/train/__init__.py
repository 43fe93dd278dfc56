"""The one training loop: schedules, dead latents, checkpoints, sweeps."""

from saex.train.config import TrainConfig, expand_sweep
from saex.train.loop import train

__all__ = ["TrainConfig", "expand_sweep", "train"]
