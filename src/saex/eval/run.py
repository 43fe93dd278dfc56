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
from saex.eval.probing import ProbeRows, summary_line
from saex.eval.splice import SpliceStats
from saex.models import load_model
from saex.models.heads import head_kind, head_output, prompt_features
from saex.runlog import JsonlLog, progress
from saex.sae.code import Code
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
    probing: bool = True
    """Also fit sparse probes (top-k latents vs raw activations, per label) when the examples have labels."""
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
    if "toy" in manifest:  # a toy store: no model, fresh rows from the toy, and ground-truth metrics
        return _finish(run, cfg, folders, _evaluate_toy(run, manifest, cfg, saes, folders))
    adapter = load_model(manifest["model"], device)
    points = {name: adapter.hook(sae.metadata.get("hook") or manifest["hooks"][0]) for name, sae in saes.items()}
    # a transcoder is scored on the hook it reconstructs, and spliced there (reading its input in the same pass)
    targets = {name: adapter.hook(sae.metadata["target_hook"]) if sae.cfg.transcoder else points[name]
               for name, sae in saes.items()}
    dataset, indices = _held_out(manifest, cfg)
    kind = head_kind(adapter) if cfg.downstream else None
    prompts = prompt_features(adapter, manifest["label_names"]) if kind == "zero_shot" else None
    recon = {n: ReconstructionStats(s.d_sae) for n, s in saes.items()}
    splice = {n: SpliceStats(kind) for n in saes} if kind else {}
    hooks = sorted(set(points.values()) | set(targets.values()), key=lambda h: h.order)
    probe = ProbeRows() if cfg.probing else None  # saex.eval.probing: pooled codes and activations per example

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
        rows_T = probe.add_batch(mask_BT, labels) if probe else None
        for name, sae in saes.items():
            x = acts[points[name].name][mask_BT].float()
            code = sae.encode(x)
            recon[name].update(acts[targets[name].name][mask_BT].float(), sae.reconstruct(x, code), code.dense())
            if probe:
                probe.add(name, code, x, rows_T)
        if not kind:
            continue
        run_head = lambda: head_output(adapter, batch, kind, prompts)  # noqa: E731
        clean = run_head()
        zeros = {h: adapter.run_edited(run_head, h, lambda a: a.masked_fill(mask_BT[..., None], 0))
                 for h in set(targets.values())}
        for name, sae in saes.items():
            seen = {}  # a transcoder's input, recorded where the pass reaches it, before its target

            def through_sae(a, sae=sae, seen=seen):
                out = a.clone()
                out[mask_BT] = sae(seen.get("input", a)[mask_BT].float()).to(a.dtype)
                return out
            edits = {targets[name]: through_sae}
            if sae.cfg.transcoder:
                edits = {points[name]: lambda a, seen=seen: seen.update(input=a), **edits}
            spliced = adapter.run_hooked(run_head, edits)
            splice[name].update({"clean": clean, "sae": spliced, "zero": zeros[targets[name]],
                                 "input_ids": batch.inputs.get("input_ids")}, labels,
                                batch.inputs.get("attention_mask"))  # on the model's device, like the logits
    bar.close()

    metrics = {}
    for name in saes:
        m = {"sae": name, "architecture": saes[name].cfg.architecture, "hook": points[name].name,
             **({"target_hook": targets[name].name} if saes[name].cfg.transcoder else {}),
             "d_sae": saes[name].d_sae, "examples": len(indices), **recon[name].result()}
        if kind:
            m["downstream"] = splice[name].result()
        probed = probe.result(name, manifest.get("label_names")) if probe else None
        if probed:
            m["probing"] = probed
        metrics[name] = m
    return _finish(run, cfg, folders, metrics)


PER_SAE_ONLY = ("density", "gt_absorption_pairs")  # kept out of RUN/eval/metrics.json


