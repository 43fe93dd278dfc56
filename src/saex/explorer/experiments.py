"""The explorer's experiments: the edit page of one example, the edit API that it and the feature page's
steer control call, edit lists to download and load (the format of `saex edit --edits`), the ranking
of features by what ablating them does, and input attributions of a feature on an example (overlay PNGs
for images, (token, value) JSON for text), computed on first request and cached in the index folder.

Experiments run the run's model. It is loaded once, on the first request that needs it; one lock
serialises its use, since an edited forward pass hooks the model and two at once would see each other's
hook. Every input is checked against the index before the model is touched, so a bad request is a quick
4xx and never loads it."""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from saex.analysis.attribute_command import METHODS  # the CLI's names (that module imports no torch)
from saex.explorer.db import SQLITE_MAX_INT, IndexDB, is_row_id, shown

if TYPE_CHECKING:
    from saex.analysis.edit import Edit

MAX_EDITS = 64  # per request: each copy or pair source costs a forward pass, each edit a pass over the code
MAX_SOURCES = 4
MAX_NEIGHBOURS, NEIGHBOURS = 32, 8
MAX_VALUE = 1e6  # past this an edited activation overflows float32 downstream
MAX_POSITION = 2**31 - 1
RANKING_PAGE = 100
IG_STEPS = 64  # integrated gradients' path points, as `saex attribute` takes them by default
FOREVER, REVALIDATE = "public, max-age=31536000, immutable", "no-cache"  # app.py's policy for assets


def edits_json(edits: list[Edit]) -> list[dict]:
    from saex.analysis import edit  # it imports torch: loaded by the first experiment, not by the app

    return edit.edits_json(edits)


