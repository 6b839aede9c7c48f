"""Helpers of the end-to-end overlay tests (the ``overlay`` fixture is in conftest.py).

The harness itself is ``cyphonic_testbed.overlay`` (also used by the demo and benchmarks);
this module adds what the tests check: a TCP transfer through the overlay with its content
hashed at both ends, and the verdict on a capture of the firewall's outside interface.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cyphonic_testbed import Capture, NetBed, Node
from cyphonic_testbed.overlay import AgentProcess, OverlayServices

MARKER = b"CYPHONIC-E2E-PLAINTEXT-MARKER-4b1d"
TCP_PORT = 9000

# Receives until the announced length, answers with its SHA-256 (hex).
TCP_SERVER = r"""
import hashlib, socket, sys
host, size = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(sys.argv[3]))); s.listen(1); print("listening", flush=True)
s.settimeout(120); c, _ = s.accept(); c.settimeout(60)
h = hashlib.sha256(); n = 0
while n < size:
    chunk = c.recv(65536)
    if not chunk:
        break
    h.update(chunk); n += len(chunk)
c.sendall(h.hexdigest().encode()); c.close()
"""

TCP_CLIENT = r"""
import socket, sys
data = sys.stdin.buffer.read()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
c.sendall(data); print(c.recv(100).decode())
"""


@dataclass
class Overlay:
    """A bed with the services up and both nodes enrolled."""

    bed: NetBed
    services: OverlayServices
    states: dict[str, Path]
    agents: dict[str, AgentProcess]

    def start(self, name: str, *args: str) -> AgentProcess:
        """``cyphonic-agent up`` in host ``name`` (not waited for)."""
        agent = self.services.start_agent(self.bed.host(name), self.states[name], *args)
        self.agents[name] = agent
        return agent

    @property
    def alice(self) -> AgentProcess:
        return self.agents["alice"]

    @property
    def bob(self) -> AgentProcess:
        return self.agents["bob"]


def tcp_transfer(src: Node, dst: Node, address: str, payload: bytes) -> str:
    """Send ``payload`` over TCP from ``src`` to ``address`` (served in ``dst``); the SHA-256
    the receiver computed."""
    server = dst.popen([sys.executable, "-c", TCP_SERVER, address, str(len(payload)),
                        str(TCP_PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert server.stdout is not None
    line = server.stdout.readline()
    assert line == b"listening\n", (line, server.stderr.read() if server.stderr else b"")
    client = src.run([sys.executable, "-c", TCP_CLIENT, address, str(TCP_PORT)],
                     input=payload, text=False, timeout=150)
    assert client.returncode == 0, client.stderr.decode(errors="replace")
    server.wait(timeout=30)
    digest: str = client.stdout.decode().strip()
    return digest


def marked_payload(size: int = 2_000_000) -> bytes:
    """``size`` bytes with the marker all through them."""
    chunk = MARKER + os.urandom(1000)
    return (chunk * (size // len(chunk) + 1))[:size]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def not_quic_udp_443(capture: Capture) -> list[str]:
    """Packets on the wire that are neither UDP to/from port 443 nor IPv6 neighbour
    discovery (the link's own ARP-like chatter, never forwarded)."""
    odd = []
    for p in capture.packets():
        if p.family == 0:
            continue  # ARP and other non-IP frames of the link itself
        if p.protocol == "udp" and 443 in (p.sport, p.dport):
            continue
        if p.protocol == "icmpv6" and p.payload and p.payload[0] in (133, 134, 135, 136):
            continue
        odd.append(f"{p.protocol} {p.src}:{p.sport} > {p.dst}:{p.dport}")
    return odd


def udp_bytes(capture: Capture) -> int:
    """UDP payload bytes captured. Counted in bytes, not packets: the endpoint sends runs of
    datagrams with UDP GSO, which a capture on a veth sees as one large frame each."""
    return sum(len(p.payload) for p in capture.packets() if p.protocol == "udp")


def packets_seen(capture: Capture) -> int:
    """Frames tcpdump's filter received (its exit summary; it counts frames a busy machine
    made it drop before writing them), or the frames captured if it printed none."""
    log = capture.path.with_suffix(".log")
    text = log.read_text(errors="replace") if log.exists() else ""
    match = re.search(r"(\d+) packets? received by filter", text)
    return int(match.group(1)) if match else len(capture.packets())


def ping(node: Node, address: str, *, count: int = 3) -> subprocess.CompletedProcess[str]:
    """``ping`` inside ``node`` (IPv4 or IPv6 by the address)."""
    argv = ["ping", "-c", str(count), "-i", "0.2", "-W", "3", address]
    if ":" in address:
        argv.insert(1, "-6")
    result: subprocess.CompletedProcess[str] = node.run(argv, timeout=30)
    return result


def first_reply(node: Node, fqdn: str, *, family: int = 4) -> dict[str, Any]:
    """The probe: ms from the DNS stub's answer to the first echo reply, run in ``node``."""
    proc = node.run([sys.executable, "-m", "cyphonic_testbed.overlay", "first-reply",
                     "--name", fqdn, "--family", str(family), "--timeout", "15"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result
