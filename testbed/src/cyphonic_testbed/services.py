"""Service helpers for beds: a private Redis inside a namespace, Postgres over its unix socket.

A process inside a namespace cannot reach the host's 127.0.0.1. Postgres is still reachable
through its unix-socket directory (the filesystem is shared), see ``postgres_url``; Redis gets a
private server inside a cloud host with ``start_redis``.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

from cyphonic_testbed.errors import TestbedError
from cyphonic_testbed.host import Host
from cyphonic_testbed.wait import wait_for

#: Where the host's Postgres listens on a unix socket (Debian default).
POSTGRES_SOCKET_DIR = "/var/run/postgresql"
#: Seconds Redis gets to answer PING after starting.
REDIS_START_TIMEOUT = 10.0


def postgres_url(
    database: str = "test",
    *,
    user: str = "postgres",
    driver: str = "postgresql+asyncpg",
    socket_dir: str = POSTGRES_SOCKET_DIR,
) -> str:
    """A SQLAlchemy URL reaching the host's Postgres through its unix socket, usable from
    inside any namespace (e.g. ``CYPHONIC_DATABASE_URL`` for a service in a bed)."""
    return f"{driver}://{user}@/{database}?host={socket_dir}"


@dataclass
class RedisServer:
    """A ``redis-server`` running inside a bed's namespace."""

    node: Host
    address: str
    port: int
    process: subprocess.Popen[Any]

    @property
    def url(self) -> str:
        """``redis://`` URL for clients inside the bed."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"redis://{host}:{self.port}/0"

    def ping(self) -> bool:
        """True when the server answers PING (asked from its own namespace)."""
        proc = self.node.run(
            ["redis-cli", "-h", self.address, "-p", str(self.port), "ping"], timeout=5.0
        )
        return proc.returncode == 0 and proc.stdout.strip() == "PONG"

    def stop(self) -> None:
        """Stop the server now (it is stopped at teardown anyway)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5.0)


def start_redis(node: Host, *, port: int = 6379, address: str | None = None) -> RedisServer:
    """Start a private, non-persistent ``redis-server`` on all addresses of ``node``; return
    once it answers PING. ``address`` (default: the node's first IPv4, else IPv6) is the one
    put in ``url``."""
    if address is None:
        found = node.addresses(4) or node.addresses(6)
        if not found:
            raise TestbedError(f"{node.name} has no address for Redis")
        address = found[0]
    log = node.bed.workdir / f"redis-{node.name}-{port}.log"
    argv = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "* -::*",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        str(node.bed.workdir),
        "--logfile",
        str(log),
    ]
    proc = node.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(node=node, address=address, port=port, process=proc)

    def up() -> bool:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1000:] if log.exists() else ""
            raise TestbedError(f"redis-server on {node.name} exited {proc.returncode}: {tail}")
        return server.ping()

    wait_for(up, REDIS_START_TIMEOUT, interval=0.1, message=f"redis-server on {node.name}")
    return server
