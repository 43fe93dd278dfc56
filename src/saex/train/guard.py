"""What stops a training run before it saves something wrong: a shard whose bytes changed since the
harvest (sha256, checked in a background thread), activation rows holding NaN or infinity, and an SAE
whose loss stopped being finite. On the CPU every step is checked; on a GPU the checks that would wait
for it run when the loop logs or checkpoints, and say which step or rows were at fault."""

from __future__ import annotations

import sys
import threading

import torch

from saex.store import ActivationStore


class Guard:
    def __init__(self, store: ActivationStore, columns: list[str], verify: bool, defer: bool):
        self.store, self.columns, self.defer = store, columns, defer
        self._stop = threading.Event()
        self.hashes = store.verify_in_background(self._stop) if verify else None
        self.all_finite: torch.Tensor | None = None  # deferred: every batch so far held finite values

    def note_batch(self, x_BD: torch.Tensor) -> None:
        """Deferred: remember whether the batch was finite, without waiting for the device."""
        finite = torch.isfinite(x_BD).all()
        self.all_finite = finite if self.all_finite is None else self.all_finite & finite

    def check(self, trainees, hashes: bool = True) -> None:
        """Raise at the first problem found so far: non-finite input, then a diverged SAE, then a hash."""
        if self.all_finite is not None and not bool(self.all_finite):
            self.finite_rows(torch.full((1, 1), float("nan")), skip=False)  # raises, naming the store's rows
        for t in trainees:
            t.check_finite()
        if hashes and self.hashes is not None and self.hashes.done():
            self.hashes.result()

    def finish(self, trainees) -> None:
        """Before anything is saved: every check, the whole store's hashes included."""
        if self.hashes is not None and not self.hashes.done():
            print("checking the rest of the store's sha256 before saving (--no-verify skips it)", file=sys.stderr)
        if self.hashes is not None:
            self.hashes.result()
        self.check(trainees)

    def stop(self) -> None:
        """End the background hashing (after the run, or when it fails)."""
        self._stop.set()

    def finite_rows(self, x_BD: torch.Tensor, skip: bool) -> torch.Tensor:
        """`x_BD` without its rows holding NaN or infinity when skipping them; otherwise an error that says
        where in the store they are (and, first, whether their shard's bytes changed)."""
        finite_B = torch.isfinite(x_BD).all(1)
        if bool(finite_B.all()):
            return x_BD  # only a sum overflowed
        if skip:
            return x_BD[finite_B]
        bad = sorted(set().union(*(self.store.nonfinite_rows(c) for c in self.columns)))
        if not bad:
            return x_BD
        self.store.verify(sorted({shard for shard, _ in bad}))  # altered bytes are the likelier cause
        hint = (" (a float16 store overflows past 65,504: harvest with --dtype bfloat16)"
                if self.store.manifest.get("dtype") == "float16" else "")
        raise ValueError(f"{self.store.folder} holds {len(bad):,} activation rows with NaN or infinity, at "
                         f"{self.store.describe_rows(bad)}; re-harvest{hint}, or train without them with "
                         "--skip-nonfinite")
