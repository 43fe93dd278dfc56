"""`saex tree`: feature trees across SAE widths (`--saes narrow,wide[,wider]`) or across one Matryoshka SAE's
nested prefixes (`--sae NAME`), from their activations on the same rows of the run's store; writes
RUN/trees/<name>.json (docs/trees.md describes its fields). On a toy store it also counts how many children's
best parent is their true parent."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saex.analysis import tree
from saex.atomic import atomic_write_json
from saex.locks import exclusive, reading
from saex.runlog import JsonlLog, progress
from saex.sae.code import Code
from saex.sae.io import load_sae, saved_saes
from saex.store import ActivationStore
from saex.threads import ThreadTuner, torch_threads

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


@dataclass
class TreeConfig:
    run: str = field(default="", metadata={"required": True})
    """Run folder with acts/ and saes/; the tree goes to RUN/trees/<name>.json."""
    saes: str | None = None
    """Two or more SAEs by name in RUN/saes/, comma-separated (narrow,wide,...; ordered by width automatically)."""
    sae: str | None = None
    """One Matryoshka SAE (fixed groups): its nested prefixes are the levels."""
    rows: int = 65536
    """Rows of the store to encode (a seeded random sample of them; all when the store has fewer)."""
    threshold: float = tree.THRESHOLD
    """Keep the edges whose score (directed masked cosine x max child / max parent) passes this."""
    name: str | None = None
    """Name of the tree (default: the SAEs' names joined by +, or <sae>-prefixes)."""
    seed: int = 0
    """Seed of the row sample."""
    chunk_rows: int = 8192
    """Rows encoded at a time."""
    device: str = "auto"
    """cpu, cuda, ...; auto picks cuda when there is one."""
    threads: int = 0
    """CPU threads (0: torch's count, fewer while other processes keep the cores busy; N: always N)."""


def _levels(cfg: TreeConfig, run: Path) -> tuple[list, str]:
    """([(sae name, SAE)] narrowest first, kind), checked."""
    if bool(cfg.saes) == bool(cfg.sae):
        raise ValueError("name the SAEs: --saes narrow,wide[,...] for a tree across widths, or --sae NAME for a "
                         "Matryoshka SAE's prefixes (one of the two)")
    names = [n.strip() for n in (cfg.saes or cfg.sae).split(",") if n.strip()]
    if cfg.sae and len(names) != 1:
        raise ValueError(f"--sae takes one Matryoshka SAE, got {cfg.sae!r}; several SAEs go in --saes")
    if cfg.saes and len(names) < 2:
        raise ValueError(f"--saes {cfg.saes!r} names one SAE; a tree across widths needs two or more "
                         "(or --sae NAME for a Matryoshka SAE's prefixes)")
    if len(set(names)) != len(names):
        raise ValueError(f"--saes {cfg.saes!r} names an SAE twice")
    folders = saved_saes(run / "saes", names)
    saes = [(f.name, load_sae(f)) for f in folders]
    if cfg.sae:
        sae = saes[0][1]
        if sae.cfg.matryoshka != "fixed":
            how = "random prefix lengths, so its latents have no fixed groups" if sae.cfg.matryoshka == "random" \
                else "not a Matryoshka SAE"
            raise ValueError(f"SAE {names[0]!r} is {sae.cfg.architecture} with matryoshka={sae.cfg.matryoshka!r}: "
                             f"{how}; --sae needs one trained with --matryoshka fixed (or compare SAEs of "
                             "several widths with --saes)")
        return saes, "matryoshka"
    for key, what in (("d_in", lambda s: s.d_in), ("hook", lambda s: s.metadata.get("hook"))):
        seen = {n: what(s) for n, s in saes}
        if len(set(seen.values())) > 1:
            raise ValueError(f"the SAEs differ in {key}: {seen}; a tree compares SAEs of one activation site")
    return sorted(saes, key=lambda ns: ns[1].d_sae), "widths"  # stable: equal widths keep the order given


def _rows(store: ActivationStore, n: int, seed: int) -> torch.Tensor:
    if n < 1:
        raise ValueError(f"--rows must be >= 1, got {n}")
    if n >= len(store):
        return torch.arange(len(store))
    return torch.randperm(len(store), generator=torch.Generator().manual_seed(seed))[:n].sort().values


@torch.no_grad()
def _encode(store, column, rows, saes, chunk: int, device: str) -> list[Code]:
    parts: list[list[Code]] = [[] for _ in saes]
    bar = progress(len(rows), "tree: encode", "rows")
    for s in range(0, len(rows), chunk):
        x = store.take(column, rows[s:s + chunk]).float().to(device)
        for part, sae in zip(parts, saes):
            code = sae.encode(x)
            part.append(Code(code.values_BK.float(), code.indices_BK, code.d_sae))
        bar.update(len(x))
    bar.close()
    return [tree.cat_codes(p) for p in parts]


def _toy_truth(run: Path, store: ActivationStore):
    if store.manifest.get("modality") != "toy":
        return None
    from saex.toy import load_toy

    model, _ = load_toy(run / "acts")
    return model


def _matches(sae, model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feature_of_latent_S, latent_of_feature_F, cos_S): the Hungarian matching of latents to true features,
    kept where |cos| >= CLAIM_COS (a latent that recovers its feature)."""
    from saex.analysis.ground_truth import CLAIM_COS, cosines, match

    cos_SF = cosines(sae.W_dec, model.features_FD)
    latent_F = torch.as_tensor(match(cos_SF)[0])
    F = len(latent_F)
    ok = latent_F >= 0
    c = torch.zeros(F, dtype=torch.float64)
    c[ok] = cos_SF[latent_F[ok], torch.arange(F)[ok]].abs()
    latent_F = torch.where(ok & (c >= CLAIM_COS), latent_F, -1)
    feature_S = torch.full((sae.d_sae,), -1, dtype=torch.int64)
    feature_S[latent_F[latent_F >= 0]] = torch.arange(F)[latent_F >= 0]
    cos_S = torch.zeros(sae.d_sae, dtype=torch.float64)
    cos_S[latent_F[latent_F >= 0]] = c[latent_F >= 0]
    return feature_S, latent_F, cos_S


def run_tree(cfg: TreeConfig) -> dict:
    if not cfg.run:
        raise ValueError("--run is required")
    run = Path(cfg.run)
    saes, kind = _levels(cfg, run)
    name = cfg.name or ("+".join(n for n, _ in saes) if kind == "widths" else f"{saes[0][0]}-prefixes")
    if not NAME.match(name) or len(name) > 200:
        raise ValueError(f"tree name {name!r} must be letters, digits and ._+=- (starting with a letter or digit); "
                         "pass --name")
    if not 0 < cfg.threshold:
        raise ValueError(f"--threshold must be > 0, got {cfg.threshold}")
    if cfg.chunk_rows < 1:
        raise ValueError(f"--chunk-rows must be >= 1, got {cfg.chunk_rows}")
    if cfg.threads < 0:
        raise ValueError(f"--threads must be 0 (tune) or more, got {cfg.threads}")
    store = ActivationStore(run / "acts")
    hook = saes[0][1].metadata.get("hook") or store.hooks[0]
    column = store.acts(hook)
    if store.d(hook) != saes[0][1].d_in:
        raise ValueError(f"the SAEs take d_in={saes[0][1].d_in}, but {run / 'acts'} holds {store.d(hook)}-wide "
                         f"activations at {hook}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    out = run / "trees" / f"{name}.json"
    t0 = time.perf_counter()
    with exclusive([run / "locks" / f"tree-{name}.lock"], "saex tree"), reading(run / "locks" / "acts.lock", "saex tree"):
        rows = _rows(store, cfg.rows, cfg.seed)
        codes = _encode(store, column, rows, [s.to(device) for _, s in saes], cfg.chunk_rows, device)
        model = _toy_truth(run, store)
    with torch_threads():  # the tuner may change torch's count: it comes back after
        tuner = ThreadTuner(cfg.threads, active=device == "cpu")
        result = _build(cfg, name, kind, saes, codes, device, model, tuner.timed)
    result.update(run=run.name, hook=hook, rows=len(rows), store_rows=len(store), seed=cfg.seed,
                  seconds=round(time.perf_counter() - t0, 3))
    atomic_write_json(out, result)
    JsonlLog(run, "tree").write("end", name=name, edges=len(result["edges"]), seconds=result["seconds"])
    toy = result.get("toy")
    told = (f"; toy: {toy['true_parent']}/{toy['children']} children's best parent is their true parent"
            + (f" ({toy['fraction']:.0%})" if toy["fraction"] is not None else "")) if toy else ""
    print(f"tree {name}: {len(result['edges']):,} edges over {len(result['levels'])} levels from {len(rows):,} rows "
          f"in {result['seconds']:.1f} s{told}; wrote {out}")
    return result


def _build(cfg: TreeConfig, name: str, kind: str, saes: list, codes: list[Code], device: str, model,
           timed) -> dict:
    """The tree's JSON: levels, the nodes that take part in an edge, edges, best parents (and the toy count)."""
    pairs = []  # (parent level, child level, Edges, parent sae index, parent_end_S or None)
    if kind == "widths":
        levels = [{"level": i, "sae": n, "width": s.d_sae, "latents": [0, s.d_sae]} for i, (n, s) in enumerate(saes)]
        bar = progress(sum(s.d_sae for _, s in saes[1:]), "tree: children", "latents")
        for i in range(1, len(saes)):
            pairs.append((i - 1, i, tree.tree_edges(codes[i - 1], codes[i], cfg.threshold, device=device,
                                                    on_chunk=bar.update, timed=timed), None))
        bar.close()
    else:
        from saex.sae.arch.matryoshka import prefix_ends

        sae = saes[0][1]
        ends = prefix_ends(sae.cfg, sae.d_sae, None)
        ranges = tree.group_ranges(ends)
        levels = [{"level": g, "sae": saes[0][0], "width": e, "latents": [s, e]} for g, (s, e) in enumerate(ranges)]
        bar = progress(sae.d_sae, "tree: children", "latents")
        parent_end = tree.prefix_parent_ends(ends)
        pairs.append((None, None, tree.matryoshka_edges(codes[0], ends, cfg.threshold, device=device,
                                                        on_chunk=bar.update, timed=timed), parent_end))
        bar.close()
        group_S = torch.bucketize(torch.arange(sae.d_sae), torch.tensor(ends), right=True)
    sae_of = lambda level: levels[level]["sae"]  # noqa: E731
    fires = [torch.zeros(c.d_sae, dtype=torch.int64).index_add_(
        0, c.indices_BK.flatten().cpu(), (c.values_BK > 0).flatten().long().cpu()) for c in codes]
    maxes = [tree.latent_max(c).cpu() for c in codes]
    nodes: dict[str, dict] = {}

    def node(level: int, j: int, code_i: int) -> str:
        nid = f"{sae_of(level)}/{j}"
        if nid not in nodes:
            nodes[nid] = {"id": nid, "sae": sae_of(level), "latent": j, "level": level,
                          "fires": int(fires[code_i][j]), "max_act": round(float(maxes[code_i][j]), 6)}
        return nid

    edges, best, toy = [], {}, None
    matches = [_matches(s, model) for _, s in saes] if model is not None else None
    for lp, lc, e, parent_end in pairs:
        for p, c, s, co in zip(e.parent_E.tolist(), e.child_E.tolist(), e.score_E.tolist(), e.cos_E.tolist()):
            if kind == "widths":
                pid, cid = node(lp, p, lp), node(lc, c, lc)
            else:
                pid, cid = node(int(group_S[p]), p, 0), node(int(group_S[c]), c, 0)
            edges.append({"parent": pid, "child": cid, "score": round(s, 6), "cos": round(co, 6)})
        for c, p in enumerate(e.best_parent_S.tolist()):
            if p >= 0:
                best[f"{sae_of(lc) if kind == 'widths' else saes[0][0]}/{c}"] = \
                    f"{sae_of(lp) if kind == 'widths' else saes[0][0]}/{p}"
        if matches is not None:
            pi, ci = (lp, lc) if kind == "widths" else (0, 0)
            r = tree.parent_recovery(e.best_parent_S, matches[ci][0], matches[pi][1], model.parent_F, parent_end)
            r.update(parent=levels[lp]["sae"] if kind == "widths" else "prefixes", child=levels[lc]["sae"]
                     if kind == "widths" else "prefixes")
            toy = toy or {"pairs": []}
            toy["pairs"].append(r)
    if toy is not None:
        n, h = sum(r["children"] for r in toy["pairs"]), sum(r["true_parent"] for r in toy["pairs"])
        toy.update(children=n, true_parent=h, fraction=h / n if n else None,
                   how="latents matched to true features (Hungarian, |cos| >= 0.5); a child counts when its feature's "
                       "true parent is recovered among its possible parents and its own feature is not")
        for nid, nd in nodes.items():
            feature_S, _, cos_S = matches[0 if kind == "matryoshka" else nd["level"]]
            f = int(feature_S[nd["latent"]])
            nd["feature"] = f if f >= 0 else None
            if f >= 0:
                nd["feature_cos"] = round(float(cos_S[nd["latent"]]), 4)
                nd["true_parent_feature"] = int(model.parent_F[f]) if int(model.parent_F[f]) >= 0 else None
        for lv in levels:
            feature_S = matches[0 if kind == "matryoshka" else lv["level"]][0]
            lo, hi = lv["latents"]
            lv["recovered_features"] = int((feature_S[lo:hi] >= 0).sum())
    for lv, code_i in zip(levels, range(len(levels)) if kind == "widths" else [0] * len(levels)):
        lo, hi = lv["latents"]
        lv["alive"] = int((fires[code_i][lo:hi] > 0).sum())
    out = {"name": name, "kind": kind, "threshold": cfg.threshold,
           "score": "directed masked cosine (over the rows where the child fires) x max(child) / max(parent)",
           "levels": levels, "nodes": list(nodes.values()), "edges": edges, "best_parent": best}
    if toy is not None:
        out["toy"] = toy
    return out
