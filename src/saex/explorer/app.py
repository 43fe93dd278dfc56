"""The explorer web app: overview, feature pages, example pages and the guess-the-input game.

Everything it shows comes from the run folder (metrics, plots, the feature index); every asset is
served locally, so it works offline."""

from __future__ import annotations

import random
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from saex.explorer.db import Filters, IndexDB

HERE = Path(__file__).parent
IMAGE_SUFFIXES = {".png", ".jpg", ".svg"}


def find_index(run: Path, sae: str | None = None) -> Path:
    found = sorted(p.parent.name for p in (run / "index").glob("*/index.sqlite"))
    if not found:
        raise ValueError(f"no feature index in {run / 'index'}; run `saex index --run {run}` first")
    name = sae or found[0]
    if name not in found:
        raise ValueError(f"no index for SAE {name!r} in {run / 'index'}; it has {found}")
    return run / "index" / name / "index.sqlite"


def _safe_file(folder: Path, name: str) -> Path:
    """A file directly inside `folder`; anything that would leave it (../, absolute, sub-folders) is refused."""
    path = (folder / name).resolve()
    if path.parent != folder.resolve() or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        raise HTTPException(404, f"no such file: {name}")
    return path


def create_app(run: str | Path, sae: str | None = None) -> FastAPI:
    run = Path(run)
    db = IndexDB(find_index(run, sae))
    app = FastAPI(title="saex explorer", docs_url=None, redoc_url=None)
    templates = Jinja2Templates(directory=HERE / "templates")
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    common = {"meta": db.meta, "run": run.name}

    @app.middleware("http")
    async def server_time(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["Server-Timing"] = f"app;dur={1000 * (time.perf_counter() - start):.1f}"
        return response

    def page(request: Request, name: str, status: int = 200, **context):
        return templates.TemplateResponse(request, name, {**common, **context}, status_code=status)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        detail = getattr(exc, "detail", "not found")
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": detail}, status_code=404)
        return page(request, "404.html", status=404, detail=detail)

    def number(request: Request, name: str, kind=float):
        """A query parameter as a number; an empty form field means no value."""
        text = request.query_params.get(name, "").strip()
        if not text:
            return None
        try:
            return kind(text)
        except ValueError:
            raise HTTPException(400, f"{name}={text!r} is not a valid {kind.__name__}") from None

    def filters(request: Request) -> Filters:
        flag = lambda name: request.query_params.get(name, "") in ("true", "1", "on")  # noqa: E731
        return Filters(flag("entropy"), flag("hide_cluster"), number(request, "dmin"), number(request, "dmax"),
                       number(request, "label", int))

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request):
        pareto = (run / "eval" / "pareto.svg").exists()
        return page(request, "overview.html", pareto=pareto, hist=db.meta.get("metrics", {}) or {})

    @app.get("/feature/{j}", response_class=HTMLResponse)
    def feature(request: Request, j: int):
        f = db.feature(j)
        if f is None:
            raise HTTPException(404, f"feature {j} does not exist; this SAE has features 0..{db.meta['d_sae'] - 1}")
        flt = filters(request)
        query = str(request.url.query)
        return page(request, "feature.html", f=f, prev=db.neighbour(j, -1, flt), next=db.neighbour(j, 1, flt),
                    query=("?" + query) if query else "", flt=flt)

    @app.get("/features")
    def navigate(request: Request):
        jump = number(request, "jump", int)
        flt = filters(request)
        query = "&".join(f"{k}={v}" for k, v in request.query_params.items() if v and k != "jump")
        if jump is not None:
            return RedirectResponse(f"/feature/{jump}" + (f"?{query}" if query else ""), status_code=303)
        first = db.first(flt)
        if first is None:
            raise HTTPException(404, "no feature passes these filters")
        return RedirectResponse(f"/feature/{first}" + (f"?{query}" if query else ""), status_code=303)

    @app.get("/example/{ex}", response_class=HTMLResponse)
    def example(request: Request, ex: int):
        e = db.example(ex)
        if e is None:
            raise HTTPException(404, f"example {ex} is not in the index")
        return page(request, "example.html", e=e)

    @app.get("/game", response_class=HTMLResponse)
    def game(request: Request, candidates: int = Query(4, ge=2, le=12), max_log_density: float | None = None,
             seed: int | None = None, mode: str = Query("input", pattern="^(input|class)$")):
        rng = random.Random(seed)
        if mode == "class" and not db.label_names:
            raise HTTPException(404, "this dataset has no labels to guess; play mode=input")
        try:
            round_ = db.game_round(rng, candidates, max_log_density)
        except ValueError as e:
            raise HTTPException(404, str(e)) from e
        if mode == "class":  # guess the class instead: every label is a candidate
            answer_label = next(o["label"] for o in round_["options"] if o["example"] == round_["answer"])
            round_["classes"] = [{"name": n, "correct": i == answer_label} for i, n in enumerate(db.label_names)]
        return page(request, "game.html", r=round_, candidates=candidates, max_log_density=max_log_density, mode=mode)

    @app.get("/api/scatter")
    def scatter():
        return JSONResponse(db.scatter())  # plain lists: skip FastAPI's per-element encoder (65k features)

    @app.get("/api/feature/{j}")
    def feature_json(j: int):
        f = db.feature(j)
        if f is None:
            raise HTTPException(404, f"feature {j} does not exist")
        return f

    heat = {}

    @app.get("/api/example/{ex}/patches")
    def patches(ex: int, feature: int):
        """A feature's activation on every patch of an image example, as a side x side grid."""
        grid = db.meta.get("patch_grid")
        e = db.example(ex)
        if grid is None or e is None or not 0 <= feature < db.meta["d_sae"]:
            raise HTTPException(404, "no patch activations for this example and feature")
        if not heat:
            import torch

            from saex.sae.io import load_sae
            from saex.store import ActivationStore

            heat.update(sae=load_sae(run / "saes" / db.meta["sae"]), store=ActivationStore(run / "acts"), torch=torch)
        torch, store, sae = heat["torch"], heat["store"], heat["sae"]
        rows = torch.arange(e["first_row"], e["first_row"] + e["n_rows"])
        with torch.no_grad():
            acts = sae.encode(store.take(store.acts(db.meta["hook"]), rows).float()).dense()[:, feature]
        values = [0.0] * grid["side"] ** 2
        for pos, a in zip(store.take("position", rows).tolist(), acts.tolist()):
            if 0 <= pos - grid["offset"] < len(values):
                values[pos - grid["offset"]] = a
        return {"side": grid["side"], "values": values, "max": max(values + [1e-9])}

    @app.get("/thumbs/{name}")
    def thumb(name: str):
        return FileResponse(_safe_file(db.folder / "thumbs", name))

    @app.get("/plots/{name}")
    def plot(name: str):
        return FileResponse(_safe_file(run / "eval", name))

    return app