def finite(value):
    """A JSON-able value with every non-finite float as null (JSON has no nan or inf)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


class Lab:
    """The run's Experiment, made on first use and shared by every request; recent effects are kept by
    (example, edit list, neighbours), so a slider moved back or a page reloaded costs nothing."""

    def __init__(self, run: Path, sae: str, keep: int = 128, index: Path | None = None):
        self.run, self.sae, self.keep = Path(run), sae, keep
        self.index = index or self.run / "index" / sae / "index.sqlite"
        self.lock = threading.Lock()
        self.experiment = None
        self.failure: str | None = None
        self.effects: OrderedDict[tuple, dict] = OrderedDict()
        self.attributions_computed = 0

    def version(self) -> str:
        """The index build's version (index.sqlite's mtime, as app.py stamps assets): attribution URLs carry
        it, so a rebuilt index gets new URLs and an overlay cached for good by a browser is never stale."""
        try:
            return f"{self.index.stat().st_mtime_ns:x}"
        except OSError:
            return ""

    def cached(self, path: Path) -> os.stat_result | None:
        """The cache file's stat if it was written after the index was (an older one is of another build)."""
        try:
            st = path.stat()
            return st if st.st_mtime_ns >= self.index.stat().st_mtime_ns else None
        except OSError:
            return None

    def _experiment(self):
        if self.experiment is None and self.failure is None:
            try:
                from saex.analysis.experiment import Experiment

                self.experiment = Experiment(self.run, self.sae, device="cpu")
            except (OSError, ValueError, RuntimeError, ImportError, KeyError) as e:  # remembered: no retry per request
                self.failure = f"{type(e).__name__}: {e}".replace(str(self.run), self.run.name)
        if self.failure is not None:
            raise HTTPException(503, "experiments need the run's model, SAE and activations, and they did not "
                                     f"load: {self.failure}")
        return self.experiment

    def effect(self, example: int, edits: list[Edit], neighbours: int) -> dict:
        """Experiment.effect of a dataset example (callers must not change the dict: it is shared)."""
        key = (example, json.dumps(edits_json(edits), sort_keys=True), neighbours)
        with self.lock:
            if key in self.effects:
                self.effects.move_to_end(key)
                return self.effects[key]
            experiment = self._experiment()
            from saex.threads import torch_threads

            # One example is milliseconds of work (fmnist-vit: 16 patches), and torch's threads wait for each other
            # at the end of every operation: on 2 cores shared with busy processes an effect took 0.03-1.6 s on
            # 2 threads against 0.01-0.04 s on 1. So it runs on one; the process's count comes back after.
            try:
                with torch_threads(1):
                    out = finite(experiment.effect(str(example), edits, neighbours))
            except ValueError as e:  # e.g. positions that hold none of the selected tokens
                raise HTTPException(400, str(e)) from None
            except OSError as e:  # the dataset's files moved or went away since the index was built
                raise HTTPException(503, f"example {example} could not be read: {type(e).__name__}: "
                                         f"{e}".replace(str(self.run), self.run.name)) from None
            self.effects[key] = out
            while len(self.effects) > self.keep:
                self.effects.popitem(last=False)
        return out

    def attribution(self, example: int, feature: int, method: str, path: Path) -> bytes:
        """The attribution of `feature` on a dataset example by `method`: an overlay PNG (images) or JSON
        (text), written to `path` for later requests (a read-only index folder: served uncached)."""
        with self.lock:
            if self.cached(path):  # made by a request that held the lock while this one waited
                return path.read_bytes()
            experiment = self._experiment()
            from saex.analysis import attribution as attr
            from saex.threads import torch_threads

            try:
                inp, _ = experiment.input_of(str(example))
                batch = experiment.adapter.prepare([inp], experiment.context)
                with torch_threads(1):  # as for effects: tens of small operations, each slower on 2 threads
                    result = attr.compute(method, experiment.adapter, experiment.sae, experiment.point,
                                          experiment.tokens, feature, batch, steps=IG_STEPS)
                if experiment.adapter.modality == "image":
                    data = attr.overlay_png(attr.model_image(experiment.adapter, batch), result.values, colorbar=False)
                else:
                    from saex.explorer.windows import surface_pieces

                    ids = batch.inputs["input_ids"][0].tolist()
                    data = json.dumps(finite({
                        "example": example, "feature": feature, "method": method, "value": result.value,
                        "code_value": result.code_value, "completeness": result.completeness,
                        "tokens": [[t, v] for t, v in result.token_values()],  # the tokenizer's own strings
                        "text": surface_pieces(experiment.adapter.processor, ids)})).encode()  # as they read
            except ValueError as e:
                raise HTTPException(400, str(e)[:400]) from None
            except OSError as e:  # the dataset's files, moved since the index was built
                raise HTTPException(503, f"example {example} could not be read: {type(e).__name__}: "
                                         f"{e}".replace(str(self.run), self.run.name)) from None
            self.attributions_computed += 1
            from saex.atomic import atomic_write_bytes

            try:
                atomic_write_bytes(path, data)
            except OSError:
                pass
        return data


def _strict_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {shown(text, 20)} is too large")
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number an edit may use")


