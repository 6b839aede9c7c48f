"""Which node-reported addresses a peer may be sent to (a node must not aim its peers' QUIC
Initials at loopback, broadcast or other targets of its choosing)."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from cyphonic_nms.routing import Endpoint, Pattern, Side, classify, dialable, pattern_for

E = Endpoint.parse
OBSERVED = E("198.51.100.7:443")  # a global node, seen unchanged


def _global_node_reporting(extra: str) -> tuple[Endpoint, ...]:
    info = classify([E(extra), OBSERVED], OBSERVED)
    assert not info.behind_nat
    family = 6 if extra.startswith("[") else 4
    return info.candidates(family)


@pytest.mark.parametrize(
    ("case", "address"),
    [
        ("ipv4 loopback", "127.0.0.1:443"),
        ("ipv4 loopback, not .1", "127.9.9.9:443"),
        ("ipv4 unspecified", "0.0.0.0:443"),
        ("ipv4 this-network", "0.1.2.3:443"),
        ("ipv4 multicast", "224.0.0.251:443"),
        ("ipv4 link-local", "169.254.10.10:443"),
        ("ipv4 reserved", "240.0.0.1:443"),
        ("ipv4 broadcast", "255.255.255.255:443"),
        ("ipv6 loopback", "[::1]:443"),
        ("ipv6 unspecified", "[::]:443"),
        ("ipv6 multicast", "[ff02::1]:443"),
        ("ipv6 link-local", "[fe80::1]:443"),
        ("ipv6 reserved", "[4000::1]:443"),
        ("ipv6 site-local", "[fec0::1]:443"),
        ("ipv4-mapped loopback", "[::ffff:127.0.0.1]:443"),
        ("6to4 of loopback", "[2002:7f00:1::1]:443"),
    ],
)
def test_reported_address_is_never_a_candidate(case: str, address: str) -> None:
    assert not dialable(ip_address(E(address).ip)), case
    candidates = _global_node_reporting(address)
    assert E(address) not in candidates, case
    assert all(dialable(c.ip) for c in candidates), case
    if address.startswith("[") and not address.startswith("[::ffff:"):
        assert candidates == ()  # no usable IPv6 left at all


@pytest.mark.parametrize(
    "address",
    [
        "192.168.1.20:443",  # RFC 1918: two nodes on one LAN use these
        "10.0.0.5:443",
        "172.16.0.9:443",
        "100.64.3.4:443",  # shared address space (carrier-grade NAT)
        "[fd12:3456::1]:443",  # ULA
        "[2001:db8::5]:443",
        "203.0.113.50:443",
    ],
)
def test_private_and_global_reported_addresses_stay(address: str) -> None:
    assert dialable(E(address).ip)
    assert E(address) in _global_node_reporting(address)


def test_observed_address_ranks_above_reported_ones() -> None:
    # The node lists other addresses first; the validated observed one still leads.
    info = classify(
        [E("10.0.0.5:443"), E("198.51.100.9:443"), E("198.51.100.7:443")], E("198.51.100.7:443")
    )
    assert info.candidates(4) == (E("198.51.100.7:443"), E("10.0.0.5:443"), E("198.51.100.9:443"))
    v6 = classify([E("[2001:db8::1]:443"), E("[2001:db8::2]:443")], E("[2001:db8::2]:443"))
    assert v6.candidates(6)[0] == E("[2001:db8::2]:443")


def test_a_claimed_family_needs_a_dialable_address() -> None:
    # Connected over IPv4, claims IPv6 only through ::1: no IPv6 to route over.
    info = classify([E("198.51.100.7:443"), E("[::1]:443")], E("198.51.100.7:443"))
    assert not info.has_ipv6
    # Connected over IPv6, claims IPv4 only through loopback: no IPv4 either.
    info = classify([E("127.0.0.1:443"), E("[2001:db8::1]:443")], E("[2001:db8::1]:443"))
    assert not info.has_ipv4


def test_loopback_observed_is_offered_only_to_a_peer_on_loopback() -> None:
    # Both nodes reached the NMS over loopback: they share its host (single-host setup).
    local_a = classify([E("127.0.0.1:5001")], E("127.0.0.1:5001"))
    local_b = classify([E("127.0.0.1:5002")], E("127.0.0.1:5002"))
    decision = pattern_for(local_a, local_b)
    assert decision.pattern is Pattern.DIRECT and decision.candidates == (E("127.0.0.1:5002"),)
    # A remote peer is never sent to loopback, even an observed one: with nothing to dial
    # a direct path is impossible, so the route is relayed.
    remote = classify([E("198.51.100.7:443")], E("198.51.100.7:443"))
    decision = pattern_for(remote, local_b)
    assert decision.pattern is Pattern.RELAY and decision.candidates == ()
    assert local_b.candidates(4) == ()
    # The other way round the remote side accepts: the loopback side may dial it.
    decision = pattern_for(local_b, remote)
    assert decision.connector is Side.INITIATOR
    assert decision.candidates == (E("198.51.100.7:443"),)


def test_direct_family_without_candidates_falls_back_to_the_other_family() -> None:
    # b reached the NMS over ::1 and reports a private IPv4 address; a is a remote dual-stack
    # node. IPv6 would be direct but b has nothing in IPv6 that a may dial.
    a = classify([E("198.51.100.7:443"), E("[2001:db8::7]:443")], E("198.51.100.7:443"))
    b = classify([E("192.168.5.5:443")], E("[::1]:443"))
    assert b.has_ipv6 and b.has_ipv4 and b.behind_nat
    decision = pattern_for(a, b)
    assert (decision.pattern, decision.family) == (Pattern.NAT_CONNECTS, 4)
    assert decision.connector is Side.RESPONDER
    assert decision.candidates == (E("198.51.100.7:443"),)
