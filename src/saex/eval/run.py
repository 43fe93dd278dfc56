"""The eval stage: reconstruction, sparsity and spliced downstream metrics on held-out examples."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from saex import config as configs
from saex.atomic import atomic_write_json
from saex.data import UnreadableExample, reopen
from saex.eval.metrics import ReconstructionStats
from saex.eval.plots import density_plot, pareto_plot
from saex.eval.splice import SpliceStats
from saex.models import load_model
from saex.models.heads import head_kind, head_output, prompt_features
from saex.runlog import JsonlLog, progress
from saex.sae.io import load_sae, saved_saes
from saex.store import load_manifest


@dataclass
class EvalConfig:
    run: str = field(default="", metadata={"required": True})
    """Run folder with acts/ and saes/."""
    sae: list[str] = field(default_factory=list)
    """SAEs to evaluate, by name in RUN/saes/ (default: all)."""
    examples: int = 500
    """Held-out examples to evaluate on."""
    split: str | None = None
    """Dataset split (default: the harvested split's examples that the harvest did not take, else 'test')."""
    batch_size: int = 32
    """Examples per forward pass."""
    downstream: bool = True
    """Also splice each SAE into the model and measure the downstream loss."""
    device: str = "auto"
    """cpu, cuda, ...; auto picks cuda when there is one."""


def _held_out(manifest: dict, cfg: EvalConfig):
    """The dataset and the indices of examples the harvest did not take."""
    desc = dict(manifest["dataset"])
    if cfg.split is None:
        dataset = reopen(desc)
        order = (np.random.default_rng(manifest["seed"]).permutation(len(dataset)) if manifest["order"] == "shuffled"
                 else np.arange(len(dataset)))
        rest = order[manifest["examples_planned"]:]
        if len(rest):
            return dataset, rest[: cfg.examples]
        if "split" not in desc:
            raise ValueError("the harvest took every example of the dataset; pass --split with another split")
        desc["split"] = "test"
    else:
        desc["split"] = cfg.split
    dataset = reopen(desc)
    return dataset, np.random.default_rng(0).permutation(len(dataset))[: cfg.examples]


def evaluate(cfg: EvalConfig) -> dict[str, dict]:
    if not cfg.run:
        raise ValueError("--run is required")
    run = Path(cfg.run)
    manifest = load_manifest(run / "acts")
    folders = saved_saes(run / "saes", cfg.sae)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    saes = {f.name: load_sae(f, device) for f in folders}
    adapter = load_model(manifest["model"], device)
    points = {name: adapter.hook(sae.metadata.get("hook") or manifest["hooks"][0]) for name, sae in saes.items()}
    dataset, indices = _held_out(manifest, cfg)
    kind = head_kind(adapter) if cfg.downstream else None
    prompts = prompt_features(adapter, manifest["label_names"]) if kind == "zero_shot" else None
    recon = {n: ReconstructionStats(s.d_sae) for n, s in saes.items()}
    splice = {n: SpliceStats(kind) for n in saes} if kind else {}
    hooks = sorted(set(points.values()), key=lambda h: h.order)

    bar = progress(len(indices), f"eval {len(saes)} SAEs", "ex")
    for start in range(0, len(indices), cfg.batch_size):
        examples = []
        for i in indices[start:start + cfg.batch_size]:
            try:
                examples.append(dataset[int(i)])
            except UnreadableExample:
                pass
        bar.update(min(cfg.batch_size, len(indices) - start))
        if not examples:
            continue
        batch = adapter.on_device(adapter.prepare([e.input for e in examples], manifest.get("context_size") or 128))
        acts = adapter.capture(batch, hooks)
        n_tokens = next(iter(acts.values())).shape[1]
        mask_BT = adapter.select(batch, n_tokens, manifest["tokens"]).to(adapter.device)
        labels = torch.tensor([e.label for e in examples], device=adapter.device)
        for name, sae in saes.items():
            x = acts[points[name].name][mask_BT].float()
            code = sae.encode(x)
            recon[name].update(x, sae.decode(code), code.dense())
        if not kind:
            continue
        run_head = lambda: head_output(adapter, batch, kind, prompts)  # noqa: E731
        clean = run_head()
        zeros = {h: adapter.run_edited(run_head, h, lambda a: a.masked_fill(mask_BT[..., None], 0)) for h in hooks}
        for name, sae in saes.items():
            def through_sae(a, sae=sae):
                out = a.clone()
                out[mask_BT] = sae(a[mask_BT].float()).to(a.dtype)
                return out
            spliced = adapter.run_edited(run_head, points[name], through_sae)
            splice[name].update({"clean": clean, "sae": spliced, "zero": zeros[points[name]],
                                 "input_ids": batch.inputs.get("input_ids")}, labels,
                                batch.inputs.get("attention_mask"))  # on the model's device, like the logits
    bar.close()

    results = {}
    for name, folder in zip(saes, folders):
        m = {"sae": name, "architecture": saes[name].cfg.architecture, "hook": points[name].name,
             "d_sae": saes[name].d_sae, "examples": len(indices), **recon[name].result()}
        if kind:
            m["downstream"] = splice[name].result()
        atomic_write_json(folder / "metrics.json", m)
        density_plot(m, folder / "density")
        results[name] = {k: v for k, v in m.items() if k != "density"}
    atomic_write_json(run / "eval" / "metrics.json", results)
    configs.save(cfg, run / "eval" / "config.json")
    if len(results) > 1:
        pareto_plot(results, run / "eval" / "pareto")
    JsonlLog(run, "eval").write("end", results=results)
    _print_table(results)
    return results


def _print_table(results: dict[str, dict]) -> None:
    print(f"{'sae':28s} {'L0':>8s} {'FVU':>7s} {'cos':>6s} {'dead%':>6s} {'loss rec.':>9s} {'KL':>8s}")
    for name, m in results.items():
        d = m.get("downstream", {})
        print(f"{name:28s} {m['l0']:8.1f} {m['fvu']:7.4f} {m['cosine']:6.3f} {100 * m['dead_frac']:6.1f} "
              f"{d.get('loss_recovered', float('nan')):9.3f} {d.get('kl', float('nan')):8.4f}")
    print(json.dumps({n: {"l0": round(m["l0"], 2), "fvu": round(m["fvu"], 4)} for n, m in results.items()}))
