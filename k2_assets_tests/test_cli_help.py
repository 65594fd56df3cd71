"""`k2 --help` and every subcommand's `--help` work, and a user error is one line with exit code 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

K2 = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "k2"
COMMANDS = ["", "demo", "demo-data", "stream", "stream binance", "feed", "broker", "writer", "query", "query trades",
            "query bars", "query symbols", "query summary", "recent", "report"]


def k2(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(K2), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_works_for_every_command(command):
    result = k2(*command.split(), "--help")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.startswith(f"usage: k2 {command}".rstrip()), result.stdout[:200]


@pytest.mark.parametrize("args", [["broker", "not-a-port"], ["report", "checks", "--start", "someday", "--end", "2014-03-14"],
                                  ["query", "trades", "--limit", "abc"], ["stream"], ["nonsense"]])
def test_a_user_error_is_one_line_with_exit_code_2(args):
    result = k2(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() and ("error" in result.stderr or "usage" in result.stderr)
