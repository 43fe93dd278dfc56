"""The explorer web app: overview, feature pages, example pages and the guess-the-input game; the
experiments (the edit page, steering, the ablation ranking) are in experiments.py.

Everything it shows comes from the run folder (metrics, plots, the feature index); every asset is
served locally, so it works offline."""

from __future__ import annotations

import math
import os
import random
import secrets
import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from pathlib import Path
from urllib.parse import quote, urlencode

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from saex.explorer import experiments
from saex.explorer.db import SQLITE_MAX_INT, Filters, IndexDB, shown

HERE = Path(__file__).parent
IMAGE_SUFFIXES = {".png", ".jpg", ".svg"}
LOG10_RANGE = (-308, 308)  # where 10**x is a finite, non-zero float
FOREVER, REVALIDATE = "public, max-age=31536000, immutable", "no-cache"


def find_index(run: Path, sae: str | None = None) -> Path:
    found = sorted(p.parent.name for p in (run / "index").glob("*/index.sqlite"))
    if not found:
        raise ValueError(f"no feature index in {run / 'index'}; run `saex index --run {run}` first")
    name = sae or found[0]
    if name not in found:
        raise ValueError(f"no index for SAE {name!r} in {run / 'index'}; it has {found}")
    return run / "index" / name / "index.sqlite"


class Assets(StaticFiles):
    """The files of one folder (thumbnails, plots, the app's CSS and JS) at `mount`.

    Pages link a file with its version (its mtime) in the URL, and such a URL may be cached for good: a
    file that changes (index rebuilt, eval re-run, another run served on the same port) gets a new URL.
    Any other URL (a bookmark, a stale version) must be revalidated; the ETag makes that a cheap 304."""

    def __init__(self, directory: Path, mount: str, suffixes: set[str] | None = None):
        super().__init__(directory=directory, check_dir=False)
        self.folder, self.mount, self.suffixes = Path(directory), mount, suffixes

    @staticmethod
    def version(stat: os.stat_result) -> str:
        return f"{stat.st_mtime_ns:x}"

    def url(self, name: str) -> str:
        try:
            return f"{self.mount}/{quote(name)}?v={self.version((self.folder / name).stat())}"
        except OSError:
            return f"{self.mount}/{quote(name)}"

    async def check_config(self) -> None:
        """A text run has no thumbnails folder: its URLs are 404s, not a server error."""

    def lookup_path(self, path: str):
        if self.suffixes is not None and Path(path).suffix.lower() not in self.suffixes:
            return "", None
        return super().lookup_path(path)  # refuses ../, absolute paths, null bytes, overlong names

    def file_response(self, full_path, stat_result, scope, status_code=200):
        response = super().file_response(full_path, stat_result, scope, status_code)
        versioned = Request(scope).query_params.get("v") == self.version(stat_result)
        response.headers["Cache-Control"] = FOREVER if versioned else REVALIDATE
        return response


class Rounds:
    """The answers of the game's rounds in play, by an opaque token, so that no page carries its answer.
    A round takes one guess; past `keep` open rounds the oldest are forgotten."""

    def __init__(self, keep: int = 10_000):
        self.answers: OrderedDict[str, int] = OrderedDict()
        self.keep, self.lock = keep, threading.Lock()

    def open(self, answer: int) -> str:
        token = secrets.token_urlsafe(12)
        with self.lock:
            self.answers[token] = answer
            while len(self.answers) > self.keep:
                self.answers.popitem(last=False)
        return token

    def close(self, token: str) -> int | None:
        with self.lock:
            return self.answers.pop(token, None)


