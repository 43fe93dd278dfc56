"""`saex edit`: one example through a run's model with its SAE code edited (steering, ablation, transfer),
what the edit changed printed as a table and written as effect.json (+ effect.png) in one folder.

The inline flags become edits in the order of the ops table (clamp, scale, add, zero, copy, pair), each
flag's values in the order given, after those of --edits FILE; for any other order write an edit file."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from saex.analysis.edit import Edit, edits_json, load_edits
from saex.analysis.figures import effect_png


@dataclass
class EditConfig:
    run: str
    """Run folder (with acts/ and saes/)."""
    example: str
    """The input: a dataset example index (0..N-1), or a file: an image, or a .txt for text models."""
    sae: str | None = None
    """SAE under RUN/saes/ (needed when the run has several)."""
    clamp: list[str] = field(default_factory=list)
    """F=V: set latents F (an id or a comma list such as 3,7) to V. Repeatable."""
    scale: list[str] = field(default_factory=list)
    """F=S: multiply latents F by S. Repeatable."""
    add: list[str] = field(default_factory=list)
    """F=ALPHA: steer: add ALPHA to latents F, which moves the activation by ALPHA times each one's decoder
    direction. Repeatable."""
    zero: list[str] = field(default_factory=list)
    """F: ablate latents F (set them to 0). Repeatable."""
    copy_from: str | None = None
    """REF (an example index or a file): copy the latents REF has and the input lacks (with --features: those)."""
    pair: str | None = None
    """A1,A2 (example indices or files): add code(A2) - code(A1), each averaged over its tokens (with
    --features: only those latents)."""
    features: list[str] = field(default_factory=list)
    """Latents (ids or comma lists) that --copy-from and --pair touch."""
    positions: list[str] = field(default_factory=list)
    """Token positions (ids or comma lists such as 1,2,3) the inline edits apply to (default: every selected
    token)."""
    edits: str | None = None
    """Edit file: a JSON list of edits (docs/experiments.md), applied before the inline ones."""
    save_edits: str | None = None
    """Write the edits applied (the file's, then the inline ones) to this edit file, for --edits and the
    explorer."""
    neighbours: int = 8
    """Nearest dataset examples to show before and after the edit (0: none)."""
    out: str | None = None
    """Output folder (default: RUN/experiments/<sae>/<example>-<hash of the edits>/)."""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... (auto: cuda when there is one)."""
    threads: int = 1
    """CPU threads for torch (0: torch's default, one per core). One example through a small model is
    fastest on one: more wait on each other when other processes share the cores."""


def _ids(where: str, text: str, what: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ValueError(f"{where}: {what} must be non-negative integers, one or a comma list such as 3,7")
    return [int(p) for p in parts]


def _number(where: str, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{where}: {what} must be a number (such as 2, -1.5, 1e-3), got {text!r}")
    return value


def inline_edits(cfg: EditConfig) -> list[tuple[str, Edit]]:
    """The inline flags as edits, each with the flag text it came from (for errors once the SAE is known)."""
    positions = sorted({p for item in cfg.positions for p in _ids(f"--positions {item!r}", item, "positions")}) or None
    out: list[tuple[str, Edit]] = []
    for op, letter in (("clamp", "V"), ("scale", "S"), ("add", "ALPHA")):
        for item in getattr(cfg, op):
            if "=" not in item:
                raise ValueError(f"--{op} {item!r}: give F={letter} (latents F, an id or a comma list, and a "
                                 f"number {letter}), e.g. --{op} 3,7=2")
            where, (f, v) = f"--{op} {item!r}", item.rsplit("=", 1)
            out.append((where, Edit(op, _ids(where, f, "F"), _number(where, v, letter), positions=positions)))
    for item in cfg.zero:
        where = f"--zero {item!r}"
        out.append((where, Edit("zero", _ids(where, item, "F"), positions=positions)))
    features = [j for item in cfg.features for j in _ids(f"--features {item!r}", item, "latents")]
    if features and not (cfg.copy_from or cfg.pair):
        raise ValueError(f"--features {','.join(map(str, features))}: names the latents of --copy-from or "
                         "--pair; give one of them (or use --clamp/--scale/--add/--zero F)")
    if cfg.copy_from is not None:
        out.append((f"--copy-from {cfg.copy_from!r}", Edit("copy", features, source=cfg.copy_from,
                                                             positions=positions)))
    if cfg.pair is not None:
        refs = [r.strip() for r in cfg.pair.split(",")]
        if len(refs) != 2 or not all(refs):
            raise ValueError(f"--pair {cfg.pair!r}: give two examples A1,A2 (dataset indices or files), e.g. "
                             "--pair 12,40")
        out.append((f"--pair {cfg.pair!r}", Edit("pair", features, source=refs[0], target=refs[1],
                                                   positions=positions)))
    if positions and not out:
        raise ValueError(f"--positions {','.join(cfg.positions)}: applies to the inline edits, and none is given")
    return out


def out_folder(run: Path, sae: str, example: str, edits: list[Edit]) -> Path:
    """RUN/experiments/<sae>/<example>-<8 hex digits of the edit list>: the same edits, the same folder."""
    digest = hashlib.sha256(json.dumps(edits_json(edits), sort_keys=True).encode()).hexdigest()[:8]
    name = example if example.isdigit() else re.sub(r"[^A-Za-z0-9._-]+", "_", Path(example).name).strip("._")
    return run / "experiments" / sae / f"{name or 'input'}-{digest}"


def _checked_ref(exp, where: str, ref: str) -> None:
    try:
        exp.input_of(ref)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{where}: {e}") from None


def run_edit(cfg: EditConfig) -> dict:
    """Parse, load, edit, report, write: every check comes before the first file is written."""
    import torch

    from saex.threads import torch_threads

    inline = inline_edits(cfg)
    if cfg.neighbours < 0 or cfg.threads < 0:
        bad = "neighbours" if cfg.neighbours < 0 else "threads"
        raise ValueError(f"--{bad} {getattr(cfg, bad)}: must be 0 or more")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    with torch_threads(cfg.threads):
        exp, edits = load(cfg, inline, device)
        result = exp.effect(cfg.example, edits, cfg.neighbours)
        about = {n["example"]: _describe(exp, n["example"]) for side in result.get("neighbours", {}).values()
                 for n in side}
        png = effect_png(result, *_pictures(exp, cfg.example, result, about),
                         title="; ".join(describe_edit(e) for e in edits) or "no edit")
        text = exp.input_of(cfg.example)[0] if exp.adapter.modality == "text" else None
    folder = Path(cfg.out) if cfg.out else out_folder(exp.run, exp.sae_name, cfg.example, edits)
    written = _write(folder, result, edits, png, cfg.save_edits)
    print(report(result, edits, about, written, text))
    return result


def load(cfg: EditConfig, inline: list[tuple[str, Edit]], device: str):
    """The run's Experiment and the edits to apply (the file's, then the inline ones), all checked against
    its SAE and dataset, each error naming the flag or file entry it came from."""
    from saex.analysis.experiment import Experiment

    exp = Experiment(cfg.run, cfg.sae, device)
    edits = load_edits(cfg.edits, exp.d_sae) if cfg.edits else []
    for where, e in inline:
        bad = [j for j in e.features if j >= exp.d_sae]
        if bad:
            raise ValueError(f"{where}: latents {bad} are not in SAE {exp.sae_name} (valid: 0..{exp.d_sae - 1})")
        edits.append(e.check(exp.d_sae))
    _checked_ref(exp, "--example", cfg.example)
    flags = [f"{cfg.edits}[{i}]" for i in range(len(edits) - len(inline))] + [where for where, _ in inline]
    for where, e in zip(flags, edits):
        for ref in e.examples():
            _checked_ref(exp, where, ref)
    return exp, edits


def _write(folder: Path, result: dict, edits: list[Edit], png: bytes | None, save_edits: str | None) -> list[Path]:
    from saex.atomic import atomic_write_bytes, atomic_write_json

    written = [Path(save_edits)] if save_edits else []
    if save_edits:
        atomic_write_json(Path(save_edits), edits_json(edits))
    atomic_write_json(folder / "edits.json", edits_json(edits))
    written.append(folder / "edits.json")
    if png is not None:
        atomic_write_bytes(folder / "effect.png", png)
        written.append(folder / "effect.png")
    atomic_write_json(folder / "effect.json", result)  # last: a folder with effect.json is complete
    return written + [folder / "effect.json"]


def _describe(exp, index: int) -> str:
    """A neighbour in a few words: its label, and for text its first words."""
    item = exp.dataset[index]
    label = exp.label_names[item.label] if 0 <= item.label < len(exp.label_names) else ""
    if isinstance(item.input, str):
        words = " ".join(item.input.split())
        return f"{label}: {words[:56]}{'...' if len(words) > 56 else ''}" if label else words[:60]
    return label


def _pictures(exp, ref: str, result: dict, about: dict[int, str]):
    """The input's image and its neighbours' (image, caption) rows, for an image model; else nothing."""
    if exp.adapter.modality != "image":
        return None, {}
    rows = {side: [(exp.dataset[n["example"]].input, f"#{n['example']}\n{about[n['example']]}\n{n['cosine']:.3f}")
                   for n in ns] for side, ns in result.get("neighbours", {}).items()}
    return exp.input_of(ref)[0], rows


def describe_edit(e: Edit) -> str:
    ids = ",".join(map(str, e.features))
    at = f" at positions {','.join(map(str, e.positions))}" if e.positions is not None else ""
    if e.op == "zero":
        text = f"zero {ids}"
    elif e.op in ("clamp", "scale", "add"):
        text = f"{e.op} {ids} {'=' if e.op == 'clamp' else 'x' if e.op == 'scale' else '+'} {e.value:g}"
    elif e.op == "copy":
        text = f"copy {ids or 'the latents it has and the input lacks'} from {e.source}"
    else:
        text = f"pair: add code({e.target}) - code({e.source})" + (f" on {ids}" if ids else "")
    return text + at


def report(result: dict, edits: list[Edit], about: dict[int, str], written: list[Path], text: str | None = None) -> str:
    """The effect of an edit as a table for the terminal (`about`: a few words per neighbour; `text`: the
    input of a text model)."""
    label = f" ({result['label']})" if result.get("label") else ""
    lines = [f"example {result['example']}{label}: SAE {result['sae']} at {result['hook']} ({result['tokens']} "
             f"tokens), readout {result['readout'] or 'none'}"]
    if text is not None:
        words = " ".join(text.split())
        lines.append(f"text: {words[:100]}{'...' if len(words) > 100 else ''}")
    lines.append("edits: " + ("; ".join(describe_edit(e) for e in edits) or "none (the clean run)"))
    changed = result["features_changed"]
    lines += ["", f"latents changed: {result['n_features_changed']} (mean over the tokens; the largest changes first)",
              "  latent    before     after"]
    biggest = sorted(changed, key=lambda c: -abs(c["after"] - c["before"]))[:12]
    lines += [f"  {c['feature']:>6d}  {c['before']:8.3f}  {c['after']:8.3f}" for c in biggest]
    if len(changed) > 12:
        lines.append(f"  ... and {len(changed) - 12} more (effect.json)")
    lines += _effect_lines(result.get("effect") or {})
    if "continuation" in result:
        lines += ["", f"continuation  clean:  {result['continuation']['clean']!r}",
                  f"              edited: {result['continuation']['edited']!r}"]
    if result.get("neighbours"):
        lines += _neighbour_lines(result["neighbours"], about)
    folder = written[-1].parent
    lines += ["", f"wrote {folder}/ ({', '.join(p.name for p in written if p.parent == folder)})"]
    lines += [f"wrote {p}" for p in written if p.parent != folder]
    return "\n".join(lines)


def _neighbour_lines(nb: dict, about: dict[int, str]) -> list[str]:
    """Before and after side by side when the descriptions are short (labels), else one block each."""
    cell = lambda n, w: f"{n['example']:>6d} {n['cosine']:.3f} {about.get(n['example'], '')[:w]}"  # noqa: E731
    if max((len(about.get(n["example"], "")) for side in nb.values() for n in side), default=0) > 24:
        return [line for side in ("before", "after") for line in
                ["", f"nearest examples {side} the edit (example, cosine)"] + [f"  {cell(n, 96)}" for n in nb[side]]]
    lines = ["", f"{'nearest examples before (example, cosine)':42s}  after"]
    for i in range(max(len(nb["before"]), len(nb["after"]))):
        cells = [cell(side[i], 24) if i < len(side) else "" for side in (nb["before"], nb["after"])]
        lines.append(f"  {cells[0]:40s}  {cells[1]}".rstrip())
    return lines


def _effect_lines(effect: dict) -> list[str]:
    lines = []
    if "kl" in effect:
        if effect.get("probs"):
            rows = sorted(effect["probs"], key=lambda r: -max(r["clean"], r["edited"]))[:10]
        else:
            rows = (effect["gained"][:5] + effect["lost"][:5])
        lines += ["", f"{'class' if effect.get('probs') else 'token':24s}    clean   edited    delta"]
        f = ".1e" if max((max(r["clean"], r["edited"]) for r in rows), default=1) < 0.01 else ".3f"  # a vocabulary's
        lines += [f"  {_cell(r['name'], 22)}  {r['clean']:8{f}} {r['edited']:8{f}} {r['edited'] - r['clean']:+8{f}}"
                  for r in rows]
        lines.append(f"top {effect['top_clean']!r} -> {effect['top_edited']!r}; KL(clean || edited) "
                     f"{effect['kl']:.4f} nats")
    if "embedding_cosine" in effect:
        lines += ["", f"embedding cosine (clean, edited) {effect['embedding_cosine']:.4f}"]
    return lines


def _cell(name: str, width: int) -> str:
    text = name if name.isprintable() and name.strip() == name else repr(name)
    return f"{text[:width]:{width}s}"