def _finish(run: Path, cfg: EvalConfig, folders: list[Path], metrics: dict[str, dict]) -> dict[str, dict]:
    """Write each SAE's metrics.json and plots, the run's eval/metrics.json, config, pareto plot and log."""
    results = {}
    for folder in folders:
        m = metrics[folder.name]
        atomic_write_json(folder / "metrics.json", m)
        density_plot(m, folder / "density")
        results[folder.name] = {k: v for k, v in m.items() if k not in PER_SAE_ONLY}
    atomic_write_json(run / "eval" / "metrics.json", results)
    configs.save(cfg, run / "eval" / "config.json")
    if len(results) > 1:
        pareto_plot(results, run / "eval" / "pareto")
    JsonlLog(run, "eval").write("end", results=results)
    _print_table(results)
    return results


TOY_EVAL_SEED = 10**6  # held-out toy rows use the store's seed + this, so they are never training rows


@torch.no_grad()
def _evaluate_toy(run: Path, manifest: dict, cfg: EvalConfig, saes: dict, folders: list[Path]) -> dict[str, dict]:
    """Each SAE on cfg.examples fresh rows of the store's toy model: reconstruction metrics, the gt_*
    ground-truth metrics (saex.analysis.ground_truth) and its ground_truth.png heat map."""
    from saex.analysis.ground_truth import ground_truth_metrics, heat_map_png
    from saex.toy import load_toy

    model, toy_cfg = load_toy(run / "acts")
    seed = TOY_EVAL_SEED + toy_cfg.seed
    x_ND, indices_NK, values_NK = model.sample(cfg.examples, torch.Generator().manual_seed(seed))
    x_ND = x_ND.float()
    step = max(cfg.batch_size, 1024)
    metrics = {}
    for (name, sae), folder in zip(saes.items(), folders):
        device = sae.W_dec.device
        recon = ReconstructionStats(sae.d_sae)
        codes, x_hats = [], []
        for start in range(0, len(x_ND), step):
            x = x_ND[start:start + step].to(device)
            code = sae.encode(x)
            x_hat = sae.decode(code)
            recon.update(x, x_hat, code.dense())
            codes.append(code)
            x_hats.append(x_hat.cpu())
        W_dec = sae.W_dec.detach().cpu()
        m = {"sae": name, "architecture": sae.cfg.architecture,
             "hook": sae.metadata.get("hook") or manifest["hooks"][0], "d_sae": sae.d_sae,
             "examples": len(x_ND), **recon.result(),
             **ground_truth_metrics(W_dec, _joined(codes, sae.d_sae), model.features_FD, indices_NK, values_NK,
                                    model.parent_F, x_ND, torch.cat(x_hats))}
        heat_map_png(W_dec, model.features_FD, model.parent_F, folder / "ground_truth.png",
                     title=f"{name}: cosine with the true features (MCC {m['gt_mcc']:.3f})")
        metrics[name] = m
    return metrics


def _joined(codes: list, d_sae: int) -> Code:
    """One Code of the batches' codes, padded to the widest (value 0, index 0: never fires)."""
    K = max(c.values_BK.shape[-1] for c in codes)
    pad = lambda t, v: torch.nn.functional.pad(t.detach().cpu(), (0, K - t.shape[-1]), value=v)  # noqa: E731
    return Code(torch.cat([pad(c.values_BK, 0.0) for c in codes]), torch.cat([pad(c.indices_BK, 0) for c in codes]),
                d_sae)


def _print_table(results: dict[str, dict]) -> None:
    print(f"{'sae':28s} {'L0':>8s} {'FVU':>7s} {'cos':>6s} {'dead%':>6s} {'loss rec.':>9s} {'KL':>8s}")
    for name, m in results.items():
        d = m.get("downstream", {})
        print(f"{name:28s} {m['l0']:8.1f} {m['fvu']:7.4f} {m['cosine']:6.3f} {100 * m['dead_frac']:6.1f} "
              f"{d.get('loss_recovered', float('nan')):9.3f} {d.get('kl', float('nan')):8.4f}"
              + (f"  MCC {m['gt_mcc']:.3f}" if "gt_mcc" in m else ""))
    for name, m in results.items():
        if "probing" in m:
            print(f"{name}: {summary_line(m['probing'])}")
    print(json.dumps({n: {"l0": round(m["l0"], 2), "fvu": round(m["fvu"], 4)} for n, m in results.items()}))
