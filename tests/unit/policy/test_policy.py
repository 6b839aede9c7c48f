"""The access-policy core: documents, dry runs, compiled filters and the stateful packet filter.

The central property: for any policy and any packet a peer starts, the node's compiled
``PacketFilter`` lets it in exactly when ``can`` (the dry run the NMS answers) says so.
"""

from __future__ import annotations

import json
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from cyphonic import policy as P
from cyphonic.errors import MalformedMessage, PolicyDenied, from_wire
from cyphonic.v1 import signalling_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

# ---------------------------------------------------------------------------- packets


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4(src: bytes, dst: bytes, proto: int, l4: bytes, *, frag: int = 0) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0, src, dst)
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + l4


def ip6(src: bytes, dst: bytes, proto: int, l4: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src, dst) + l4


def tcp(sport: int, dport: int, flags: int = 0x02) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def udp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8, 0)


def icmp(kind: int, ident: int = 7, body: bytes = b"") -> bytes:
    return struct.pack("!BBHHH", kind, 0, 0, ident, 1) + body


def pkt(src: bytes, dst: bytes, proto: int, l4: bytes) -> bytes:
    return ip4(src, dst, proto, l4) if len(src) == 4 else ip6(src, dst, proto, l4)


# ---------------------------------------------------------------------------- nodes

A = P.NodeInfo("a.corp.example", {"group": "eng"})
B = P.NodeInfo("b.corp.example", {"group": "servers,ops", "role": "db"})
C = P.NodeInfo("c.corp.example", {})


def peer(node: P.NodeInfo, n: int) -> P.PeerInfo:
    return P.PeerInfo(node, IPv4Address(f"10.77.0.{n}"), IPv6Address(f"fd77::{n}"))


PA, PB, PC = peer(A, 1), peer(B, 2), peer(C, 3)
PEERS = [PA, PB, PC]

DOC = {
    "rules": [
        {
            "from": ["group:eng"],
            "to": ["group:servers"],
            "proto": "tcp",
            "ports": ["22", "8000-8100"],
        },
        {"from": ["node:c.corp.example"], "to": ["tag:role=db"], "proto": "udp", "ports": [53]},
        {"from": ["*"], "to": ["tag:role"], "proto": "icmp"},
    ]
}


# ---------------------------------------------------------------------------- documents


def test_parse_round_trips_and_normalises() -> None:
    pol = P.parse_policy(DOC)
    assert len(pol.rules) == 3
    assert pol.rules[0].ports == (P.PortRange(22, 22), P.PortRange(8000, 8100))
    again = P.parse_policy(json.loads(json.dumps(pol.to_document())))
    assert again == pol


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ([], ""),
        ({"rules": "x"}, "rules"),
        ({"rules": [], "extra": 1}, "extra"),
        ({"rules": [{"from": [], "to": ["*"]}]}, "rules[0].from"),
        ({"rules": [{"from": ["*"], "to": ["host:x"]}]}, "rules[0].to[0]"),
        ({"rules": [{"from": ["*"], "to": ["node:-bad-"]}]}, "rules[0].to[0]"),
        ({"rules": [{"from": ["*"], "to": ["*"], "proto": "sctp"}]}, "rules[0].proto"),
        (
            {"rules": [{"from": ["*"], "to": ["*"], "proto": "icmp", "ports": [1]}]},
            "rules[0].ports",
        ),
        (
            {"rules": [{"from": ["*"], "to": ["*"], "proto": "tcp", "ports": ["9-3"]}]},
            "rules[0].ports[0]",
        ),
        (
            {"rules": [{"from": ["*"], "to": ["*"], "proto": "tcp", "ports": [0]}]},
            "rules[0].ports[0]",
        ),
        (
            {"rules": [{"from": ["*"], "to": ["*"], "proto": "tcp", "ports": [True]}]},
            "rules[0].ports[0]",
        ),
        ({"rules": [{"from": ["*"], "to": ["*"], "oops": 1}]}, "rules[0].oops"),
        ({"rules": [None]}, "rules[0]"),
    ],
)
def test_invalid_documents_name_the_place(doc: object, where: str) -> None:
    with pytest.raises(P.PolicyInvalid) as info:
        P.parse_policy(doc)
    assert info.value.issues[0].where == where
    assert info.value.code == pb.ERROR_CODE_INVALID_ARGUMENT


