"""Network namespaces for the agent's tests: made per test, always deleted afterwards."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("namespace tests need root (ip netns, TUN)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    if not Path("/dev/net/tun").exists():
        pytest.skip("/dev/net/tun is missing: no TUN support on this machine")


class AgentNetns:
    """A namespace made for one test."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, script: str, *args: str, timeout: float = 60) -> str:
        """Run a driver script of this directory inside the namespace; return its stdout."""
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, str(HERE / script), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc.stdout


@pytest.fixture
def agent_netns() -> Iterator[AgentNetns]:
    """A fresh, empty network namespace (loopback up) deleted when the test ends."""
    _require_root()
    name = f"cyag-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        yield AgentNetns(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)
