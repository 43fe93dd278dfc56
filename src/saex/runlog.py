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


def progress(total: int, desc: str, unit: str, initial: int = 0) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1,
                file=sys.stderr, mininterval=0.5)
