"""Saved SAEs: a folder with cfg.json and sae_weights.safetensors that SAELens reads.

The input scale is folded into the weights before saving, so a saved SAE takes raw activations.
Loading also reads SAELens folders and sparsify folders (cfg.json + sae.safetensors). A folder that
saex cannot load exactly raises ValueError (FileNotFoundError for a missing file) naming the file, what
is wrong and what would be valid; SAELens' config fields are checked in saex.sae.saelens."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from saex import __version__
from saex.sae import saelens
from saex.sae.arch import REGISTRY
from saex.sae.config import SAEConfig
from saex.sae.model import SAE
from saex.tensorfile import check_layout, read_header

CFG, WEIGHTS, SPARSIFY_WEIGHTS = "cfg.json", "sae_weights.safetensors", "sae.safetensors"
SAELENS_LAYOUT = "6.0.0"
# no trained SAE has weights near this; float32 encodes and decodes with them overflow
MAX_ABS = 1e10
_FILE_DTYPES = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16"}
_ITEM_BYTES = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2}


def saved_saes(folder: str | Path, names: list[str] | None = None) -> list[Path]:
    """SAE folders (those holding a cfg.json) directly in `folder`, sorted; `names` picks and checks some."""
    folder = Path(folder)
    found = sorted(p.parent for p in folder.glob(f"*/{CFG}") if not p.parent.name.startswith("."))  # not a save's temp
    if not found:
        raise ValueError(f"no trained SAE in {folder}; run saex train first")
    if names:
        missing = [n for n in names if not (folder / n / CFG).exists()]
        if missing:
            raise ValueError(f"no SAE named {missing} in {folder}; it has {[p.name for p in found]}")
        return [folder / n for n in names]
    return found


def save_sae(sae: SAE, folder: str | Path, extra_metadata: dict | None = None,
             files: dict[str, str] | None = None) -> Path:
    """Write `folder` atomically (a temporary folder renamed into place), with `files` (name -> text) in it."""
    from saex.atomic import atomic_folder

    kind, extra = sae.arch.inference_state(sae)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec, **extra}
    if sae.cfg.skip:
        tensors["W_skip"] = sae.W_skip
    weights = {name: tensors[name] for name in saelens.tensor_names(kind, sae.cfg.skip)}  # Gated's b_enc: b_gate
    metadata = {**sae.metadata, **(extra_metadata or {})}
    transcoder = sae.cfg.transcoder
    cfg = {
        "architecture": saelens.transcoder_name(kind, sae.cfg.skip) if transcoder else kind,
        "d_in": sae.d_in, "d_sae": sae.d_sae, **({"d_out": sae.d_out} if transcoder else {}), "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": not transcoder, "normalize_activations": "none",
        "reshape_activations": "none",
        # sae_lens_version names the cfg layout we write (SAELens 6), so that SAELens reads the metadata
        "metadata": {"sae_lens_version": SAELENS_LAYOUT, "model_name": metadata.get("model"),
                     "hook_name": metadata.get("hook"),
                     **({"hook_name_out": metadata.get("target_hook")} if transcoder else {}), **metadata},
        "saex": {"version": __version__, "sae": dataclasses.asdict(sae.cfg)},
    }
    if kind == "topk":
        cfg["k"] = sae.cfg.k
    weights = {k: v.detach().float().contiguous().cpu() for k, v in weights.items()}
    broken = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"refusing to save an SAE to {folder} whose {broken} hold NaN or infinity")
    with atomic_folder(Path(folder)) as tmp:
        (tmp / WEIGHTS).write_bytes(save(weights))  # Python's IO: a full disk is an OSError naming the file
        (tmp / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)


def load_sae(folder: str | Path, device: str = "cpu") -> SAE:
    """A saex, SAELens or sparsify SAE folder."""
    folder = Path(folder)
    cfg = _read_json(_existing(folder / CFG, f"no SAE at {folder}"))
    if (folder / SPARSIFY_WEIGHTS).exists() and not (folder / WEIGHTS).exists():
        return _load_sparsify(folder, cfg).to(device)
    where, path = folder / CFG, _existing(folder / WEIGHTS, f"the SAE at {folder} is incomplete")
    c = saelens.parse(cfg, where)
    optional = saelens.LEGACY_TENSORS if c.legacy else ()
    what = cfg.get("architecture") if c.transcoder else c.architecture
    tensors = _read_tensors(path, c.shapes(), f"a {what!r} {'transcoder' if c.transcoder else 'SAE'} (as {CFG} says)",
                            f"{CFG}'s d_in={c.d_in}" + (f", d_sae={c.d_sae} and d_out={c.d_out}" if c.transcoder
                                                       else f" and d_sae={c.d_sae}"),
                            c.dtype, optional)
    if "scaling_factor" in tensors:
        if not torch.equal(tensors.pop("scaling_factor"), torch.ones(c.d_sae)):
            raise ValueError(f"{path}: scaling_factor (SAELens 5's finetuning scale) is not all ones; saex loads "
                             "SAEs without one, or with ones")
    sae_cfg = _saex_config(cfg, c, where)
    tensors = saelens.fold(c, tensors, where)
    sae = SAE(sae_cfg, metadata=cfg.get("metadata", {}))
    _set_weights(sae, tensors, path)
    return sae.to(device).eval()


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} is missing (a saved SAE is a folder with {CFG} and {WEIGHTS})")
    return path


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); it must be a JSON object") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}; it must be a JSON object") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a JSON {type(cfg).__name__}; it must be a JSON object")
    return cfg


def _read_tensors(path: Path, shapes: dict[str, tuple[int, ...]], what: str, sizes: str, dtype: str | None = None,
                  optional: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as float32, after checking that they are exactly `shapes`' names (plus
    any of `optional`; `what` names the set), in `dtype` (any float one: None), with the shapes that `sizes`
    gives, finite and below MAX_ABS."""
    header, _, size = read_header(path)
    names = set(header) - {"__metadata__"}
    missing, extra = set(shapes) - names, names - set(shapes) - set(optional)
    if missing or extra:
        raise ValueError(f"{path}: {what} holds the tensors {sorted(shapes)}; this file "
                         + "; ".join([f"lacks {sorted(missing)}"] * bool(missing) + [f"also has {sorted(extra)}"] * bool(extra))
                         + (" (they belong to another architecture)" if extra else ""))
    for name in sorted(names):
        stored = _FILE_DTYPES.get(header[name]["dtype"])
        if stored is None or (dtype is not None and stored != dtype):
            valid = f"{dtype} (the cfg's dtype)" if dtype else f"one of {sorted(set(_FILE_DTYPES.values()))}"
            raise ValueError(f"{path}: tensor {name} is stored as {stored or header[name]['dtype']}; it must be {valid}")
    for name, shape in shapes.items():
        if tuple(header[name]["shape"]) != shape:
            raise ValueError(f"{path}: tensor {name} has shape {header[name]['shape']}; {sizes} need {list(shape)}")
    check_layout(path, header, size)
    try:
        tensors = {name: v.float() for name, v in load_file(path).items()}
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    for name, v in tensors.items():
        bad = ~torch.isfinite(v)
        if bad.any():
            raise ValueError(f"{path}: tensor {name} holds {int(bad.sum())} non-finite values (NaN or inf); "
                             "a saved SAE's weights must be finite")
        limit = math.log(MAX_ABS) if name == "r_mag" else MAX_ABS  # Gated scales by exp(r_mag)
        if v.numel() and v.abs().max() > limit:
            raise ValueError(f"{path}: tensor {name} holds {float(v.abs().max()):.3g}; values beyond {limit:.3g} "
                             "overflow float32 in encode or decode, and no trained SAE has them")
    return tensors


