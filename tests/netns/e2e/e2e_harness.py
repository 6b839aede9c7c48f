"""Helpers of the end-to-end overlay tests (the ``overlay`` fixture is in conftest.py).

The harness itself is ``cyphonic_testbed.overlay`` (also used by the demo and benchmarks);
this module adds what the tests check: a TCP transfer through the overlay with its content
hashed at both ends, and the verdict on a capture of the firewall's outside interface.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cyphonic_testbed import Capture, NetBed, Node
from cyphonic_testbed.overlay import AgentProcess, OverlayServices
from cyphonic_testbed.probes import marked_payload as _marked
from cyphonic_testbed.probes import sha256, tcp_transfer  # noqa: F401  (for the tests)

MARKER = b"CYPHONIC-E2E-PLAINTEXT-MARKER-4b1d"


def marked_payload(size: int = 2_000_000) -> bytes:
    """``size`` bytes with this suite's marker all through them."""
    return _marked(MARKER, size)


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
