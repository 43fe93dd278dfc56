"""A seeded fuzz of corrupted saved-SAE folders. Every load either gives an SAE whose outputs are finite or
raises ValueError / FileNotFoundError naming the file: never SafetensorError, RuntimeError, KeyError,
struct.error, UnicodeDecodeError or JSONDecodeError. Corruptions that change what the folder claims (truncated
weights, wrong shapes or dtypes, NaN, missing or extra tensors, edited sizes or architecture, invalid JSON)
must be refused."""

import collections
import json
import random

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from saex.sae.io import load_sae, save_sae
from tests.sae.random_sae import random_sae

ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated", "prolu"]
CASES_PER_ARCH = 110
VALUES = [None, 0, -1, 1, 7, 10**9, 1.5, 1e300, "", "x", "topk", [], {}, True, False]
DTYPES = [torch.int32, torch.int64, torch.int8, torch.float64, torch.float16, torch.bfloat16, torch.bool]
NAMES = ["standard", "topk", "jumprelu", "gated", "prolu", "batchtopk", "abstopk", "relu", "", "TopK"]


def _base(arch, folder):
    save_sae(random_sae(arch, 8, 16, 4, seed=ARCHS.index(arch)), folder)
    return (folder / "cfg.json").read_bytes(), (folder / "sae_weights.safetensors").read_bytes()


def _flip(rng, data: bytes, lo: int = 0, hi: int | None = None) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(lo, hi or len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def _tensors(rng, weights: bytes, change) -> bytes:
    """`weights` with one random tensor passed through `change(name, tensor)` (None drops it)."""
    tensors = load_bytes(weights)
    name = rng.choice(sorted(tensors))
    new = change(name, tensors[name])
    tensors = {k: v for k, v in tensors.items() if k != name} | ({name: new} if new is not None else {})
    return save_bytes(tensors)


def _added(rng, weights: bytes) -> bytes:
    """`weights` with one more tensor, of a name some architecture uses (or a near miss)."""
    tensors = load_bytes(weights)
    names = ["threshold", "r_mag", "b_gate", "b_enc", "W_skip", "log_threshold", "W_enc_", "threshold "]
    return save_bytes({**tensors, rng.choice([n for n in names if n not in tensors]): torch.zeros(16)})


def _cfg(cfg: bytes, edit) -> bytes:
    data = json.loads(cfg)
    edit(data)
    return json.dumps(data).encode()


def _reshaped(rng, v):
    shape = list(v.shape)
    shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 8])
    return torch.zeros(shape) if rng.random() < 0.8 else v.reshape(-1, 1)  # or the right numel, reshaped


def _poisoned(rng, v):
    flat = v.clone().flatten()
    flat[rng.randrange(len(flat))] = rng.choice([float("nan"), float("inf"), float("-inf"), 1e30])
    return flat.view(v.shape)


# each corruption: (name, must it be refused, how) with how(rng, arch, cfg, weights) -> (cfg, weights); None
# for a file means the file is deleted
CORRUPTIONS = [
    ("truncate weights", True, lambda r, a, c, w: (c, w[:r.randrange(len(w))])),
    ("flip bits in weights", False, lambda r, a, c, w: (c, _flip(r, w))),
    ("flip bits in the weights' header", False,
     lambda r, a, c, w: (c, _flip(r, w, 0, 8 + int.from_bytes(w[:8], "little")))),
    ("flip bits in cfg.json", False, lambda r, a, c, w: (_flip(r, c), w)),
    ("wrong shape", True, lambda r, a, c, w: (c, _tensors(r, w, lambda n, v: _reshaped(r, v)))),
    ("wrong dtype", True, lambda r, a, c, w: (c, _tensors(r, w, lambda n, v: v.to(r.choice(DTYPES))))),
    ("NaN, inf or 1e30 in a tensor", True, lambda r, a, c, w: (c, _tensors(r, w, lambda n, v: _poisoned(r, v)))),
    ("delete a tensor", True, lambda r, a, c, w: (c, _tensors(r, w, lambda n, v: None))),
    ("add a tensor", True, lambda r, a, c, w: (c, _added(r, w))),
    ("edit architecture", True, lambda r, a, c, w: (_cfg(c, lambda d: d.update(
        architecture=r.choice([n for n in NAMES if n != d["architecture"]]))), w)),
    ("edit d_in or d_sae", True, lambda r, a, c, w: (_cfg(c, lambda d: d.update(
        {r.choice(["d_in", "d_sae"]): r.choice([v for v in VALUES if v not in (8, 16)])})), w)),
    ("edit k", False, lambda r, a, c, w: (_cfg(c, lambda d: d.update(k=r.choice([1, 3, 5, 16, 17, 0, "4", None]))), w)),
    ("invalid JSON", True, lambda r, a, c, w: (c[:r.randrange(len(c.rstrip()) - 1)], w)),
    ("drop a cfg field", False, lambda r, a, c, w: (_cfg(c, lambda d: d.pop(r.choice(sorted(d)))), w)),
    ("set a cfg field", False, lambda r, a, c, w: (_cfg(c, lambda d: d.update({r.choice(sorted(d)): r.choice(VALUES)})), w)),
    ("set a saex field", False, lambda r, a, c, w: (_cfg(c, lambda d: d["saex"]["sae"].update(
        {r.choice(sorted(d["saex"]["sae"])): r.choice(VALUES)})), w)),
    ("delete a file", True, lambda r, a, c, w: r.choice([(None, w), (c, None)])),
]


def test_corrupted_folders_load_cleanly_or_are_refused_naming_the_file(tmp_path, capsys):
    rng = random.Random(20240611)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    counts = collections.defaultdict(collections.Counter)
    folder = tmp_path / "case"
    for arch in ARCHS:
        cfg, weights = _base(arch, tmp_path / arch)
        for i in range(CASES_PER_ARCH):
            name, must_refuse, corrupt = CORRUPTIONS[i % len(CORRUPTIONS)]
            if name == "edit k" and arch == "topk":
                must_refuse = True  # k disagrees with the saex section (or is invalid)
            new_cfg, new_weights = corrupt(rng, arch, cfg, weights)
            folder.mkdir(exist_ok=True)
            for file, data in (("cfg.json", new_cfg), ("sae_weights.safetensors", new_weights)):
                (folder / file).unlink(missing_ok=True)
                if data is not None:
                    (folder / file).write_bytes(data)
            case = f"{arch} case {i}: {name}"
            try:
                sae = load_sae(folder)
            except (ValueError, FileNotFoundError) as e:
                assert str(folder) in str(e), f"{case}: the message names no file: {e}"
                counts[name]["refused"] += 1
                continue
            assert not must_refuse, f"{case}: loaded"
            with torch.no_grad():
                assert torch.isfinite(sae(x)).all() and torch.isfinite(sae.encode(x).dense()).all(), case
            counts[name]["loaded"] += 1
    total = sum(counts.values(), collections.Counter())
    with capsys.disabled():
        print(f"\nload fuzz: {sum(total.values())} corrupted folders, {total['loaded']} loaded with finite outputs, "
              f"{total['refused']} refused")
        for name, c in counts.items():
            print(f"  {name:36s} loaded {c['loaded']:3d}  refused {c['refused']:3d}")
    assert sum(total.values()) == len(ARCHS) * CASES_PER_ARCH >= 600
    assert total["loaded"] > 0 and total["refused"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_the_uncorrupted_folders_load(arch, tmp_path):
    _base(arch, tmp_path / arch)
    assert load_sae(tmp_path / arch).cfg.architecture == arch
