"""Child processes of the relay tests: ``cyphonic-nms serve`` and ``cyphonic-trs serve``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

ADMIN_TOKEN = "relay-admin-token-for-integration-tests"
RELAY_SECRET = "relay-secret-for-integration-tests-0123"


def free_port(kind: int) -> int:
    """A currently free loopback port of ``kind`` (SOCK_DGRAM or SOCK_STREAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """``python -m <module> serve`` as a child process with its admin REST on loopback."""

    def __init__(
        self, module: str, *, env: dict[str, str], log_path: Path, ready_marker: bytes
    ) -> None:
        self.module = module
        self.http_port = free_port(socket.SOCK_STREAM)
        self.log_path = log_path
        self.ready_marker = ready_marker
        self.env = {
            **os.environ,
            "CYPHONIC_ENVIRONMENT": "test",
            "CYPHONIC_HTTP_HOST": "127.0.0.1",
            "CYPHONIC_HTTP_PORT": str(self.http_port),
            "CYPHONIC_ADMIN_TOKEN": ADMIN_TOKEN,
            "CYPHONIC_LOG_FORMAT": "json",
            "CYPHONIC_RELAY_TOKEN_SECRET": RELAY_SECRET,
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def start(self, *, within_s: float = 60.0) -> None:
        self.launch()
        assert self.proc is not None
        deadline = asyncio.get_running_loop().time() + within_s
        async with httpx.AsyncClient() as client:
            while asyncio.get_running_loop().time() < deadline:
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

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> int | None:
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
        return httpx.AsyncClient(
            base_url=self.rest, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5
        )
