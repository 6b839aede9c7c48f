"""Real ``cyphonic-as``, ``cyphonic-trs`` and ``cyphonic-nms`` processes on loopback for the
console test: one PKI made by ``cyphonic-as init-pki``, one registry (the test's PostgreSQL
database), one Redis (the TRS directory and CID table, NMS presence and routes, under a key
prefix of this run). The NMS is told where the AS and the TRS admin APIs are, as an
operator would (CYPHONIC_AS_URL, CYPHONIC_TRS_ADMIN_URLS)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
DOMAIN = "cyphonic.internal"
START_TIMEOUT_S = 120.0
ADMIN_TOKEN = "console-admin-token-0123456789abcdef"  # shared by the three services


def free_port(kind: int, host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """One service process with its admin REST on loopback."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    quic_port: int
    log: Path

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                return None
        return self.proc.returncode


def start_service(
    name: str, args: list[str], *, env: dict[str, str], tmp: Path, quic_host: str = "127.0.0.1"
) -> Service:
    """``cyphonic-<name> serve`` with its own ports; returns once ``/readyz`` answers 200."""
    http_port = free_port(socket.SOCK_STREAM)
    quic_port = free_port(socket.SOCK_DGRAM, "::" if quic_host == "::" else quic_host)
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / f"cyphonic-{name}"),
                "serve",
                "--http-port",
                str(http_port),
                "--quic-host",
                quic_host,
                "--quic-port",
                str(quic_port),
                *args,
            ],
            env={
                **os.environ,
                "CYPHONIC_ENVIRONMENT": "test",
                "CYPHONIC_LOG_FORMAT": "json",
                **env,
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    service = Service(
        name=name, proc=proc, url=f"http://127.0.0.1:{http_port}", quic_port=quic_port, log=log
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"cyphonic-{name} exited {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{service.url}/readyz", timeout=2).status_code == 200:
                return service
        if time.monotonic() > deadline:
            service.stop()
            raise RuntimeError(
                f"cyphonic-{name} not ready in {START_TIMEOUT_S}s:\n{log.read_text()}"
            )
        time.sleep(0.2)


@dataclass
class Services:
    """The three services of one test, and the admin token they share."""

    tmp: Path
    token: str
    pki: Path
    auth: Service | None = None
    trs: Service | None = None
    nms: Service | None = None
    started: list[Service] = field(default_factory=list)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self, *, database_url: str, redis_url: str) -> None:
        subprocess.run(
            [BIN / "cyphonic-as", "init-pki", "--pki-dir", str(self.pki)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        common = {
            "CYPHONIC_PKI_DIR": str(self.pki),
            "CYPHONIC_ADMIN_TOKEN": self.token,
            "CYPHONIC_DOMAIN": DOMAIN,
        }
        shared = {
            "CYPHONIC_REDIS_URL": redis_url,
            "CYPHONIC_REDIS_PREFIX": f"console-{secrets.token_hex(4)}:",
            "CYPHONIC_RELAY_TOKEN_SECRET": secrets.token_hex(24),
        }
        self.auth = start_service(
            "as",
            ["--migrate"],
            env={**common, "CYPHONIC_DATABASE_URL": database_url},
            tmp=self.tmp,
        )
        self.started.append(self.auth)
        self.trs = start_service(
            "trs",
            ["--as-url", self.auth.url],
            env={**common, **shared, "CYPHONIC_REVOCATION_REFRESH_S": "0.5"},
            tmp=self.tmp,
        )
        self.started.append(self.trs)
        self.nms = start_service(
            "nms",
            ["--replica-id", "nms-1"],
            env={
                **common,
                **shared,
                "CYPHONIC_DATABASE_URL": database_url,
                "CYPHONIC_AS_URL": self.auth.url,
                "CYPHONIC_TRS_ADMIN_URLS": json.dumps([self.trs.url]),
                "CYPHONIC_REVOCATION_POLL_S": "0.5",
            },
            tmp=self.tmp,
            quic_host="::",  # dual-stack: nodes on 127.0.0.1 and on ::1
        )
        self.started.append(self.nms)

    def stop(self) -> list[tuple[str, int | None]]:
        """Stop in reverse order; each service's exit status."""
        return [(s.name, s.stop()) for s in reversed(self.started)]
