#!/usr/bin/env python3
"""Per-packet CPU cost of the agent's access-policy filter (cyphonic.policy.PacketFilter).

    uv run --frozen python bench/policy_filter.py [--packets 200000] [--peers 1000]

No sockets: the filter is fed the same full-size packets over and over, as the data path
would call it once per packet (``inbound`` for a packet out of a tunnel, ``outbound`` for a
packet into one). Printed: nanoseconds per call (process CPU time, best of 5 runs) for each
case, and the benchmark's own call overhead (a lambda doing nothing) to subtract:

- allow_all: no policy in force (the default) - the fast path
- rule tcp/22: a packet a rule allows (a peer among ``--peers`` allowed on tcp/22)
- reply tcp: a reply to a flow this node opened (flow-table hit)
- denied tcp: a packet no rule allows (dropped and counted)
- ... interleaved: two flows in turn, so the one-entry cache of the last flow never hits
  (the full header check on every packet)
- outbound: noting the flow of a packet this node sends (table update)
- outbound, peer allowed all: the peer may send anything, nothing to note
"""

from __future__ import annotations

import argparse
import os
import struct
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from cyphonic import policy as P


def ip4(src: bytes, dst: bytes, proto: int, l4: bytes, size: int) -> bytes:
    payload = l4 + bytes(max(0, size - 20 - len(l4)))
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, src, dst)
    return hdr + payload


def tcp(sport: int, dport: int, flags: int = 0x10) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def measure(name: str, fn: Callable[[], object], packets: int, rounds: int = 5) -> None:
    """Best of ``rounds`` runs (the machine is shared: the minimum is the least disturbed)."""
    for _ in range(1000):
        fn()
    per_round = max(1, packets // rounds)
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(per_round):
            fn()
        best = min(best, (time.process_time() - start) / per_round)
    print(f"{name:34s} {best * 1e9:8.0f} ns/packet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1420)
    args = parser.parse_args()

    me = P.NodeInfo("me.cyphonic.internal", {"group": "servers"})
    peers = [
        P.PeerInfo(
            P.NodeInfo(f"n{i}.cyphonic.internal", {"group": "eng" if i % 2 else "other"}),
            IPv4Address(0x64400000 + i + 2),
            IPv6Address((0xFD77 << 112) + i + 2),
        )
        for i in range(args.peers)
    ]
    everyone = P.PeerInfo(
        P.NodeInfo("ops.cyphonic.internal", {"group": "ops"}),
        IPv4Address("100.65.0.1"),
        IPv6Address("fd78::1"),
    )
    policy = P.parse_policy(
        {
            "rules": [
                {"from": ["group:eng"], "to": ["group:servers"], "proto": "tcp", "ports": [22]},
                {"from": ["group:ops"], "to": ["*"]},
            ]
        }
    )
    mine = IPv4Address("100.64.0.1").packed
    compiled = P.compile_filter(policy, me, [*peers, everyone])
    f = P.PacketFilter(compiled)
    allowed_peer = peers[1].ipv4.packed
    other_peer = peers[2].ipv4.packed
    n, size = args.packets, args.size

    rule_pkt = ip4(allowed_peer, mine, 6, tcp(40000, 22), size)
    f.outbound(ip4(mine, other_peer, 6, tcp(50000, 443), size), 0.0)
    reply_pkt = ip4(other_peer, mine, 6, tcp(443, 50000), size)
    denied_pkt = ip4(other_peer, mine, 6, tcp(443, 50001), size)
    out_pkt = ip4(mine, other_peer, 6, tcp(50000, 443), size)
    out_all = ip4(mine, everyone.ipv4.packed, 6, tcp(50000, 443), size)
    open_filter = P.PacketFilter()

    print(f"{len(compiled.entries)} filter entries, {args.peers + 1} peers, {size}-byte packets")
    measure("call overhead (empty lambda)", lambda: None, n)
    measure("allow_all (no policy)", lambda: open_filter.inbound(rule_pkt, 1.0), n)
    measure("inbound, rule tcp/22", lambda: f.inbound(rule_pkt, 1.0), n)
    measure("inbound, reply to own flow", lambda: f.inbound(reply_pkt, 1.0), n)
    measure("inbound, denied", lambda: f.inbound(denied_pkt, 1.0), n)
    # Two flows in turn: the one-entry cache always misses (the full check every packet).
    f.outbound(ip4(mine, other_peer, 6, tcp(50002, 443), size), 0.0)
    reply2 = ip4(other_peer, mine, 6, tcp(443, 50002), size)
    turn = [reply_pkt, reply2]
    measure("inbound, reply, flows interleaved", lambda: f.inbound(turn[f.passed & 1], 1.0), n)
    rule2 = ip4(peers[3].ipv4.packed, mine, 6, tcp(40000, 22), size)
    turn2 = [rule_pkt, rule2]
    measure("inbound, rule, flows interleaved", lambda: f.inbound(turn2[f.passed & 1], 1.0), n)
    measure("outbound, note flow", lambda: f.outbound(out_pkt, 1.0), n)
    out2 = ip4(mine, other_peer, 6, tcp(50002, 443), size)
    turn3 = [out_pkt, out2]
    flip = [0]

    def alternate() -> None:
        flip[0] ^= 1
        f.outbound(turn3[flip[0]], 1.0)

    measure("outbound, flows interleaved", alternate, n)
    measure("outbound, peer allowed all", lambda: f.outbound(out_all, 1.0), n)
    assert f.inbound(rule_pkt, 1.0) and f.inbound(reply_pkt, 1.0) and not f.inbound(denied_pkt, 1.0)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
