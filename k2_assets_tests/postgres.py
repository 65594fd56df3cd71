"""A real PostgreSQL server for the tests of the production catalog: Debian's binaries, a temporary data
directory owned by the unprivileged `postgres` user, a free loopback port, trust auth on loopback only."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass

from k2_assets.dev.broker import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"PostgreSQL's {name} is missing: `bash scripts/get-postgresql` installs Debian's server")
    return found[-1]


@dataclass
class PostgresServer:
    data_dir: str
    port: int
    user: str = "postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = list(args) if os.geteuid() != 0 else ["runuser", "-u", self.user, "--", *args]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self._run(
            _bin("pg_ctl"),
            "-D",
            self.data_dir,
            "-l",
            f"{self.data_dir}/server.log",
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )

    def stop(self) -> None:
        self._run(_bin("pg_ctl"), "-D", self.data_dir, "-m", "fast", "-w", "stop", check=False)

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = f"k2_{uuid.uuid4().hex[:10]}"
        self._run(
            _bin("psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            self.user,
            "-d",
            "postgres",
            "-c",
            f"CREATE DATABASE {name}",
        )
        return self.uri(name)


def start_postgres() -> PostgresServer:
    root = tempfile.mkdtemp(prefix="k2-pg-", dir="/tmp")
    data = os.path.join(root, "data")
    os.makedirs(data)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (root, data):
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(root, 0o755)
    server = PostgresServer(data, free_port())
    server._run(_bin("initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    server.start()
    deadline = time.monotonic() + 30
    while server._run(_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(server.port), check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"PostgreSQL did not start: {open(os.path.join(data, 'server.log')).read()[-2000:]}")
        time.sleep(0.2)
    server.root = root
    return server


def stop_postgres(server: PostgresServer) -> None:
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)
