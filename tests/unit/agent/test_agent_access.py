"""The agent keeps the filter the NMS pushed: newer revisions replace it, older ones and
malformed ones are refused (the filter in force stays), and status shows what it dropped."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

from cyphonic import policy as P
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_agent.access import AgentAccess
from cyphonic_agent.status import AgentStatus, format_status

ME = P.NodeInfo("me.cyphonic.internal", {"group": "servers"})
PEER = P.PeerInfo(
    P.NodeInfo("a.cyphonic.internal", {"group": "eng"}),
    IPv4Address("100.64.0.2"),
    IPv6Address("fd77::2"),
)
POLICY = P.parse_policy(
    {"rules": [{"from": ["group:eng"], "to": ["group:servers"], "proto": "tcp", "ports": [22]}]}
)


def syn(dport: int) -> bytes:
    l4 = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 2, 65535, 0, 0)
    return (
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, PEER.ipv4.packed, b"\x64\x40\0\1")
        + l4
    )


def test_filters_replace_in_revision_order() -> None:
    access = AgentAccess()
    assert access.filter.inbound(syn(80), 0.0)  # nothing received yet: open
    assert access.apply(P.filter_to_pb(P.compile_filter(POLICY, ME, [PEER], revision=3)))
    assert access.filter.inbound(syn(22), 0.0)
    assert not access.filter.inbound(syn(80), 0.0)
    assert not access.apply(P.filter_to_pb(P.compile_filter(P.ALLOW_ALL, ME, [PEER], revision=2)))
    assert not access.filter.inbound(syn(81), 0.0)
    bad = P.filter_to_pb(P.compile_filter(P.ALLOW_ALL, ME, [PEER], revision=9))
    bad.entries.append(pb.FilterEntry(sources=[b"\1"]))
    assert not access.apply(bad) and access.refused == 1 and access.revision == 3
    snap = access.snapshot()
    assert snap["revision"] == 3 and snap["mode"] == "filter"
    assert snap["dropped"]["not_allowed"] == 2 and snap["passed"] == 2
    text = format_status(AgentStatus(fqdn="me.cyphonic.internal", policy=snap))
    assert "policy     revision 3, filter (1 entries, 0 flows); dropped 2 (not_allowed 2)" in text
    again = AgentStatus.from_dict(AgentStatus(fqdn="x", policy=snap).to_dict())
    assert again.policy == snap
    assert access.apply(P.filter_to_pb(P.compile_filter(P.ALLOW_ALL, ME, [PEER], revision=4)))
    assert access.filter.inbound(syn(81), 0.0)
