"""Issue 18 row 1, the program side: the AS and NMS pods' `migrate` init containers start
together on a fresh database (several replicas) and before the in-chart PostgreSQL answers.
Real processes against this machine's PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.postgres]

ADMIN = os.environ.get("CYPHONIC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
BIN = Path(sys.executable).parent


async def _admin(statement: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(ADMIN).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def database() -> Iterator[str]:
    name = f"cymig_{secrets.token_hex(5)}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except OSError as exc:
        pytest.skip(f"PostgreSQL not reachable at {ADMIN}: {exc}")
    try:
        yield name
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _url(database: str, port: int = 5432) -> str:
    return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{database}"


def _migrate(command: str, url: str, wait: float) -> subprocess.Popen[str]:
    exe = shutil.which(command, path=str(BIN)) or command
    env = {**os.environ, "CYPHONIC_DATABASE_URL": url}
    return subprocess.Popen(
        [exe, "migrate", "--wait", str(wait)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_replicas_migrating_at_once_all_succeed(database: str) -> None:
    """Two AS and three NMS init containers on an empty database: one migrates, the others
    wait on the advisory lock and find the schema at head; none fails. (Without the lock this
    also passed here once: the processes' start-up staggers them. The lock makes it certain
    when they do meet; this test guards the outcome, not the lock itself.)"""
    procs = [_migrate("cyphonic-as", _url(database), 0) for _ in range(2)]
    procs += [_migrate("cyphonic-nms", _url(database), 0) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * 5, "\n---\n".join(outputs)


def test_migrate_waits_for_a_database_that_starts_later(database: str) -> None:
    """The in-chart PostgreSQL starts with the release: `migrate --wait` keeps trying while
    it is unreachable, then migrates."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = _migrate("cyphonic-as", _url(database, port), 60)
    time.sleep(3)
    assert proc.poll() is None, f"gave up while the database was down:\n{proc.stdout}"
    # The database "starts": a relay on that port to the real server.
    server = socket.create_server(("127.0.0.1", port))
    stop = threading.Event()

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

    def serve() -> None:
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)  # not the listener's accept timeout
            upstream = socket.create_connection(("127.0.0.1", 5432))
            upstream.settimeout(None)
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"migrate --wait never finished once the database answered:\n{out}")
        assert proc.returncode == 0, out
        assert "up to date" in out
    finally:
        stop.set()
        server.close()
        thread.join(timeout=5)


def test_migrate_without_wait_fails_at_once_on_a_missing_database() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    proc = _migrate("cyphonic-as", _url("nothing", port), 0)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "unavailable" in out and time.monotonic() - started < 30
