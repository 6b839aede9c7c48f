"""A private ``redis-server`` and a private PostgreSQL cluster, for tests and benchmarks that
restart them (never the machine's shared servers, which other runs use).

    redis = PrivateRedis(tmp / "redis")
    redis.start()                      # redis-server on a free loopback port
    redis.restart(keep_data=False)     # SIGKILL and start empty; keep_data: SHUTDOWN SAVE
    pg = PrivatePostgres(tmp / "pg")
    pg.start()                         # initdb (as the ``postgres`` user when run as root)
    url = await pg.create_database("registry")
    pg.restart()                       # fast shutdown, start again on the same port
    ...
    redis.stop(); pg.destroy()

Both bind 127.0.0.1 only and live in the directory given; ``stop`` kills what they started and
nothing else. PostgreSQL comes from ``/usr/lib/postgresql/<version>/bin`` (or ``PG_BIN``).
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg
import redis

from cyphonic_testing.processes import free_port


def pg_bin() -> Path | None:
    """The PostgreSQL server binaries' directory, newest version first; None if absent."""
    explicit = os.environ.get("PG_BIN")
    if explicit:
        return Path(explicit)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    return Path(found[-1]).parent if found else None


def available() -> str | None:
    """Why private servers cannot run here (None: they can)."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    if pg_bin() is None:
        return "the PostgreSQL server binaries (initdb) are not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user for initdb"
    return None


def _wait_port(port: int, *, within_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {within_s} s")


class PrivateRedis:
    """``redis-server`` on its own port, data in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port(socket.SOCK_STREAM, host="127.0.0.1")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "3600 1",  # SIGTERM saves a snapshot; nothing is written while running
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        _wait_port(self.port, within_s=15, proc=self.proc)
        client = redis.Redis(port=self.port, socket_connect_timeout=2)
        try:
            for _ in range(100):
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, *, keep_data: bool = True) -> None:
        """SIGTERM (snapshot saved) or, without ``keep_data``, SIGKILL and the data gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if keep_data else signal.SIGKILL)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if not keep_data:
            (self.directory / "dump.rdb").unlink(missing_ok=True)

    def restart(self, *, keep_data: bool) -> None:
        self.stop(keep_data=keep_data)
        self.start()


class PrivatePostgres:
    """A PostgreSQL cluster in ``directory`` on its own loopback port, trust authentication."""

    def __init__(self, directory: Path) -> None:
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user:
            # initdb refuses root: the cluster belongs to the postgres user, in a directory it
            # can reach (pytest's and mkdtemp's are private to root); ``destroy`` removes it.
            directory = Path(tempfile.mkdtemp(prefix="cyphonic-pg-"))
            directory.chmod(0o755)
        self.directory = directory
        self.data = directory / "data"
        self.sockets = directory / "run"
        self.port = free_port(socket.SOCK_STREAM, host="127.0.0.1")
        self.proc: subprocess.Popen[bytes] | None = None
        binaries = pg_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL server binaries not found")
        self.bin = binaries

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, *, max_connections: int = 200) -> None:
        if not (self.data / "PG_VERSION").exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            self.sockets.mkdir(exist_ok=True)
            if self._user:
                entry = pwd.getpwnam(self._user)
                for path in (self.directory, self.sockets):
                    os.chown(path, entry.pw_uid, entry.pw_gid)
            subprocess.run(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ],
                check=True,
                capture_output=True,
                user=self._user,
                group=self._user,
            )
        log = (self.directory / "postgres.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.sockets),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"max_connections={max_connections}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=self._user,
            group=self._user,
        )
        log.close()
        _wait_port(self.port, within_s=30, proc=self.proc)

    async def ready(self, *, within_s: float = 30.0) -> None:
        """Wait until the server accepts a session (after recovery)."""
        deadline = time.monotonic() + within_s
        while True:
            try:
                conn = await asyncpg.connect(
                    host="127.0.0.1", port=self.port, user="postgres", database="postgres"
                )
            except (OSError, asyncpg.PostgresError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
                continue
            await conn.close()
            return

    async def create_database(self, name: str) -> str:
        """Create database ``name``; its SQLAlchemy URL."""
        await self.ready()
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="postgres", database="postgres"
        )
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)

    def stop(self, *, mode: str = "fast") -> None:
        """``fast`` (SIGINT: sessions cut, clean shutdown) or ``immediate`` (SIGQUIT: a crash,
        recovery at the next start)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT if mode == "immediate" else signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def restart(self, *, mode: str = "fast") -> None:
        self.stop(mode=mode)
        self.start()

    def destroy(self) -> None:
        """Stop (a crash is fine: nothing is kept) and remove the cluster's files."""
        self.stop(mode="immediate")
        shutil.rmtree(self.directory, ignore_errors=True)
