import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from saex import config
from saex.cli import build_parser, main


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "saex", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("harvest", "train", "eval", "index", "explore", "demo", "zoo"):
        assert f"    {command} " in out


def test_flags_come_from_the_config_with_docstring_help():
    text = build_parser()._subparsers._group_actions[0].choices["harvest"].format_help()
    assert "--max-examples MAX_EXAMPLES" in text and "Harvest at most this many examples." in text
    assert "--dtype {bfloat16,float16}" in text and "--strict, --no-strict" in text


@dataclass
class _Cfg:
    name: str
    """The name."""
    n: int = 3
    """How many."""
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    items: list[str] = field(default_factory=lambda: ["x"])
    maybe: float | None = None


def test_config_parsing_roundtrip(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    config.add_arguments(p, _Cfg)
    cfg = config.from_args(_Cfg, p.parse_args(["--name", "z", "--n", "5", "--flag", "--items", "p", "q", "--maybe", "0.5"]))
    assert cfg == _Cfg("z", 5, "a", True, ["p", "q"], 0.5)
    assert config.from_args(_Cfg, p.parse_args(["--name", "z"])).items == ["x"]
    config.save(cfg, tmp_path / "c.json")
    assert config.load(_Cfg, tmp_path / "c.json") == cfg
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "z", "--mode", "c"])
    assert config.field_docs(_Cfg) == {"name": "The name.", "n": "How many."}


def test_zoo_list(capsys):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "minilm" in out and "fmnist-vit" in out
    assert main(["zoo", "train", "minilm"]) == 2
    assert "packaged, not trained by saex" in capsys.readouterr().err


def test_cli_reference_in_docs_is_current(monkeypatch):
    from pathlib import Path

    from saex.cli import markdown_reference

    monkeypatch.setenv("COLUMNS", "100")
    docs = Path(__file__).parents[1] / "docs" / "cli.md"
    assert docs.read_text() == markdown_reference(), "docs/cli.md is stale: run `make docs`"


def test_failures_are_one_line_user_errors_exit_2_and_bugs_exit_1(monkeypatch, capsys):
    import errno

    from saex import cli

    cases = [(MemoryError(), 2, "out of memory"),
             (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), 2, "lower --batch-size"),
             (OSError(errno.ENOSPC, "No space left on device", "/runs/x/acts"), 2,
              "no space left on the device writing /runs/x/acts; free some and run the same command again"),
             (OSError(errno.EACCES, "Permission denied", "/runs/x"), 2, "Permission denied: /runs/x"),
             (ZeroDivisionError("division by zero"), 1, "ZeroDivisionError: division by zero (this is a bug in saex")]
    for exc, code, message in cases:
        def fail(cfg, exc=exc):
            raise exc

        monkeypatch.setitem(cli.COMMANDS, "zoo", (cli.COMMANDS["zoo"][0], lambda: (cli.ZooConfig, fail)))
        assert cli.main(["zoo", "list"]) == code
        err = capsys.readouterr().err
        assert err.startswith("saex zoo: error: ") and message in err and err.count("\n") == 1, err
