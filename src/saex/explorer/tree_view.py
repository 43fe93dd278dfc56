"""The explorer's feature trees: /tree and /tree/<name> draw a tree that `saex tree` wrote (RUN/trees/<name>.json)
by best parent, each node with its top tokens or thumbnails from its SAE's index; the feature page of the served
SAE lists its parents and children (the `tree_links` template global), and the navigation links /tree when a
tree exists (`tree_names`).

The explorer serves one SAE: nodes of that SAE link to its feature pages; nodes of another SAE link into the
tree and say how to serve that SAE. Thumbnails of every indexed SAE are served from RUN/index/ at /tree-thumbs."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse

from saex.explorer.db import IndexDB

MAX_CHILDREN = 32  # shown under a node; the rest are a link to the node's own subtree
ROOTS_PAGE = 50
TOP = 4  # top examples per node (thumbnails or strongest tokens)


@dataclass
class Tree:
    """One tree file, read into lookups by node id."""

    name: str
    data: dict
    nodes: dict[str, dict]
    kids: dict[str, list[str]]  # by best parent, highest score first
    parents: dict[str, list[dict]] = field(default_factory=dict)  # every edge into a node, highest score first
    children: dict[str, list[dict]] = field(default_factory=dict)  # every edge out of a node
    roots: list[str] = field(default_factory=list)
    size: dict[str, int] = field(default_factory=dict)  # nodes in the best-parent subtree, itself included

    @staticmethod
    def read(path: Path) -> "Tree":
        try:
            data = json.loads(path.read_bytes())
            nodes = {n["id"]: n for n in data["nodes"]}
            edges, best = data["edges"], data["best_parent"]
            data["levels"], data["threshold"]  # noqa: B018 (a tree file has them)
        except (ValueError, KeyError, TypeError) as e:
            raise HTTPException(500, f"{path} is not a tree that saex tree wrote ({type(e).__name__}: {e}); "
                                     "make it again with saex tree") from None
        t = Tree(path.stem, data, nodes, {})
        for e in sorted(edges, key=lambda e: -e["score"]):
            t.parents.setdefault(e["child"], []).append({**e, "best": best.get(e["child"]) == e["parent"]})
            t.children.setdefault(e["parent"], []).append({**e, "best": best.get(e["child"]) == e["parent"]})
            if best.get(e["child"]) == e["parent"]:
                t.kids.setdefault(e["parent"], []).append(e["child"])
        for nid in sorted(nodes, key=lambda n: -nodes[n]["level"]):  # deepest first: children sized before parents
            t.size[nid] = 1 + sum(t.size.get(k, 1) for k in t.kids.get(nid, []))
        t.roots = sorted((n for n in t.kids if n not in best), key=lambda n: (-t.size[n], nodes[n]["level"], n))
        return t

    def root_of(self, nid: str) -> str:
        best, seen = self.data["best_parent"], set()
        while nid in best and nid not in seen:
            seen.add(nid)
            nid = best[nid]
        return nid


class Trees:
    """The run's trees, each re-read when its file changes."""

    def __init__(self, run: Path):
        self.folder = Path(run) / "trees"
        self.cache: dict[str, tuple[int, Tree]] = {}
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json") if not p.name.startswith("."))

    def get(self, name: str) -> Tree | None:
        path = self.folder / f"{name}.json"
        if name not in self.names():
            return None
        mtime = path.stat().st_mtime_ns
        with self.lock:
            hit = self.cache.get(name)
            if hit is None or hit[0] != mtime:
                self.cache[name] = hit = (mtime, Tree.read(path))
        return hit[1]


