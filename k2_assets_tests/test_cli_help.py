"""`k2 --help` and every subcommand's `--help` work, and a user error is one line on stderr with exit code 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import click
import pytest

from k2_assets.cli import cli

K2 = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "k2"


def command_paths(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand of `k2`, found from the click group itself (a new one cannot be missed)."""
    paths = [prefix]
    for name, command in sorted(group.commands.items()):
        paths += command_paths(command, (*prefix, name)) if isinstance(command, click.Group) else [(*prefix, name)]
    return paths


def k2(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(K2), *args], capture_output=True, text=True, timeout=120, check=False)


def test_every_command_is_found():
    names = {" ".join(p) for p in command_paths()}
    assert {
        "demo",
        "demo-data",
        "backfill",
        "check run",
        "check list",
        "stream binance",
        "feed",
        "broker",
        "writer",
        "query trades",
        "query bars",
        "query symbols",
        "query summary",
        "recent",
        "report checks",
        "report files",
    } <= names


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "k2")
def test_help_works_for_every_command(path):
    result = k2(*path, "--help")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.startswith(f"Usage: k2 {' '.join(path)}".rstrip()), result.stdout[:200]


@pytest.mark.parametrize(
    "args",
    [
        ["broker", "--port", "not-a-port"],
        ["report", "checks", "--start", "someday", "--end", "2014-03-14"],
        ["report", "files", "--start", "2014-03-14", "--end", "2014-03-10"],
        ["query", "trades", "--limit", "abc"],
        ["stream"],
        ["nonsense"],
        ["backfill", "no_such_asset", "--start", "2014-03-10", "--end", "2014-03-10"],
        ["check", "run", "asx_trades", "no_such_rule", "--partition", "2014-03-10"],
        ["demo-data", "--binance-dates", "yesterday"],
        ["stream", "binance", "--symbols", "BTCUSDT", "--topic", ""],
        ["writer", "--topic", "trades topic"],
        ["recent", "--symbol", "BTCUSDT", "--topic", "."],
    ],
)
def test_a_user_error_is_one_line_with_exit_code_2(args, tmp_path):
    result = subprocess.run(
        [str(K2), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "K2_HOME": str(tmp_path)},
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "error" in result.stderr


def test_a_bad_setting_is_one_line_with_exit_code_2(tmp_path):
    result = subprocess.run(
        [str(K2), "report", "files", "--start", "2014-03-10", "--end", "2014-03-10"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "K2_HOME": str(tmp_path), "K2_BROKER_PORT": "ninety"},
    )
    assert result.returncode == 2 and result.stderr.strip() == "k2: error: K2_BROKER_PORT='ninety' is not a valid int", (
        result.stderr
    )