class EditChecker:
    """Edit lists from the web: JSON text -> checked edits whose sources are examples of the index."""

    def __init__(self, db: IndexDB):
        self.db, self.d_sae = db, db.meta["d_sae"]

    def parse(self, text: str | None, where: str = "edits") -> list[Edit]:
        if text is None or not text.strip():
            return []
        try:
            items = json.loads(text, parse_float=_strict_float, parse_constant=_refuse_constant)
        except RecursionError:
            raise HTTPException(400, f"{where} is nested too deeply to be an edit list") from None
        except ValueError as e:
            raise HTTPException(400, f"{where}={shown(text)} is not valid JSON ({e}); give a list of edits such "
                                     'as [{"op": "zero", "features": [3]}]') from None
        from saex.analysis.edit import parse_edits

        try:
            edits = parse_edits(items, self.d_sae, where)
        except ValueError as e:
            raise HTTPException(400, str(e)[:400]) from None
        if len(edits) > MAX_EDITS:
            raise HTTPException(400, f"{where} has {len(edits)} edits; the explorer runs at most {MAX_EDITS}")
        sources = {str(ref) for e in edits for ref in e.examples()}
        if len(sources) > MAX_SOURCES:
            raise HTTPException(400, f"{where} reads {len(sources)} other examples; the explorer reads at most "
                                     f"{MAX_SOURCES}")
        for i, e in enumerate(edits):
            self._check(e, f"{where}[{i}]")
        return edits

    def _check(self, e: Edit, where: str) -> None:
        if abs(e.value) > MAX_VALUE:
            raise HTTPException(400, f"{where}: value {shown(e.value)} is too large; valid: -{MAX_VALUE:g} to "
                                     f"{MAX_VALUE:g}")
        if e.positions is not None:
            if not isinstance(e.positions, list) or not e.positions or not all(
                    isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= MAX_POSITION for p in e.positions):
                raise HTTPException(400, f"{where}: positions {shown(e.positions)} must be a non-empty list of token "
                                         "positions (integers from 0), or left out for every selected token")
        for name in ("source", "target"):
            ref = getattr(e, name)
            if ref is not None:
                setattr(e, name, str(self.example(ref, f"{where}: {name}")))

    def example(self, ref, where: str) -> int:
        """An example id of the index, from an int or a decimal string."""
        text = str(ref) if isinstance(ref, (int, str)) and not isinstance(ref, bool) else None
        if text is None or not re.fullmatch(r"[0-9]{1,19}", text.strip()) or int(text) > SQLITE_MAX_INT:
            raise HTTPException(400, f"{where} {shown(ref)} must be an example id of this index (an integer)")
        if not self.db.examples_brief([int(text)]):
            raise HTTPException(404, f"{where}: example {int(text)} is not in the index")
        return int(text)


def register(app: FastAPI, run: Path, db: IndexDB, page: Callable, number: Callable, asset: Callable) -> None:
    """Add the experiment routes to the app; `page`, `number` and `asset` are the app's page renderer, query
    number parser and asset URL maker."""
    lab = app.state.experiments = Lab(run, db.meta["sae"], index=db.path)
    checker = EditChecker(db)

    def examples_of(effect: dict) -> dict[str, dict]:
        """What the page shows of the neighbours an effect names: id, label, thumbnail URL, text."""
        refs = [n["example"] for side in (effect.get("neighbours") or {}).values() for n in side]
        return {str(ex): {**b, "thumb": asset("thumbs", b["thumb"]) if b["thumb"] else None}
                for ex, b in db.examples_brief(refs).items()}

    def feature_brief(j: int) -> dict:
        f = db.feature(j) or {}
        top = [e for e in f.get("examples", []) if e["kind"] == "top"][:4]
        return {"density": f.get("density"), "top_label_name": f.get("top_label_name", ""),
                "thumbs": [asset("thumbs", e["thumb"]) for e in top if e["thumb"]],
                "snippet": "".join(t for t, _ in (top[0]["tokens"] or [])) if top and not top[0]["thumb"] else ""}

    @app.get("/api/edit")
    def edit_effect(request: Request):
        """What an edit list does to one example: Experiment.effect's JSON under "effect", the edits as
        checked, and the neighbours' ids, labels and thumbnails under "examples"."""
        ex = number(request, "example", int, 0, SQLITE_MAX_INT)
        if ex is None:
            raise HTTPException(400, "example is required: an example id of this index")
        ex = checker.example(ex, "example")
        edits = checker.parse(request.query_params.get("edits"))
        neighbours = number(request, "neighbours", int, 0, MAX_NEIGHBOURS)
        effect = lab.effect(ex, edits, NEIGHBOURS if neighbours is None else neighbours)
        return JSONResponse({"effect": effect, "edits": edits_json(edits), "examples": examples_of(effect)})

    @app.get("/api/edits")
    def edit_file(request: Request):
        """An edit list checked and in the edit file's form, as a download (`saex edit --edits FILE`)."""
        edits = checker.parse(request.query_params.get("edits"))
        return JSONResponse(edits_json(edits), headers={"Content-Disposition": 'attachment; filename="edits.json"'})

    @app.get("/edit/{ex}", response_class=HTMLResponse)
    def edit_page(request: Request, ex: int):
        e = db.example(ex)
        if e is None:
            raise HTTPException(404, f"example {ex} is not in the index")
        edits = edits_json(checker.parse(request.query_params.get("edits")))
        active = lab.effect(ex, [], NEIGHBOURS)["active_before"]  # what the page asks first: then in the cache
        return page(request, "edit.html", e=e, edits=edits,
                    features=[{**a, **feature_brief(a["feature"])} for a in active])

    @app.get("/ablation", response_class=HTMLResponse)
    def ablation(request: Request, by: str = Query("loss_delta", pattern="^(loss_delta|kl)$")):
        if not db.has_ablation:
            raise HTTPException(404, "this index has no ablation effects: build it again with `saex index` "
                                     "(its ablation pass) to rank features by them")
        offset = number(request, "offset", int, 0, SQLITE_MAX_INT) or 0
        rows, total = db.ablation_ranking(by, offset, RANKING_PAGE)
        return page(request, "ablation.html", rows=rows, total=total, by=by, offset=offset, size=RANKING_PAGE)

    register_attribution(app, db, lab, checker)