def test_every_issue_is_reported() -> None:
    doc = {
        "rules": [
            {"from": ["x"], "to": ["*"]},
            {"from": ["*"], "to": ["*"], "proto": "udp", "ports": [99999]},
        ]
    }
    with pytest.raises(P.PolicyInvalid) as info:
        P.parse_policy(doc)
    assert [i.where for i in info.value.issues] == ["rules[0].from[0]", "rules[1].ports[0]"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_parse_raises_only_policy_invalid(doc: object) -> None:
    try:
        P.parse_policy(doc)
    except P.PolicyInvalid as exc:
        assert exc.issues


def test_protocol_port_parsing() -> None:
    assert P.parse_protocol_port("tcp/22") == (P.Protocol.TCP, 22)
    assert P.parse_protocol_port("ICMP") == (P.Protocol.ICMP, None)
    for bad in ("tcp/0", "icmp/3", "sctp/1", "tcp/x", "udp/70000"):
        with pytest.raises(P.InvalidArgument):
            P.parse_protocol_port(bad)


# ---------------------------------------------------------------------------- decisions


def test_dry_run() -> None:
    pol = P.parse_policy(DOC)
    assert P.can(pol, A, B, P.Protocol.TCP, 22) == P.Decision(True, 0, "rules[0]")
    assert P.can(pol, A, B, P.Protocol.TCP, 8050).allowed
    assert not P.can(pol, A, B, P.Protocol.TCP, 23).allowed
    assert not P.can(pol, A, B, P.Protocol.UDP, 22).allowed
    assert not P.can(pol, B, A, P.Protocol.TCP, 22).allowed  # direction matters
    assert P.can(pol, C, B, P.Protocol.UDP, 53).allowed
    assert P.can(pol, A, B, P.Protocol.ICMP).allowed
    assert not P.can(pol, A, C, P.Protocol.ICMP).allowed
    assert P.reachable(pol, A, B) and not P.reachable(pol, B, A)
    assert P.route_allowed(pol, B, A)  # the tunnel carries A's flows and their replies
    assert not P.route_allowed(pol, A, C)
    assert P.can(P.ALLOW_ALL, A, C, P.Protocol.TCP, 1).allowed
    assert not P.can(P.DENY_ALL, A, C, P.Protocol.TCP, 1).allowed
    assert not P.route_allowed(P.DENY_ALL, A, C)


def test_policy_denied_is_a_typed_wire_error() -> None:
    err = PolicyDenied("a -> c")
    wire = err.to_wire()
    assert wire.code == pb.ERROR_CODE_POLICY_DENIED
    assert isinstance(from_wire(wire), PolicyDenied)


# ---------------------------------------------------------------------------- compiled filters


def test_compile_and_wire_round_trip() -> None:
    pol = P.parse_policy(DOC)
    fb = P.compile_filter(pol, B, PEERS, revision=5)
    assert fb.revision == 5 and not fb.allow_all
    by_proto = {e.protocol: e for e in fb.entries}
    assert by_proto[P.Protocol.TCP].sources == {PA.ipv4.packed, PA.ipv6.packed}
    assert by_proto[P.Protocol.UDP].sources == {PC.ipv4.packed, PC.ipv6.packed}
    assert PB.ipv4.packed not in by_proto[P.Protocol.ICMP].sources  # never itself
    assert P.filter_from_pb(P.filter_to_pb(fb)) == fb
    assert P.compile_filter(pol, A, PEERS).entries == ()  # nobody may start traffic to A
    assert P.compile_filter(P.ALLOW_ALL, A, PEERS).allow_all


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.entries[0].sources.append(b"\1\2\3"),
        lambda m: m.entries[0].ports.append(pb.PortRange(first=5, last=4)),
        lambda m: m.entries[0].ports.append(pb.PortRange(first=0, last=4)),
        lambda m: setattr(m, "allow_all", True),
        lambda m: setattr(m.entries[0], "protocol", 99),
    ],
)
def test_malformed_wire_filters_are_refused(mutate: object) -> None:
    msg = P.filter_to_pb(P.compile_filter(P.parse_policy(DOC), B, PEERS))
    mutate(msg)  # type: ignore[operator]
    with pytest.raises(MalformedMessage):
        P.filter_from_pb(msg)


def test_icmp_entry_with_ports_refused() -> None:
    msg = pb.PolicyFilter(
        entries=[
            pb.FilterEntry(
                sources=[b"\1\2\3\4"],
                protocol=pb.FILTER_PROTOCOL_ICMP,
                ports=[pb.PortRange(first=1, last=1)],
            )
        ]
    )
    with pytest.raises(MalformedMessage):
        P.filter_from_pb(msg)


# ---------------------------------------------------------------------------- packet filter

