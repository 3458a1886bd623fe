"""The `dbgov` entry point dispatches every subcommand to its runner."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from dbgov_sidecar import cli, config, proxy_cli

POLICY = pathlib.Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"


@pytest.mark.parametrize("command", ["check", "proxy", "demo"])
def test_every_subcommand_has_a_runner(command: str) -> None:
    parser = cli.build_parser()
    argv = {"check": ["check", "--policy", "p.yaml", "SELECT 1"], "proxy": ["proxy"], "demo": ["demo"]}[
        command
    ]
    args = parser.parse_args(argv)
    assert callable(args.func)


def test_no_subcommand_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_every_proxy_flag_says_what_it_does_and_its_default() -> None:
    proxy = argparse.ArgumentParser(prog="dbgov proxy")
    proxy_cli.configure(proxy)
    flags = [a for a in proxy._actions if a.dest != "help"]
    assert len(flags) == len(dataclasses.fields(config.Settings))
    for action in flags:
        text = action.help or ""
        what, _, default = text.partition(" Default: ")
        assert len(what.split()) >= 4, action.option_strings
        assert config.env_name(action.dest) in what, action.option_strings
        assert default.endswith(".") and len(default) > 1, action.option_strings
    assert "Default: 127.0.0.1:9187." in proxy.format_help().replace("\n" + " " * 24, " ")


def test_a_command_prints_no_warning_without_xdg_runtime_dir() -> None:
    """platformdirs warned on every command: the CLI imported the demo's embedded PostgreSQL."""
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "PYTHONWARNINGS")}
    result = subprocess.run(
        [sys.executable, "-m", "dbgov_sidecar.cli", "check", "--policy", str(POLICY), "SELECT 1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("ALLOW")
    assert result.stderr == ""


def test_the_embedded_postgresql_imports_without_the_xdg_runtime_dir_warning() -> None:
    """`dbgov demo` and the test session import pgserver, whose import warned the same way."""
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "PYTHONWARNINGS")}
    result = subprocess.run(
        [sys.executable, "-c", "import dbgov_sidecar.embedded_pg"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
