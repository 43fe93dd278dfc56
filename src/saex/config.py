"""Typed dataclass configs are the CLI: one flag per field, help from the field's docstring.

A field's docstring is the string literal right below it, as in

    batch_size: int = 64
    \"\"\"Examples per forward pass.\"\"\"
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path


def field_docs(cls) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of dataclass `cls` (positional when the field's metadata says so; none for a
    field whose metadata has cli=False: a value the stage sets itself)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp = _unwrap_optional(hints[f.name])
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kw: dict = {"help": docs.get(f.name, "")}
        if has_default and default not in (None, [], "") and tp is not bool:
            kw["help"] += f" (default: {default})"
        origin = typing.get_origin(tp)
        if tp is bool:
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        elif origin is typing.Literal:
            kw.update(choices=list(typing.get_args(tp)), default=default)
        elif origin in (list, tuple):
            kw.update(nargs="+", type=typing.get_args(tp)[0], default=None, action="extend")
        else:
            kw.update(type=tp, default=default)
        if f.metadata.get("positional"):
            kw.pop("default") if not has_default else kw.update(nargs="?")
            parser.add_argument(f.name, metavar=f.name.upper(), **kw)
            continue
        if not has_default or f.metadata.get("required"):
            kw["required"] = True
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def from_args(cls, ns: argparse.Namespace):
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.metadata.get("cli") is not False}
    # list flags start from None so that giving one replaces the default list instead of extending it
    return cls(**{k: v for k, v in values.items() if v is not None or not _is_list_field(cls, k)})


def _is_list_field(cls, name: str) -> bool:
    return typing.get_origin(_unwrap_optional(typing.get_type_hints(cls)[name])) in (list, tuple)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg) -> str:
    return json.dumps({"type": type(cfg).__name__, **to_dict(cfg)}, indent=2) + "\n"


def save(cfg, path: Path) -> None:
    from saex.atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), to_json(cfg).encode())


def load(cls, path: Path):
    """The config saved at `path`; ValueError naming the file when it is not one of `cls`."""
    try:
        data = json.loads(Path(path).read_bytes())
    except ValueError as e:  # invalid JSON or UTF-8
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("type", cls.__name__) != cls.__name__:
        raise ValueError(f"{path} does not hold a {cls.__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})
