"""The `dbgov` entry point dispatches every subcommand to its runner."""

from __future__ import annotations

import pytest

from dbgov_sidecar import cli


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