a4, b4, c4 = PA.ipv4.packed, PB.ipv4.packed, PC.ipv4.packed
a6, b6 = PA.ipv6.packed, PB.ipv6.packed


def filter_for(node: P.NodeInfo, **kw: float) -> P.PacketFilter:
    return P.PacketFilter(P.compile_filter(P.parse_policy(DOC), node, PEERS), **kw)  # type: ignore[arg-type]


def test_inbound_rules() -> None:
    f = filter_for(B)
    assert f.inbound(ip4(a4, b4, 6, tcp(40000, 22)), 0.0)
    assert f.inbound(ip6(a6, b6, 6, tcp(40000, 8100)), 0.0)
    assert not f.inbound(ip4(a4, b4, 6, tcp(40000, 23)), 0.0)
    assert not f.inbound(ip4(a4, b4, 17, udp(40000, 53)), 0.0)
    assert f.inbound(ip4(c4, b4, 17, udp(40000, 53)), 0.0)
    assert f.inbound(ip4(c4, b4, 1, icmp(8)), 0.0)
    assert not f.inbound(ip4(c4, b4, 47, b"\0" * 8), 0.0)  # GRE: no rule
    assert f.passed == 4
    assert f.dropped[P.DropReason.NOT_ALLOWED] == 3


def test_replies_to_flows_this_node_opened_pass_until_idle() -> None:
    f = filter_for(A, udp_idle_s=10.0, tcp_idle_s=100.0, icmp_idle_s=5.0)
    synack = ip4(b4, a4, 6, tcp(22, 40000, 0x12))
    assert not f.inbound(synack, 0.0)
    f.outbound(ip4(a4, b4, 6, tcp(40000, 22)), 1.0)
    assert f.inbound(synack, 2.0)
    assert not f.inbound(ip4(b4, a4, 6, tcp(22, 40001, 0x12)), 2.0)  # another port
    assert not f.inbound(ip4(c4, a4, 6, tcp(22, 40000, 0x12)), 2.0)  # another peer
    # UDP: idle expiry, refreshed by traffic either way
    f.outbound(ip6(a6, b6, 17, udp(5000, 53)), 10.0)
    assert f.inbound(ip6(b6, a6, 17, udp(53, 5000)), 19.0)
    assert f.inbound(ip6(b6, a6, 17, udp(53, 5000)), 28.0)
    assert not f.inbound(ip6(b6, a6, 17, udp(53, 5000)), 38.5)
    # ping: the echo reply of our request, not an unsolicited request
    f.outbound(ip4(a4, b4, 1, icmp(8, ident=99)), 50.0)
    assert f.inbound(ip4(b4, a4, 1, icmp(0, ident=99)), 51.0)
    assert not f.inbound(ip4(b4, a4, 1, icmp(0, ident=98)), 51.0)
    assert not f.inbound(ip4(b4, a4, 1, icmp(8, ident=99)), 51.0)
    f.outbound(ip6(a6, b6, 58, icmp(128, ident=3)), 50.0)
    assert f.inbound(ip6(b6, a6, 58, icmp(129, ident=3)), 51.0)
    assert f.expire(1000.0) == 4 and f.flows == 0


def test_icmp_errors_about_our_flows_pass() -> None:
    f = filter_for(A)
    sent = ip4(a4, b4, 17, udp(5000, 9999))
    too_big = ip4(b4, a4, 1, icmp(3, body=sent[:28]))
    assert not f.inbound(too_big, 0.0)
    f.outbound(sent, 0.0)
    assert f.inbound(too_big, 1.0)
    forged = ip4(b4, a4, 1, icmp(3, body=ip4(a4, c4, 17, udp(5000, 9999))[:28]))
    assert not f.inbound(forged, 1.0)


def test_flow_table_is_bounded() -> None:
    f = filter_for(A, udp_idle_s=1000.0)
    f.max_flows = 8
    for port in range(1, 21):
        f.outbound(ip4(a4, b4, 17, udp(port, 53)), 0.0)
    assert f.flows == 8 and f.evicted == 12
    assert f.inbound(ip4(b4, a4, 17, udp(53, 20)), 1.0)  # newest kept
    assert not f.inbound(ip4(b4, a4, 17, udp(53, 1)), 1.0)  # oldest evicted


def test_fragments_and_malformed() -> None:
    f = filter_for(B)
    assert not f.inbound(b"\x45" + b"\0" * 10, 0.0)
    assert not f.inbound(ip4(a4, b4, 6, b"\0\1"), 0.0)
    assert not f.inbound(ip4(a4, b4, 6, tcp(1, 22), frag=0x0010), 0.0)
    assert f.dropped[P.DropReason.MALFORMED] == 2
    assert f.dropped[P.DropReason.FRAGMENT] == 1


