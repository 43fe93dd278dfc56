"""The `saex` command: one subcommand per stage, plus `demo` and `zoo`."""

from __future__ import annotations

import argparse
import errno
import os
import sqlite3
import sys
from dataclasses import dataclass, field
from typing import Literal

from saex import __version__
from saex import config as configs


@dataclass
class ZooConfig:
    action: Literal["list", "train", "path"] = field(default="list", metadata={"positional": True})
    """list the embedded models, train one, or print the folder it loads from."""
    name: str | None = field(default=None, metadata={"positional": True})
    """Zoo model (for train and path)."""
    data_path: str | None = None
    """Fashion-MNIST folder when not in its default place (train fmnist-vit)."""


def run_zoo(cfg: ZooConfig) -> None:
    from saex.models.zoo import ZOO

    if cfg.action == "list":
        for entry in ZOO.values():
            try:
                where = str(entry.locate())
            except FileNotFoundError as e:
                where = f"not available: {e}"
            print(f"{entry.name:12s} {entry.description}\n{'':12s} {where}")
        return
    if cfg.name not in ZOO:
        raise ValueError(f"unknown zoo model {cfg.name!r}; the zoo has {sorted(ZOO)}")
    entry = ZOO[cfg.name]
    if cfg.action == "path":
        print(entry.locate())
    elif entry.train is None:
        raise ValueError(f"{cfg.name} is packaged, not trained by saex; zoo models saex trains: "
                         f"{sorted(n for n, e in ZOO.items() if e.train)}")
    else:
        entry.train(data_path=cfg.data_path)


def _harvest_cmd():
    from saex.harvest import HarvestConfig, harvest

    return HarvestConfig, harvest


def _toy_cmd():
    from saex.toy import ToyConfig, toy

    return ToyConfig, toy


def _train_cmd():
    from saex.train import TrainConfig, train

    return TrainConfig, train


def _eval_cmd():
    from saex.eval import EvalConfig, evaluate

    return EvalConfig, evaluate


def _index_cmd():
    from saex.explorer.index import IndexConfig, build_index

    return IndexConfig, build_index


def _explore_cmd():
    from saex.explorer.serve import ExploreConfig, explore

    return ExploreConfig, explore


def _edit_cmd():
    from saex.analysis.edit_command import EditConfig, run_edit

    return EditConfig, run_edit


def _attribute_cmd():
    from saex.analysis.attribute_command import AttributeConfig, run_attribute

    return AttributeConfig, run_attribute


def _tree_cmd():
    from saex.analysis.tree_command import TreeConfig, run_tree

    return TreeConfig, run_tree


def _demo_cmd():
    from saex.demo import DemoConfig, demo

    return DemoConfig, demo


# name -> (help, loader of (config class, function)); loaders import a stage only when it is used
COMMANDS = {
    "harvest": ("Capture a model's activations over a dataset into RUN/acts/.", _harvest_cmd),
    "toy": ("Write synthetic activations with known true features into RUN/acts/ (a toy model: power-law "
            "frequencies, correlation, hierarchy, superposition, noise).", _toy_cmd),
    "train": ("Train sparse autoencoders on a run's activations into RUN/saes/<name>/.", _train_cmd),
    "eval": ("Evaluate trained SAEs: reconstruction, sparsity, spliced downstream loss.", _eval_cmd),
    "index": ("Build the feature index (top examples, densities, labels, alignment) into RUN/index/<sae>/.",
              _index_cmd),
    "explore": ("Serve the feature explorer web app for a run (offline, on 127.0.0.1 by default).", _explore_cmd),
    "edit": ("Edit an example's SAE code (clamp, scale, add, zero, copy, pair) and show what changed downstream; "
             "writes RUN/experiments/<sae>/<example>-<hash>/.", _edit_cmd),
    "attribute": ("Which pixels or tokens of one input cause a feature (integrated gradients, gradient x input, "
                  "occlusion); writes RUN/experiments/<sae>/.", _attribute_cmd),
    "tree": ("Feature trees: link each latent of a wider SAE (or of a Matryoshka SAE's later groups) to its "
             "parents by directed masked cosine; writes RUN/trees/<name>.json.", _tree_cmd),
    "demo": ("Run the pipeline on an embedded default (fmnist-vit on Fashion-MNIST; --text for minilm).",
             _demo_cmd),
    "zoo": ("List, train or locate the embedded default models.", lambda: (ZooConfig, run_zoo)),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (`only`) one whose other subcommands have no flags, which saves importing
    every stage's modules (torch, transformers, FastAPI) just to run one."""
    parser = argparse.ArgumentParser(prog="saex", description="Train, evaluate and explore sparse autoencoders "
                                     "on vision and language transformers.")
    parser.add_argument("--version", action="version", version=f"saex {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, loader) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            configs.add_arguments(p, loader()[0])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    cls, fn = COMMANDS[args.command][1]()
    try:
        fn(configs.from_args(cls, args))
    except KeyboardInterrupt:
        print(f"\nsaex {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 (one line for the user; SAEX_DEBUG=1 shows the traceback)
        if os.environ.get("SAEX_DEBUG"):
            raise
        print(f"saex {args.command}: error: {error_message(e)}", file=sys.stderr)
        return 2 if isinstance(e, USER_ERRORS) or "out of memory" in str(e).lower() else 1
    return 0


# what a user's input or machine can cause: said in a line (exit 2); anything else is saex's bug (exit 1)
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, IndexError, ImportError, OSError, sqlite3.Error,
               MemoryError)


def error_message(e: Exception) -> str:
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return (f"out of memory ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}); lower "
                "--batch-size or the SAE's width (--d-sae, --expansion), or use a device with more memory")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "disk is full" in str(e):
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        return f"no space left on the device{where}; free some and run the same command again: it resumes"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, USER_ERRORS):
        return str(e)
    return f"{type(e).__name__}: {e} (this is a bug in saex; SAEX_DEBUG=1 shows where, please report it)"


def markdown_reference() -> str:
    """docs/cli.md, generated from the parser so that it cannot drift from the code (`make docs`)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = ["# Command reference", "", "Generated from `saex --help` by `make docs`; do not edit by hand.", ""]
    for name, p in sub.choices.items():
        lines += [f"## saex {name}", "", COMMANDS[name][0], ""]
        lines += ["```", p.format_usage().strip().removeprefix("usage: "), "```", ""]
        lines += ["| flag | help |", "|---|---|"]
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
            lines.append(f"| {flag} | {(action.help or '').replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)
