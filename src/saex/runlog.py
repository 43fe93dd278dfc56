"""Progress bars with rates and an ETA, and JSONL logs in the run folder."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


class JsonlLog:
    """Appends one JSON object per event to RUN/logs/<stage>.jsonl."""

    def __init__(self, run: str | Path, stage: str):
        self.path = Path(run) / "logs" / f"{stage}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), "event": event, **fields}) + "\n")


class WandbLog:
    """Optional mirror of a stage's metrics to Weights & Biases (`pip install wandb`)."""

    def __init__(self, project: str, run: str | Path, name: str, config: dict):
        try:
            import wandb
        except ImportError as e:
            raise ImportError(f"--wandb-project {project} needs wandb: pip install wandb") from e
        self._run = wandb.init(project=project, name=name, config=config, dir=str(run), reinit="finish_previous")

    def log(self, metrics: dict, step: int) -> None:
        self._run.log(metrics, step=step)

    def finish(self) -> None:
        self._run.finish()


def progress(total: int, desc: str, unit: str, initial: int = 0) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1,
                file=sys.stderr, mininterval=0.5)
