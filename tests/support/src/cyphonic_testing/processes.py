"""Service CLIs as child processes of a test: the one helper every test uses to start
``cyphonic-as``, ``cyphonic-nms`` or ``cyphonic-trs`` on loopback and stop it again.

    proc = ServiceProcess("cyphonic_nms.cli", env={...}, log_path=tmp / "nms.log",
                          ready_marker=b"quic_listening")
    await proc.start()      # until /readyz answers 200 and the marker is in the log
    ...
    proc.stop()             # SIGTERM, then SIGKILL after 15 s
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

ADMIN_TOKEN = "service-admin-token-for-integration-tests"
RELAY_SECRET = "relay-secret-for-integration-tests-0123"


def free_port(kind: int, *, host: str = "::") -> int:
    """A currently free port (``socket.SOCK_DGRAM`` or ``SOCK_STREAM``) on ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """``python -m <module> <command...>`` with its admin REST on loopback, JSON logs in a
    file. ``env`` adds to (and overrides) the test defaults below."""

    def __init__(
        self,
        module: str,
        *,
        env: Mapping[str, str],
        log_path: Path,
        ready_marker: bytes,
        command: Sequence[str] = ("serve",),
        admin_token: str = ADMIN_TOKEN,
    ) -> None:
        self.module = module
        self.command = list(command)
        self.http_port = free_port(socket.SOCK_STREAM, host="127.0.0.1")
        self.log_path = log_path
        self.ready_marker = ready_marker
        self.admin_token = admin_token
        self.env = {
            **os.environ,
            "CYPHONIC_ENVIRONMENT": "test",
            "CYPHONIC_HTTP_HOST": "127.0.0.1",
            "CYPHONIC_HTTP_PORT": str(self.http_port),
            "CYPHONIC_ADMIN_TOKEN": admin_token,
            "CYPHONIC_LOG_FORMAT": "json",
            "CYPHONIC_RELAY_TOKEN_SECRET": RELAY_SECRET,
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        """Start the process (output appended to ``log_path``); returns at once."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.command],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def start(self, *, within_s: float = 60.0) -> None:
        """Launch and wait until /readyz answers 200 and ``ready_marker`` was logged."""
        self.launch()
        await self.wait_ready(within_s=within_s)

    async def wait_ready(self, *, within_s: float = 60.0) -> None:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        async with httpx.AsyncClient() as client:
            while loop.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.module} exited: {self.tail()}")
                try:
                    ready = await client.get(f"{self.rest}/readyz", timeout=1)
                    if ready.status_code == 200 and self.ready_marker in self.log_path.read_bytes():
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.module} did not become ready: {self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        """The end of the log (for failure messages)."""
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> int | None:
        """SIGTERM and wait (kill after 15 s); the exit status, None if it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            return None

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def admin(self) -> httpx.AsyncClient:
        """An admin REST client with the bearer token."""
        return httpx.AsyncClient(
            base_url=self.rest,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=5,
        )


@dataclass
class CliService:
    """One ``cyphonic-<name> serve`` process started from its console script with CLI flags
    (as an operator starts it), its admin REST on loopback."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    quic_port: int
    log: Path

    def stop(self) -> int | None:
        """SIGTERM and wait (kill after 20 s); the exit status, None if it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                return None
        return self.proc.returncode


def start_cli_service(
    name: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    tmp: Path,
    quic_host: str = "127.0.0.1",
    within_s: float = 120.0,
) -> CliService:
    """``cyphonic-<name> serve --http-port .. --quic-host .. --quic-port .. <args>`` with its
    own free ports, output in ``tmp/<name>.log``; returns once ``/readyz`` answers 200."""
    http_port = free_port(socket.SOCK_STREAM, host="127.0.0.1")
    quic_port = free_port(socket.SOCK_DGRAM, host=quic_host)
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / f"cyphonic-{name}"),
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
    service = CliService(name, proc, f"http://127.0.0.1:{http_port}", quic_port, log)
    deadline = time.monotonic() + within_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"cyphonic-{name} exited {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{service.url}/readyz", timeout=2).status_code == 200:
                return service
        if time.monotonic() > deadline:
            service.stop()
            raise RuntimeError(f"cyphonic-{name} not ready in {within_s}s:\n{log.read_text()}")
        time.sleep(0.2)
