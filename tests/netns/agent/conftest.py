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


class VethPair:
    """Two namespaces joined by a veth pair: A 10.211.0.1/24, B 10.211.0.2/24 (IPv4 only)."""

    A_ADDR = "10.211.0.1"
    B_ADDR = "10.211.0.2"

    def __init__(self, ns_a: str, ns_b: str, dev_a: str) -> None:
        self.ns_a = ns_a
        self.ns_b = ns_b
        self.dev_a = dev_a
        self.processes: list[subprocess.Popen[bytes]] = []

    def popen(self, ns: str, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process inside ``ns``; it is stopped when the test ends."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", ns, *args], **kwargs
        )
        self.processes.append(proc)
        return proc

    def run(self, ns: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=timeout
        )


@pytest.fixture
def veth_pair() -> Iterator[VethPair]:
    """Two fresh namespaces joined by a veth; every process started through it is stopped
    and both namespaces deleted when the test ends, whatever happened."""
    _require_root()
    tag = secrets.token_hex(3)
    ns_a, ns_b = f"cyag-a-{tag}", f"cyag-b-{tag}"
    dev_a, dev_b = f"cyv{tag}a", f"cyv{tag}b"
    pair = VethPair(ns_a, ns_b, dev_a)
    try:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                dev_a,
                "netns",
                ns_a,
                "type",
                "veth",
                "peer",
                "name",
                dev_b,
                "netns",
                ns_b,
            ],
            check=True,
            timeout=10,
        )
        for ns, dev, addr in ((ns_a, dev_a, pair.A_ADDR), (ns_b, dev_b, pair.B_ADDR)):
            # IPv4 only on the veth: no link-local chatter (MLD, ND) in captures.
            subprocess.run(
                ["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1"],
                check=True,
                timeout=10,
            )
            subprocess.run(
                ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev], check=True, timeout=10
            )
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True, timeout=10)
        yield pair
    finally:
        for proc in pair.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in pair.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)
