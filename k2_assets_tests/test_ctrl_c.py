"""Ctrl-C on every long-running `k2` command, as a user in a terminal sends it.

Each command is started for real and given its work (a broker, a feed, trades on the topic), then
SIGINT. It must say what it stops, exit 0 within 10 s, and leave no process of its own behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from k2_assets.dev.broker import free_port

REPO = Path(__file__).resolve().parents[1]
K2 = REPO / ".venv" / "bin" / "k2"
STOP_LIMIT = 10.0
READY_TIMEOUT = 60.0


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Command:
    """A `k2` command in its own process group, its output in a file the test reads."""

    def __init__(self, args: list[str], tmp_path: Path, name: str, env: dict):
        self.log = tmp_path / f"{name}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(K2), *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, ready, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready(self):
            if self.process.poll() is not None:
                pytest.fail(f"exited with {self.process.returncode} before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"not {what} within {READY_TIMEOUT:g} s:\n{self.output()[-3000:]}")
            time.sleep(0.2)

    def interrupt(self) -> tuple[float, list[psutil.Process]]:
        """SIGINT; the seconds until it and every process it started are gone, and any left behind."""
        family = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        started = time.monotonic()
        self.process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_LIMIT)
        _, alive = psutil.wait_procs(family, timeout=max(0.1, STOP_LIMIT - (time.monotonic() - started)))
        return time.monotonic() - started, alive

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture
def env(tmp_path, broker) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("K2_", "DAGSTER_"))}
    return clean | {"K2_HOME": str(tmp_path / "k2"), "K2_KAFKA_BOOTSTRAP": broker.bootstrap}


@pytest.fixture
def feed(tmp_path, env):
    port = free_port()
    command = Command(["feed", "--random-walk", "BTCUSDT,ETHUSDT", "--port", str(port), "--rate", "200"], tmp_path, "feed", env)
    command.wait_until(lambda _: listening(port), "listening")
    yield port
    command.kill()


def started_commands(name: str, tmp_path: Path, env: dict, request) -> tuple[Command, str]:
    """The command under test, once it is doing its work; and what it must say when it stops."""
    if name == "broker":
        port = free_port()
        command = Command(["broker", "--port", str(port)], tmp_path, name, env)
        command.wait_until(lambda c: "embedded Kafka-compatible broker on" in c.output(), "serving")
        return command, "k2 broker: SIGINT: stopping the embedded broker"
    if name == "feed":
        port = free_port()
        command = Command(["feed", "--random-walk", "BTCUSDT", "--port", str(port)], tmp_path, name, env)
        command.wait_until(lambda _: listening(port), "listening")
        return command, "k2 feed: SIGINT: stopping the local Binance feed"
    feed_port = request.getfixturevalue("feed")
    if name == "stream":
        command = Command(
            [
                "stream",
                "binance",
                "--symbols",
                "BTCUSDT,ETHUSDT",
                "--url",
                f"ws://127.0.0.1:{feed_port}",
                "--bootstrap",
                env["K2_KAFKA_BOOTSTRAP"],
            ],
            tmp_path,
            name,
            env,
        )
        command.wait_until(lambda c: '"connected"' in c.output(), "connected to the feed")
        time.sleep(2)  # producing
        return command, "k2 stream binance: SIGINT: stopping the stream of BTCUSDT,ETHUSDT"
    # The writer and `recent` read what a producer puts on the topic.
    producer = Command(
        ["stream", "binance", "--symbols", "BTCUSDT", "--url", f"ws://127.0.0.1:{feed_port}"], tmp_path, "producer", env
    )
    request.addfinalizer(producer.kill)
    producer.wait_until(lambda c: '"connected"' in c.output(), "connected to the feed")
    if name == "writer":
        command = Command(["writer"], tmp_path, name, env)
        command.wait_until(lambda c: '"written"' in c.output(), "writing")
        return command, "k2 writer: SIGINT: stopping the writer of market.crypto.trades.binance"
    command = Command(["recent", "--symbol", "BTCUSDT", "--minutes", "1", "--every", "1"], tmp_path, name, env)
    command.wait_until(lambda c: c.output().count("trades of BTCUSDT") >= 2, "answering twice")
    return command, "k2 recent: SIGINT: stopping asking every 1 s for BTCUSDT"


@pytest.mark.parametrize("name", ["broker", "feed", "stream", "writer", "recent"])
def test_ctrl_c_stops_a_long_running_command_within_10_seconds_and_says_what_it_stops(name, tmp_path, env, request):
    command, says = started_commands(name, tmp_path, env, request)
    try:
        took, left = command.interrupt()
        output = command.output()
        assert not left, f"{name}: still running {took:.1f} s after SIGINT: {[p.pid for p in left]}\n{output[-3000:]}"
        assert took <= STOP_LIMIT
        assert command.process.returncode == 0, output[-3000:]
        assert says in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
    finally:
        command.kill()