def create_app(run: str | Path, sae: str | None = None) -> FastAPI:
    run = Path(run)
    db = IndexDB(find_index(run, sae))
    app = FastAPI(title="saex explorer", docs_url=None, redoc_url=None)
    templates = Jinja2Templates(directory=HERE / "templates")
    assets = {a.mount.strip("/"): a for a in (Assets(HERE / "static", "/static"),
                                              Assets(db.folder / "thumbs", "/thumbs", IMAGE_SUFFIXES),
                                              Assets(run / "eval", "/plots", IMAGE_SUFFIXES))}
    for a in assets.values():
        app.mount(a.mount, a)
    templates.env.globals["asset"] = lambda kind, name: assets[kind].url(name)
    common = {"meta": db.meta, "run": run.name, "has_ablation": db.has_ablation}
    rounds = Rounds()

    @app.middleware("http")
    async def server_time(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["Server-Timing"] = f"app;dur={1000 * (time.perf_counter() - start):.1f}"
        return response

    def page(request: Request, name: str, status: int = 200, headers=None, **context):
        return templates.TemplateResponse(request, name, {**common, **context}, status_code=status, headers=headers)

    async def error_page(request: Request, exc: StarletteHTTPException | RequestValidationError):
        """Every error as the site's page (JSON under /api/). FastAPI's 422 for a parameter that does not
        parse becomes a 404 for a path (no such page) and a 400 for a query (a bad request)."""
        if isinstance(exc, RequestValidationError):
            status = 404 if any(e["loc"][0] == "path" for e in exc.errors()) else 400
            detail = "; ".join(f"{e['loc'][-1]} is required" if e["type"] == "missing" else
                               f"{e['loc'][-1]}={shown(e['input'])}: {e['msg']}" for e in exc.errors())
            exc = StarletteHTTPException(status, f"no such page: {detail}" if status == 404 else detail)
        status, detail, headers = exc.status_code, exc.detail, exc.headers
        if (request.url.path + "/").startswith("/api/"):  # /api itself too
            return JSONResponse({"detail": detail}, status_code=status, headers=headers)
        return page(request, "error.html", status, headers, title=HTTPStatus(status).phrase, detail=detail)

    app.add_exception_handler(StarletteHTTPException, error_page)
    app.add_exception_handler(RequestValidationError, error_page)

    def number(request: Request, name: str, kind=float, lo=-math.inf, hi=math.inf):
        """A query parameter as a number from lo to hi; an empty form field means no value."""
        text = request.query_params.get(name, "").strip()
        if not text:
            return None
        try:
            value = kind(text)
        except ValueError:
            raise HTTPException(400, f"{name}={shown(text)} is not a valid {kind.__name__}") from None
        if not lo <= value <= hi:  # also refuses nan
            raise HTTPException(400, f"{name}={shown(text)} is out of range; valid: {lo} to {hi}")
        return value

    labels = (0, len(db.label_names) - 1) if db.label_names else (0, SQLITE_MAX_INT)

    def filters(request: Request) -> Filters:
        flag = lambda name: request.query_params.get(name, "") in ("true", "1", "on")  # noqa: E731
        lens_class = request.query_params.get("lens_class", "").strip() or None  # a class of this index's taxonomy
        valid = list((db.meta.get("lens") or {}).get("counts", {}))
        if lens_class is not None and lens_class not in valid:
            raise HTTPException(400, f"lens_class={shown(lens_class)} is not valid; valid: {', '.join(valid)}" if valid
                                else "this index has no lens taxonomy (built with --no-lens, from a toy store, or by an older saex)")
        return Filters(flag("entropy"), flag("hide_cluster"), number(request, "dmin", float, *LOG10_RANGE),
                       number(request, "dmax", float, *LOG10_RANGE), number(request, "label", int, *labels),
                       lens_class=lens_class)

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
                    query=("?" + query) if query else "", flt=flt, ablation=db.ablation(j))

    @app.get("/features")
    def navigate(request: Request):
        jump = number(request, "jump", int)
        flt = filters(request)
        query = urlencode([(k, v) for k, v in request.query_params.multi_items() if v and k != "jump"])
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
    def game(request: Request, candidates: int = Query(4, ge=2, le=12), seed: int | None = None,
             mode: str = Query("input", pattern="^(input|class)$")):
        max_log_density = number(request, "max_log_density", float, *LOG10_RANGE)
        rng = random.Random(seed)
        if mode == "class" and not db.label_names:
            raise HTTPException(404, "this dataset has no labels to guess; play mode=input")
        try:
            round_ = db.game_round(rng, candidates, max_log_density)
        except ValueError as e:
            raise HTTPException(404, str(e)) from e
        answer = round_.pop("answer")  # told by /api/game/check after the guess, never in the page
        if mode == "class":  # guess the class instead: every label is a candidate
            answer = next(o["label"] for o in round_["options"] if o["example"] == answer)
        return page(request, "game.html", r=round_, token=rounds.open(answer), candidates=candidates,
                    max_log_density=max_log_density, mode=mode)

    @app.get("/api/game/check")
    def check(choice: int, token: str = Query(alias="round")):
        answer = rounds.close(token)
        if answer is None:
            raise HTTPException(404, "no such game round: it was answered already or is too old; play the next one")
        return {"correct": choice == answer, "answer": answer}

    @app.get("/api/scatter")
    def scatter():
        return JSONResponse(db.scatter())  # plain lists: skip FastAPI's per-element encoder (65k features)

    @app.get("/api/feature/{j}")
    def feature_json(j: int):
        f = db.feature(j)
        if f is None:
            raise HTTPException(404, f"feature {j} does not exist")
        return f

    experiments.register(app, run, db, page, number, templates.env.globals["asset"])
    from saex.explorer import tree_view  # feature trees: /tree, and the feature page's parents and children

    tree_view.register(app, run, db, page, templates.env)
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

    return app
