"""TUN offloads end to end: two ``cyphonic-agent up`` with real TUN devices, AS and NMS in
the test bed's cloud, TCP transfers checked by SHA-256 through the tunnel both ways, over
the overlay's IPv4 and IPv6 addresses.

Three pairings: both agents with offloads (IFF_VNET_HDR, TSO4/TSO6 + CSUM: 64 KB reads split
into packets, coalesced writes, inner checksums left partial because each peer said it takes
them), both without (``CYPHONIC_TUN_OFFLOAD=0``: the plain TUN the agent falls back to when
the kernel refuses), and mixed: the side with offloads must send the plain side complete
checksums (its kernel would drop a packet whose checksum is only the pseudo-header sum, so
the transfer itself is the check) and still reads super-segments and coalesces its writes.
What each side did is read from its log line ``datapath_stopped`` at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from cyphonic_testbed import pattern2
from e2e_harness import Overlay, marked_payload, sha256, tcp_transfer

pytestmark = [pytest.mark.netns, pytest.mark.timeout(420)]

PAYLOAD = 6_000_000
UDP_COUNT = 3000
UDP_SIZE = 1300

# A UDP sink: prints how many datagrams arrived and how many of them were intact.
_UDP_SINK = """
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((sys.argv[1], 9100))
print("listening", flush=True)
s.settimeout(5)
got = intact = 0
try:
    while got < int(sys.argv[2]):
        d = s.recv(65535)
        got += 1
        intact += hashlib.sha256(d[32:]).digest() == d[:32]
except TimeoutError:
    pass
print(got, intact)
"""
# Its source: bursts of datagrams of one size (so that a USO receiver can merge them),
# each carrying the SHA-256 of the rest.
_UDP_SOURCE = """
import hashlib, os, socket, sys, time
dst, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    body = os.urandom(size - 32)
    s.sendto(hashlib.sha256(body).digest() + body, (dst, 9100))
    if i % 40 == 39:
        time.sleep(0.003)  # bursts of 40, about 17 MB/s: a busy machine keeps up
"""


def _udp_burst(src: Any, dst: Any, address: str) -> tuple[int, int]:
    """(datagrams received, intact) of a burst from ``src`` to ``address`` in ``dst``."""
    sink = dst.popen(
        [sys.executable, "-c", _UDP_SINK, address, str(UDP_COUNT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout is not None and sink.stdout.readline() == "listening\n"
    sent = src.run(
        [sys.executable, "-c", _UDP_SOURCE, address, str(UDP_COUNT), str(UDP_SIZE)], timeout=60
    )
    assert sent.returncode == 0, sent.stderr
    out, _ = sink.communicate(timeout=30)
    got, intact = (int(x) for x in out.split())
    return got, intact


def _stopped(agent: Any) -> dict[str, Any]:
    """The agent's ``datapath_stopped`` log record."""
    for line in agent.log_text().splitlines():
        if "datapath_stopped" in line:
            record: dict[str, Any] = json.loads(line)
            return record
    raise AssertionError(f"no datapath_stopped in the log of {agent.name}")


@pytest.mark.parametrize(
    ("alice_offload", "bob_offload"),
    [(True, True), (False, False), (True, False)],
    ids=["both-offload", "both-plain", "mixed"],
)
def test_tcp_through_tunnel_with_and_without_tun_offloads(
    overlay: object, alice_offload: bool, bob_offload: bool
) -> None:
    o: Overlay = overlay(pattern2())  # type: ignore[operator]
    for name, on in (("alice", alice_offload), ("bob", bob_offload)):
        o.agents[name] = o.services.start_agent(
            o.bed.host(name), o.states[name], env={"CYPHONIC_TUN_OFFLOAD": "1" if on else "0"}
        )
    o.alice.wait_up()
    o.bob.wait_up()
    alice, bob = o.bed.host("alice"), o.bed.host("bob")
    bob_v4, bob_v6 = o.alice.resolve(o.bob.fqdn, "A")[0], o.alice.resolve(o.bob.fqdn, "AAAA")[0]
    alice_v4 = o.bob.resolve(o.alice.fqdn, "A")[0]
    alice_v6 = o.bob.resolve(o.alice.fqdn, "AAAA")[0]

    payload = marked_payload(PAYLOAD)
    digest = sha256(payload)
    # alice -> bob over IPv4 and IPv6 (TSO4, TSO6 on alice's side where on), then back.
    assert tcp_transfer(alice, bob, listen=bob_v4, connect=bob_v4, payload=payload) == digest
    assert tcp_transfer(alice, bob, listen=bob_v6, connect=bob_v6, payload=payload) == digest
    assert tcp_transfer(bob, alice, listen=alice_v4, connect=alice_v4, payload=payload) == digest
    assert tcp_transfer(bob, alice, listen=alice_v6, connect=alice_v6, payload=payload) == digest
    # UDP bursts both ways (coalesced into UDP GSO writes where the receiver took USO): every
    # datagram that arrives is intact, and most arrive (UDP: a busy machine may drop some).
    for src, dst, address in ((alice, bob, bob_v4), (bob, alice, alice_v6)):
        got, intact = _udp_burst(src, dst, address)
        assert intact == got and got >= UDP_COUNT // 2, (got, intact)

    for agent in (o.alice, o.bob):
        assert agent.stop() == 0, agent.log_text()[-3000:]
    a, b = _stopped(o.alice), _stopped(o.bob)
    for record, on, peer_on, peer in (
        (a, alice_offload, bob_offload, o.bob.fqdn),
        (b, bob_offload, alice_offload, o.alice.fqdn),
    ):
        assert record["malformed_frames"] == 0
        if on:
            assert record["offloads"] & 0x07 == 0x07  # CSUM, TSO4, TSO6 taken by the kernel
            # Its applications sent 12 MB: the kernel handed over super-segments...
            assert record["super_segments"] > 0
            assert record["segments_out"] > 2 * record["super_segments"]
            # ...and what came from the peer went out in fewer, coalesced writes, TCP ones
            # and (this kernel takes USO) UDP ones.
            assert record["packets_written"] > 2 * record["frames_written"] > 0
            assert record["tcp_super_packets"] > 0
            assert record["udp_super_packets"] > 0
        else:
            assert record["offloads"] == 0 and record["super_segments"] == 0
            assert record["frames_written"] == 0
        # Partial checksums only towards a peer that said it takes them.
        assert record["peers_taking_partial_checksums"] == ([peer] if peer_on else [])