def test_new_filter_keeps_our_flows_and_cuts_the_rest_at_once() -> None:
    f = filter_for(B)
    f.outbound(ip4(b4, c4, 6, tcp(33000, 443)), 0.0)
    assert f.inbound(ip4(a4, b4, 6, tcp(40000, 22, 0x10)), 1.0)
    f.install(P.compile_filter(P.DENY_ALL, B, PEERS, revision=2))
    assert not f.inbound(ip4(a4, b4, 6, tcp(40000, 22, 0x10)), 1.0)
    assert f.inbound(ip4(c4, b4, 6, tcp(443, 33000, 0x10)), 1.0)


def test_allow_all_passes_everything() -> None:
    f = P.PacketFilter()
    assert f.allow_all
    assert f.inbound(b"junk", 0.0)
    f.outbound(b"junk", 0.0)
    assert f.flows == 0


@given(st.binary(max_size=120), st.binary(max_size=120))
def test_junk_never_raises(a: bytes, b: bytes) -> None:
    f = filter_for(A)
    f.outbound(a, 0.0)
    f.inbound(b, 0.0)
    f.inbound(b"\x45" + b[1:], 0.0)
    f.inbound(b"\x60" + b[1:], 0.0)


# ---------------------------------------------------------------------------- the property

selectors = st.sampled_from(
    [
        "*",
        "node:a.corp.example",
        "node:b.corp.example",
        "node:c.corp.example",
        "group:eng",
        "group:servers",
        "group:ops",
        "tag:role",
        "tag:role=db",
        "tag:role=web",
    ]
)
rules = st.fixed_dictionaries(
    {
        "from": st.lists(selectors, min_size=1, max_size=3),
        "to": st.lists(selectors, min_size=1, max_size=3),
    },
    optional={},
).flatmap(
    lambda base: st.one_of(
        st.just({**base, "proto": "any"}),
        st.just({**base, "proto": "icmp"}),
        st.builds(
            lambda proto, ports: {**base, "proto": proto, **({"ports": ports} if ports else {})},
            st.sampled_from(["tcp", "udp"]),
            st.lists(st.sampled_from(["22", "53", "80-90", "443", "1000-65535"]), max_size=3),
        ),
    )
)
nodes = st.sampled_from([(A, PA), (B, PB), (C, PC)])


@settings(max_examples=300)
@given(
    st.lists(rules, max_size=5),
    nodes,
    nodes,
    st.sampled_from([P.Protocol.TCP, P.Protocol.UDP, P.Protocol.ICMP]),
    st.sampled_from([22, 53, 85, 443, 999, 5000]),
    st.booleans(),
)
def test_filter_agrees_with_dry_run(
    doc_rules: list[dict[str, object]],
    src: tuple[P.NodeInfo, P.PeerInfo],
    dst: tuple[P.NodeInfo, P.PeerInfo],
    proto: P.Protocol,
    port: int,
    v6: bool,
) -> None:
    (a, pa), (b, pb_) = src, dst
    if a == b:
        return
    pol = P.parse_policy({"rules": doc_rules})
    f = P.PacketFilter(P.compile_filter(pol, b, PEERS))
    s, d = (pa.ipv6.packed, pb_.ipv6.packed) if v6 else (pa.ipv4.packed, pb_.ipv4.packed)
    if proto is P.Protocol.TCP:
        packet = pkt(s, d, 6, tcp(40000, port))
    elif proto is P.Protocol.UDP:
        packet = pkt(s, d, 17, udp(40000, port))
    else:
        packet = pkt(s, d, 58 if v6 else 1, icmp(128 if v6 else 8))
    expected = P.can(pol, a, b, proto, None if proto is P.Protocol.ICMP else port).allowed
    assert f.inbound(packet, 0.0) is expected


def test_outbound_with_a_virtio_header_before_the_packet() -> None:
    f = filter_for(A)
    sent = ip4(a4, b4, 6, tcp(41000, 443))
    f.outbound(b"\x01" * 10 + sent, 0.0, 10)  # TUN offloads: virtio_net_hdr first
    assert f.inbound(ip4(b4, a4, 6, tcp(443, 41000, 0x12)), 1.0)
    f.outbound(memoryview(b"\0" * 10 + ip6(a6, b6, 17, udp(5353, 53))), 0.0, 10)
    assert f.inbound(ip6(b6, a6, 17, udp(53, 5353)), 1.0)
