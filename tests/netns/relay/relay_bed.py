"""Helpers of the relayed (pattern 3) end-to-end tests: the TRS process in its cloud host,
its admin REST from inside that namespace, name resolution through the agents' DNS stubs
for ordinary programs, a checked TCP transfer, and the reading of a capture at the TRS.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cyphonic_testbed import Capture, Node
from cyphonic_testbed.overlay import TrsProcess, start_trs  # noqa: F401  (re-exported for the tests)
from cyphonic_testbed.probes import marked_payload as _marked
from cyphonic_testbed.probes import sha256, tcp_transfer  # noqa: F401  (for the tests)

MARKER = b"CYPHONIC-RELAY-E2E-PLAINTEXT-MARKER-93c7"


# Deletes the UDP connection-tracking entries (hence NAT mappings) whose original source is
# argv[1] in the namespace it runs in; prints how many (``conntrack -D`` without the tool).
FORGET_MAPPINGS = r"""
import socket, sys
from pyroute2 import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
ct = Conntrack()
match = NFCTAttrTuple(saddr=sys.argv[1], proto=socket.IPPROTO_UDP)
entries = list(ct.dump_entries(tuple_orig=match))
for entry in entries:
    ct.delete(entry)
print(len(entries))
"""


def marked_payload(size: int = 2_000_000) -> bytes:
    """``size`` bytes with this suite's marker all through them."""
    return _marked(MARKER, size)


def forget_udp_mappings(router: Node, source: str) -> int:
    """Make ``router``'s NAT forget every UDP mapping of ``source`` (as after a reboot of the
    box): the next packets get new ones. The number of mappings deleted."""
    proc = router.run([sys.executable, "-c", FORGET_MAPPINGS, source], timeout=30)
    if proc.returncode != 0:
        raise AssertionError(f"deleting conntrack entries failed: {proc.stderr}")
    return int(proc.stdout.strip())


@contextlib.contextmanager
def stub_resolver(*nodes: Node) -> Iterator[None]:
    """Make ordinary programs in ``nodes`` resolve through the agent's DNS stub
    (127.0.0.1:53): ``ip netns exec`` mounts ``/etc/netns/<ns>/resolv.conf`` over
    ``/etc/resolv.conf``. Start the agents first (they read the original for upstreams)."""
    made: list[Path] = []
    try:
        for node in nodes:
            directory = Path("/etc/netns") / node.netns
            directory.mkdir(parents=True, exist_ok=False)
            made.append(directory)
            (directory / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:5\n")
        yield
    finally:
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)


def ping_name(
    node: Node,
    name: str,
    *,
    family: int,
    count: int = 3,
) -> subprocess.CompletedProcess[str]:
    """``ping -4/-6 name`` in ``node``: resolved by the system resolver (the stub); no
    reverse lookups of the answers (they would go to the upstream resolver)."""
    result: subprocess.CompletedProcess[str] = node.run(
        ["ping", "-n", f"-{family}", "-c", str(count), "-i", "0.2", "-W", "5", name], timeout=60
    )
    return result


@dataclass
class RelayReading:
    """What a capture at the TRS shows about relayed traffic between two outside addresses."""

    relayed: int
    """Captured packets the TRS sent to one node byte for byte as it got them from the
    other (a GRO train forwarded with one GSO send is one captured packet)."""
    own: int
    """Captured packets the TRS sent to the nodes that were not relayed (its control
    connections): their bytes never came from the other node."""
    not_udp_443: list[str]
    relayed_bytes: int = 0
    """UDP payload bytes of ``relayed``."""
    own_bytes: int = 0
    """UDP payload bytes of ``own``."""


def read_relay(capture: Capture, *, trs: set[str], a: str, b: str) -> RelayReading:
    """Match every datagram the TRS sent to ``a`` (``b``) against the bytes it received
    from ``b`` (``a``): found unchanged means the packet went through unchanged.

    The received side is searched as one byte stream per sender, not datagram by datagram:
    a sender using UDP GSO puts several datagrams in one captured super-packet (split only
    at the receiving socket). QUIC packets are encrypted, so a datagram's bytes turning up
    in the other node's stream by chance is out of the question.
    """
    packets = [p for p in capture.packets() if p.family != 0]
    received: dict[str, list[bytes]] = {a: [], b: []}
    sent: list[tuple[str, bytes]] = []
    odd: list[str] = []
    for p in packets:
        if p.protocol != "udp" or 443 not in (p.sport, p.dport):
            if not (p.protocol == "icmpv6" and p.payload and p.payload[0] in (133, 134, 135, 136)):
                odd.append(f"{p.protocol} {p.src}:{p.sport} > {p.dst}:{p.dport}")
            continue
        if p.dst in trs and p.src in received:
            received[p.src].append(p.payload)
        elif p.src in trs and p.dst in received:
            sent.append((p.dst, p.payload))
    streams = {sender: b"".join(chunks) for sender, chunks in received.items()}
    cursor = dict.fromkeys(streams, 0)
    relayed = own = relayed_bytes = own_bytes = 0
    for dst, payload in sent:
        source = b if dst == a else a
        stream = streams[source]
        # Forwarding keeps the order, so look after the last match first.
        at = stream.find(payload, cursor[source])
        if at < 0:
            at = stream.find(payload)
        if at >= 0:
            relayed += 1
            relayed_bytes += len(payload)
            cursor[source] = at + len(payload)
        else:
            own += 1
            own_bytes += len(payload)
    return RelayReading(
        relayed=relayed,
        own=own,
        not_udp_443=odd,
        relayed_bytes=relayed_bytes,
        own_bytes=own_bytes,
    )


def capture_drops(capture: Capture) -> int:
    """Packets the kernel dropped before tcpdump read them (from its closing report): on a
    loaded machine a capture misses some, which is not the relay's doing."""
    log = capture.path.with_suffix(".log")
    text = log.read_text(errors="replace") if log.exists() else ""
    found = re.search(r"(\d+) packets? dropped by kernel", text)
    return int(found.group(1)) if found else 0


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict):
                out.append(item)
    return out


def json_log(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a process log (other lines skipped)."""
    return _json_lines(path)