def register_attribution(app: FastAPI, db: IndexDB, lab: Lab, checker: EditChecker) -> None:
    """GET /attribution/{example}/{feature}.png (image runs) and /api/attribution/{example}/{feature} (text).
    Every parameter is checked against the index first; the answer is cached in RUN/index/<sae>/attributions/
    and sent, like the app's assets, immutable under the current ?v= and revalidated (ETag) otherwise."""
    image = db.meta.get("modality") == "image"

    def checked(ex: int, feature: int, method: str) -> Path:
        if not is_row_id(ex) or not db.examples_brief([ex]):
            raise HTTPException(404, f"example {shown(ex)} is not in the index")
        if not 0 <= feature < db.meta["d_sae"]:
            raise HTTPException(404, f"feature {shown(feature)} does not exist; this SAE has features "
                                     f"0..{db.meta['d_sae'] - 1}")
        if method not in METHODS:
            raise HTTPException(400, f"method={shown(method)} is not an attribution method; valid: {', '.join(METHODS)}")
        return db.folder / "attributions" / f"{ex}-{feature}-{method}.{'png' if image else 'json'}"

    def answer(request: Request, ex: int, feature: int, method: str, media: str) -> Response:
        path = checked(ex, feature, method)
        st = lab.cached(path)
        data = None if st else lab.attribution(ex, feature, method, path)
        st = st or lab.cached(path)
        headers = {"Cache-Control": FOREVER if request.query_params.get("v") == lab.version() else REVALIDATE}
        if st is not None:
            headers["ETag"] = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
            if request.headers.get("if-none-match") == headers["ETag"]:
                return Response(status_code=304, headers=headers)
        return Response(path.read_bytes() if data is None else data, media_type=media, headers=headers)

    @app.get("/attribution/{ex}/{feature}.png")
    def attribution_png(request: Request, ex: int, feature: int, method: str = "integrated-gradients"):
        """A heat map of which pixels raise (red) or lower (blue) the feature on the example, over its grey image."""
        if not image:
            raise HTTPException(404, "attribution overlays are for image runs; this is a text run: "
                                     f"/api/attribution/{ex}/{feature} gives each token's attribution as JSON")
        return answer(request, ex, feature, method, "image/png")

    @app.get("/api/attribution/{ex}/{feature}")
    def attribution_json(request: Request, ex: int, feature: int, method: str = "integrated-gradients"):
        """Each token's attribution of the feature on a text example: {"tokens": [[token, value], ...], ...}."""
        if image:
            raise HTTPException(404, "this is an image run: its attributions are overlays, at "
                                     f"/attribution/{ex}/{feature}.png")
        return answer(request, ex, feature, method, "application/json")