def _saex_config(cfg: dict, c: saelens.SAELensConfig, where: Path) -> SAEConfig:
    """The SAEConfig from cfg.json's saex section (checked against the SAELens fields), else from those fields."""
    if "saex" not in cfg:
        arch = saelens.SAELENS_TO_SAEX.get(c.architecture)
        if arch is None:
            raise ValueError(f"{where}: architecture {c.architecture!r} is saex's own, and needs the 'saex' section "
                             "saex writes beside it")
        return SAEConfig(d_in=c.d_in, d_sae=c.d_sae, architecture=arch, k=c.k or 32, transcoder=c.transcoder,
                         d_out=c.d_out, skip=c.skip)
    section = cfg["saex"].get("sae") if isinstance(cfg["saex"], dict) else None
    if not isinstance(section, dict):
        raise ValueError(f"{where}: the 'saex' section must be an object whose 'sae' object is an SAEConfig")
    sae_cfg = _typed(SAEConfig, section, where, "saex.sae")
    saved_as = {REGISTRY[sae_cfg.architecture].saelens_name} | ({"prolu"} if sae_cfg.architecture == "prolu" else set())
    for name, theirs, ours in (("architecture", c.architecture, saved_as), ("d_in", c.d_in, {sae_cfg.d_in}),
                               ("d_sae", c.d_sae, {sae_cfg.d_sae}),
                               ("k", c.k, {sae_cfg.k if c.architecture == "topk" else None}),
                               ("transcoder", c.transcoder, {sae_cfg.transcoder}), ("skip", c.skip, {sae_cfg.skip}),
                               ("d_out", c.d_out, {sae_cfg.d_out if sae_cfg.transcoder else 0})):
        if theirs not in ours:
            raise ValueError(f"{where}: {name} is {theirs!r}, but the saex section describes a "
                             f"{sae_cfg.architecture!r} SAE, saved with {name} {' or '.join(map(repr, sorted(ours)))}")
    return sae_cfg