class Briefs:
    """What the tree shows of each node from its SAE's index: top thumbnails (images) or the strongest token of
    each top example (text); nothing for an SAE without an index."""

    def __init__(self, run: Path, thumb_url: Callable[[str, str], str]):
        self.run, self.thumb_url = Path(run), thumb_url

    def index(self, sae: str) -> Path | None:
        path = self.run / "index" / sae / "index.sqlite"
        return path if path.exists() else None

    def of(self, nodes: list[dict]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        by_sae: dict[str, list[int]] = {}
        for n in nodes:
            by_sae.setdefault(n["sae"], []).append(int(n["latent"]))
        for sae, latents in by_sae.items():
            path = self.index(sae)
            if path is None:
                continue
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                for lo in range(0, len(latents), 500):
                    part = latents[lo:lo + 500]
                    rows = db.execute(
                        "SELECT fe.feature, fe.rank, fe.tokens, e.thumb FROM feature_examples fe JOIN examples e "
                        f"ON e.example = fe.example WHERE fe.kind = 'top' AND fe.rank < {TOP} AND fe.feature IN "
                        f"({', '.join('?' * len(part))}) ORDER BY fe.feature, fe.rank", part).fetchall()
                    for feature, _, tokens, thumb in rows:
                        b = out.setdefault(f"{sae}/{feature}", {"thumbs": [], "tokens": []})
                        if thumb:
                            b["thumbs"].append(self.thumb_url(sae, thumb))
                        if tokens:
                            window = json.loads(tokens)
                            if window:
                                b["tokens"].append(max(window, key=lambda ta: ta[1])[0])
            except sqlite3.Error:
                continue  # an index being rebuilt or damaged: the tree still draws, without its pictures
            finally:
                db.close()
        return out


def register(app: FastAPI, run: Path, db: IndexDB, page: Callable, env) -> None:
    """Add /tree, /tree/<name> and the thumbnails of every indexed SAE (/tree-thumbs/...); put `tree_links(j)`
    (the served SAE's feature j in every tree) and `tree_names()` in the templates' globals (`env`)."""
    from saex.explorer.app import IMAGE_SUFFIXES, Assets  # app.py is loaded by the time it calls us

    run = Path(run)
    served = db.meta["sae"]
    trees = Trees(run)
    thumbs = Assets(run / "index", "/tree-thumbs", IMAGE_SUFFIXES)
    app.mount(thumbs.mount, thumbs)
    briefs = Briefs(run, lambda sae, name: thumbs.url(f"{sae}/thumbs/{name}"))

    def how_to_serve(sae: str) -> str:
        if briefs.index(sae) is None:
            return f"index it with `saex index --run {run} --sae {sae}`, then serve it with `saex explore {run} --sae {sae}`"
        return f"serve it with `saex explore {run} --sae {sae}`"

    def href(t: Tree, nid: str) -> str:
        n = t.nodes[nid]
        return f"/feature/{n['latent']}" if n["sae"] == served else f"/tree/{t.name}?root={nid}"

    def links(j: int) -> list[dict]:
        nid = f"{served}/{j}"
        out = []
        for name in trees.names():
            t = trees.get(name)
            if t is None or nid not in t.nodes:
                continue
            side = lambda edges, key: [{"id": e[key], "href": href(t, e[key]), "score": e["score"], "best": e["best"],  # noqa: E731
                                        "served": t.nodes[e[key]]["sae"] == served} for e in edges]
            out.append({"tree": name, "parents": side(t.parents.get(nid, []), "parent"),
                        "children": side(t.children.get(nid, []), "child"),
                        "view": f"/tree/{name}?root={t.root_of(nid)}"})
        return out

    env.globals["tree_links"] = links
    env.globals["tree_names"] = trees.names

    def view(request: Request, t: Tree, root: str | None, offset: int, limit: int):
        if root is not None and root not in t.nodes:
            raise HTTPException(404, f"node {root!r} is not in tree {t.name!r} (node ids are <sae>/<latent>, "
                                     "for nodes that take part in an edge)")
        roots = [root] if root else t.roots[offset:offset + limit]
        shown, stack = [], list(roots)
        while stack:  # every node the page draws, for one batch of index lookups per SAE
            nid = stack.pop()
            shown.append(t.nodes[nid])
            stack.extend(t.kids.get(nid, [])[:MAX_CHILDREN])
        saes = sorted({lv["sae"] for lv in t.data["levels"]})
        return page(request, "tree.html", t=t, roots=roots, briefs=briefs.of(shown), served=served, offset=offset,
                    limit=limit, total=len(t.roots), root=root, names=trees.names(), max_children=MAX_CHILDREN,
                    href=lambda nid: href(t, nid), serve={s: how_to_serve(s) for s in saes if s != served})

    def missing() -> HTTPException:
        return HTTPException(404, f"no feature tree in {run / 'trees'}; make one with `saex tree --run {run} --saes "
                                  "NARROW,WIDE` (SAEs of two widths) or `--sae NAME` (a Matryoshka SAE's prefixes)")

    @app.get("/tree", response_class=HTMLResponse)
    def default_tree(request: Request, root: str | None = None, offset: int = Query(0, ge=0),
                     limit: int = Query(ROOTS_PAGE, ge=1, le=500)):
        names = trees.names()
        if not names:
            raise missing()
        mine = [n for n in names if any(lv["sae"] == served for lv in trees.get(n).data["levels"])]
        return view(request, trees.get((mine or names)[0]), root, offset, limit)

    @app.get("/tree/{name}", response_class=HTMLResponse)
    def named_tree(request: Request, name: str, root: str | None = None, offset: int = Query(0, ge=0),
                   limit: int = Query(ROOTS_PAGE, ge=1, le=500)):
        t = trees.get(name)
        if t is None:
            if not trees.names():
                raise missing()
            raise HTTPException(404, f"no tree named {name!r} in {run / 'trees'}; it has {trees.names()}")
        return view(request, t, root, offset, limit)
