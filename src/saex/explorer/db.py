"""Read-only queries on a feature index, one connection per request (SQLite is fast at this size)."""

from __future__ import annotations

import json
import math
import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path

SQLITE_MAX_INT = 2**63 - 1  # SQLite integers are signed 64-bit: binding a larger Python int raises OverflowError


def shown(value, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut short (a URL may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def is_row_id(i: int) -> bool:
    """Whether `i` may name a row: ids count from 0, and SQLite cannot even compare an int past its range."""
    return 0 <= i <= SQLITE_MAX_INT


@dataclass
class Filters:
    """What the feature navigator may skip: zero-entropy features, the dense cluster, a density range."""

    entropy_positive: bool = False
    hide_cluster: bool = False
    min_log_density: float | None = None
    max_log_density: float | None = None
    label: int | None = None
    lens_class: str | None = None  # the decoder's logit-weight class (lens_stats; analysis/taxonomy.py)

    def sql(self) -> tuple[str, list]:
        where, args = ["density > 0"], []
        if self.entropy_positive:
            where.append("label_entropy > 0")
        if self.hide_cluster:
            where.append("dense_cluster = 0")
        if self.min_log_density is not None:
            where.append("density >= ?")
            args.append(10 ** self.min_log_density)
        if self.max_log_density is not None:
            where.append("density <= ?")
            args.append(10 ** self.max_log_density)
        if self.label is not None:
            where.append("top_label = ?")
            args.append(self.label)
        if self.lens_class is not None:  # a primary-key probe per candidate: the navigator stops at the first hit
            where.append("EXISTS (SELECT 1 FROM lens_stats t WHERE t.feature = features.id AND t.lens_class = ?)")
            args.append(self.lens_class)
        return " AND ".join(where), args


class IndexDB:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.folder = self.path.parent
        with self._connect() as db:
            self.meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
            self.tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            # an index built before the ablation pass has no table, one built with --no-ablation an empty one
            self.has_ablation = "ablation" in self.tables and db.execute("SELECT 1 FROM ablation LIMIT 1").fetchone() is not None
            # the lens likewise: no table before it existed, empty with --no-lens or for a toy store
            self.has_lens = "lens_stats" in self.tables and db.execute("SELECT 1 FROM lens_stats LIMIT 1").fetchone() is not None
        self.label_names = self.meta.get("label_names") or []

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        db.row_factory = sqlite3.Row
        return db

    def feature(self, j: int) -> dict | None:
        if not is_row_id(j):
            return None
        with self._connect() as db:
            row = db.execute("SELECT * FROM features WHERE id = ?", (j,)).fetchone()
            if row is None:
                return None
            out = dict(row)
            out["examples"] = [dict(r) for r in db.execute(
                "SELECT fe.kind, fe.rank, fe.example, fe.value, fe.tokens, e.id AS example_id, e.label, e.thumb "
                "FROM feature_examples fe JOIN examples e ON e.example = fe.example WHERE fe.feature = ? "
                "ORDER BY fe.kind, fe.rank", (j,))]
            out["labels"] = [dict(r) for r in db.execute(
                "SELECT label, weight FROM feature_labels WHERE feature = ? ORDER BY weight DESC", (j,))]
        for e in out["examples"]:
            e["tokens"] = json.loads(e["tokens"]) if e["tokens"] else None
            e["label_name"] = self.label_name(e["label"])
        for lab in out["labels"]:
            lab["name"] = self.label_name(lab["label"])
        out["top_label_name"] = self.label_name(out["top_label"])
        out["lens"] = self.lens(j)
        return out

    def lens(self, j: int) -> dict | None:
        """Feature j through the model's readout (analysis/lens.py): for its decoder and encoder vectors the outputs
        promoted and suppressed most ({"dec": {"top": [{name, weight}], "bottom": [...]}, "enc": ...}), and the
        decoder's logit-weight statistics, class and histogram; None without the tables."""
        if not self.has_lens or not is_row_id(j):
            return None
        with self._connect() as db:
            stats = db.execute("SELECT * FROM lens_stats WHERE feature = ?", (j,)).fetchone()
            if stats is None:
                return None
            rows = db.execute("SELECT l.vector, l.rank, l.weight, o.name FROM lens l JOIN lens_outputs o ON o.output = "
                              "l.output WHERE l.feature = ? ORDER BY l.vector, l.rank", (j,)).fetchall()
        out = dict(stats)
        out["hist"] = json.loads(out["hist"]) if out["hist"] else []
        peak = math.log1p(max(out["hist"], default=0)) or 1.0  # bar heights in log(1 + count): the tails show
        out["hist_height"] = [math.log1p(c) / peak for c in out["hist"]]
        for vector in ("dec", "enc"):
            mine = [r for r in rows if r["vector"] == vector]
            out[vector] = {"top": [{"name": r["name"], "weight": r["weight"]} for r in mine if r["rank"] >= 0],
                           "bottom": [{"name": r["name"], "weight": r["weight"]} for r in reversed(mine) if r["rank"] < 0]}
        return out

    def ablation(self, j: int) -> dict | None:
        """What ablating feature j on its top examples did (KL, loss change, the labels it moves), with the mean
        change of each output's probability, largest first; None without the tables or for a feature not ablated."""
        if not self.has_ablation or not is_row_id(j):
            return None
        with self._connect() as db:
            row = db.execute("SELECT * FROM ablation WHERE feature = ?", (j,)).fetchone()
            if row is None:
                return None
            out = dict(row)
            out["outputs"] = [dict(r) for r in db.execute(
                "SELECT name, delta FROM ablation_outputs WHERE feature = ? ORDER BY delta DESC, name", (j,))] \
                if "ablation_outputs" in self.tables else []
        return out

    ABLATION_ORDERS = ("loss_delta", "kl")

    def ablation_ranking(self, by: str, offset: int, limit: int) -> tuple[list[dict], int]:
        """A page of ablated features, the largest `by` first (features without a value last), and how many
        there are in all."""
        if by not in self.ABLATION_ORDERS:
            raise ValueError(f"cannot rank by {by!r}; valid: {', '.join(self.ABLATION_ORDERS)}")
        with self._connect() as db:
            rows = [dict(r) for r in db.execute(
                f"SELECT a.*, f.density, f.top_label FROM ablation a LEFT JOIN features f ON f.id = a.feature "
                f"ORDER BY a.{by} IS NULL, a.{by} DESC, a.feature LIMIT ? OFFSET ?", (limit, offset))]
            total = db.execute("SELECT COUNT(*) FROM ablation").fetchone()[0]
        for r in rows:
            r["top_label_name"] = self.label_name(r["top_label"])
        return rows, total

    def examples_brief(self, examples: list[int]) -> dict[int, dict]:
        """Id, label name, thumbnail and the start of the text of each of these examples that the index holds."""
        wanted = sorted({e for e in examples if isinstance(e, int) and is_row_id(e)})
        if not wanted:
            return {}
        with self._connect() as db:
            rows = db.execute("SELECT example, id, label, thumb, substr(text, 1, 240) AS text FROM examples "
                              f"WHERE example IN ({', '.join('?' * len(wanted))})", wanted).fetchall()
        return {r["example"]: {"id": r["id"], "label": self.label_name(r["label"]), "thumb": r["thumb"],
                               "text": r["text"]} for r in rows}

    def label_name(self, label: int | None) -> str:
        if label is None or label < 0 or label >= len(self.label_names):
            return ""
        return self.label_names[label]

    def neighbour(self, j: int, step: int, filters: Filters) -> int | None:
        where, args = filters.sql()
        op, order = (">", "ASC") if step > 0 else ("<", "DESC")
        with self._connect() as db:
            row = db.execute(f"SELECT id FROM features WHERE id {op} ? AND {where} ORDER BY id {order} LIMIT 1",
                             [j, *args]).fetchone()
        return row[0] if row else None

    def first(self, filters: Filters) -> int | None:
        return self.neighbour(-1, 1, filters)

    def scatter(self) -> dict:
        with self._connect() as db:
            rows = db.execute("SELECT id, density, mean_top20, label_entropy, dense_cluster FROM features "
                              "WHERE density > 0").fetchall()
        return {"id": [r[0] for r in rows], "density": [r[1] for r in rows], "mean_top20": [r[2] for r in rows],
                "entropy": [r[3] for r in rows], "cluster": [r[4] for r in rows]}

    def example(self, ex: int) -> dict | None:
        if not is_row_id(ex):
            return None
        with self._connect() as db:
            row = db.execute("SELECT * FROM examples WHERE example = ?", (ex,)).fetchone()
            if row is None:
                return None
            out = dict(row)
            out["features"] = [dict(r) for r in db.execute(
                "SELECT ef.feature, ef.value, f.top_label, f.density FROM example_features ef "
                "JOIN features f ON f.id = ef.feature WHERE ef.example = ? ORDER BY ef.rank", (ex,))]
        out["label_name"] = self.label_name(out["label"])
        for f in out["features"]:
            f["top_label_name"] = self.label_name(f["top_label"])
        return out

    def game_round(self, rng: random.Random, candidates: int, max_log_density: float | None) -> dict:
        """An example with a thumbnail or text, its top features with their grids, and candidates."""
        with self._connect() as db:
            pool = [r[0] for r in db.execute("SELECT example FROM examples WHERE thumb IS NOT NULL OR text IS NOT NULL")]
            if len(pool) < candidates:
                raise ValueError(f"the index has {len(pool)} examples with a picture or text; the game needs {candidates}")
            answer = rng.choice(pool)
            where, args = ("", []) if max_log_density is None else (" AND f.density <= ?", [10.0 ** max_log_density])
            feats = [r[0] for r in db.execute(
                "SELECT ef.feature FROM example_features ef JOIN features f ON f.id = ef.feature "
                f"WHERE ef.example = ?{where} ORDER BY ef.rank LIMIT 3", [answer, *args])]
        others = rng.sample([p for p in pool if p != answer], candidates - 1)
        options = others + [answer]
        rng.shuffle(options)
        return {"answer": answer, "features": [self.feature(f) for f in feats],
                "options": [self.example(o) for o in options]}
