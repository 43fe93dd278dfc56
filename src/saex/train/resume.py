"""What lets a killed training run resume: its checkpoint, its identity, and the state of its outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

from saex import config as configs
from saex.sae.io import CFG
from saex.statefile import load_state, save_state
from saex.train.config import TrainConfig

FORMAT = 3  # 3: safetensors + JSON (no pickle); 2: the encoder stored latent-major (W_enc_SD)
TRAIN_CONFIG = "train_config.json"
# fields that do not change what is trained: a run resumed with other values of these is the same run
NOT_IDENTITY = ("run", "overwrite", "checkpoint_every", "log_every", "device", "wandb_project", "verify",
                "skip_nonfinite", "threads")


def identity_of(cfg: TrainConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY}


def run_identity(variants: list[tuple[str, TrainConfig]], rows: int, hook: str) -> dict:
    return {"variants": {n: identity_of(v) for n, v in variants}, "store_rows": rows, "hook": hook, "format": FORMAT}


def checkpoint_path(run: Path, names: list[str]) -> Path:
    key = hashlib.sha256(json.dumps(sorted(names)).encode()).hexdigest()[:12]
    return run / "checkpoints" / f"train-{key}.safetensors"


def save_checkpoint(path: Path, state: dict) -> None:
    save_state(path, state)


def load_checkpoint(path: Path, identity: dict, device) -> dict:
    state = load_state(path, device)
    if not isinstance(state, dict) or state.get("identity") != identity:
        raise ValueError(f"{path} was written by a different training config; use --overwrite to start over")
    trainees = state.get("trainees")
    if not isinstance(state.get("step"), int) or not isinstance(trainees, dict) \
            or set(trainees) != set(identity["variants"]):
        raise ValueError(f"{path} is not a complete training checkpoint; delete it or use --overwrite to start over")
    return state


def remove_unfinished_saves(saes: Path, names: list[str]) -> None:
    """The temporary folders of a save that a kill interrupted (atomic_folder's `.NAME.*`); only called
    with the run's locks for `names` held, so no live save owns them."""
    for name in names:
        pattern = re.compile(rf"\.{re.escape(name)}\.([a-z0-9_]{{8}}|old\.\d+)")  # mkdtemp's suffix, or the swap's
        for tmp in saes.glob(".*"):
            if pattern.fullmatch(tmp.name):
                shutil.rmtree(tmp, ignore_errors=True)


def finished(outputs: dict[str, Path], variants: list[tuple[str, TrainConfig]], resumable: bool) -> bool:
    """Whether every output is already saved with this config (then there is nothing to do). Saved members
    of a sweep whose checkpoint remains are the start of its interrupted final save (not finished);
    members saved by another config, or without a checkpoint to finish from, are refused."""
    done = [n for n, p in outputs.items() if (p / CFG).exists()]
    if not done:
        return False
    wanted = dict(variants)
    other = [n for n in done if _saved_identity(outputs[n]) not in (None, identity_of(wanted[n]))]
    if other:
        raise ValueError(f"SAEs {other} in {outputs[other[0]].parent} were trained with another config "
                         f"(their {TRAIN_CONFIG}); use --overwrite to retrain them, or other names")
    if len(done) == len(outputs):
        return True
    if not resumable:
        raise ValueError(f"SAEs {done} already exist in {outputs[done[0]].parent}; use --overwrite or other names")
    return False


def _saved_identity(folder: Path) -> dict | None:
    path = folder / TRAIN_CONFIG
    if not path.exists():
        return None  # saved by an older saex, or loaded from elsewhere: nothing to compare
    try:
        return identity_of(configs.load(TrainConfig, path))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); use --overwrite to retrain the SAE") from None