def _typed(cls, values: dict, where: Path, prefix: str):
    """A dataclass from JSON values, each checked against its field's type (unknown keys ignored: newer saex)."""
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
    for name, value in kwargs.items():
        if not _fits(value, hints[name]):
            raise ValueError(f"{where}: {prefix}.{name} is {value!r}; it must be {_describe(hints[name])}")
    try:
        return cls(**kwargs).validate()
    except ValueError as e:
        raise ValueError(f"{where}: {prefix}: {e}") from None


def _fits(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return isinstance(value, str) and value in args
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, tp) and (tp is bool or not isinstance(value, bool))


def _describe(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return f"one of {list(typing.get_args(tp))}"
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(tp, str(tp))


@torch.no_grad()
def _set_weights(sae: SAE, t: dict[str, torch.Tensor], path: Path) -> None:
    """Copy SAELens-named tensors into the saex SAE, whose architecture may store them differently."""
    arch = sae.cfg.architecture
    state = {"W_enc_SD": t["W_enc"].T, "b_enc": t.get("b_enc", t.get("b_gate")), "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if "W_skip" in t:
        state["W_skip"] = t["W_skip"]
    if arch == "gated":
        state.update({"arch.r_mag": t["r_mag"], "arch.b_mag": t["b_mag"]})
    elif arch == "jumprelu":
        state["arch.threshold"] = t["threshold"]
    elif arch == "batchtopk":  # its one global threshold, saved per latent for SAELens' JumpReLU
        if not (t["threshold"] == t["threshold"][0]).all():
            raise ValueError(f"{path}: a BatchTopK SAE's threshold is one value for every latent; this one holds "
                             f"{len(t['threshold'].unique())} different values")
        state["arch.threshold"] = t["threshold"][0]
    elif arch == "prolu" and "threshold" in t:  # saved as the JumpReLU it equals: b_enc 0, threshold max(-b, 0)
        if t["b_enc"].any():
            raise ValueError(f"{path}: a ProLU SAE saved as a JumpReLU has b_enc all zeros (its bias is -threshold); "
                             f"this one has {int((t['b_enc'] != 0).sum())} nonzero entries")
        state["b_enc"] = -t["threshold"]
    target = {**dict(sae.named_parameters()), **dict(sae.named_buffers())}
    for name, value in state.items():
        target[name].copy_(value)


def _load_sparsify(folder: Path, cfg: dict) -> SAE:
    where, path = folder / CFG, folder / SPARSIFY_WEIGHTS
    if cfg.get("activation", "topk") != "topk" or cfg.get("skip_connection") or cfg.get("transcode"):
        raise ValueError(f"{where}: saex loads sparsify TopK SAEs without skip connection or transcoding")
    shape = read_header(_existing(path, f"the SAE at {folder} is incomplete"))[0].get("encoder.weight", {}).get("shape")
    d_sae, d_in = shape if isinstance(shape, list) and len(shape) == 2 else (0, 0)
    shapes = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    tensors = _read_tensors(path, shapes, "a sparsify SAE", f"encoder.weight's [d_sae={d_sae}, d_in={d_in}]")
    sae_cfg = _typed(SAEConfig, {"d_in": d_in, "d_sae": d_sae, "architecture": "topk", "k": cfg.get("k")}, where, "sparsify")
    sae = SAE(sae_cfg, metadata={"source": "sparsify"})
    _set_weights(sae, {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"],
                       "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}, path)
    return sae.eval()
