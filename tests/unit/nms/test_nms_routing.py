"""Route decisions: classification of a node's network and one test per cell of the table."""

from __future__ import annotations

import pytest
from cyphonic_nms.routing import (
    Endpoint,
    Family,
    NetworkInfo,
    Pattern,
    Reach,
    Side,
    cell,
    classify,
    pattern_for,
)

E = Endpoint.parse

# Nodes of each kind, built through classify() so the tests cover it too.
V6 = classify([E("[2001:db8:6::10]:443")], E("[2001:db8:6::10]:443"))
GLOBAL4 = classify([E("198.51.100.7:443")], E("198.51.100.7:443"))
NAT4 = classify([E("192.168.1.20:443")], E("203.0.113.5:40001"))
DUAL = classify([E("198.51.100.8:443"), E("[2001:db8:6::20]:443")], E("198.51.100.8:443"))
DUAL_NAT = classify([E("192.168.1.30:443"), E("[2001:db8:6::30]:443")], E("203.0.113.9:5000"))

KINDS = {"ipv6": V6, "global_ipv4": GLOBAL4, "nat_ipv4": NAT4}


# --- classify ------------------------------------------------------------------------------


def test_classify_ipv6_only() -> None:
    assert (V6.has_ipv6, V6.has_ipv4, V6.behind_nat) == (True, False, False)
    assert V6.kind == "ipv6"
    assert V6.observed_ipv6 == E("[2001:db8:6::10]:443")


def test_classify_global_ipv4_when_observed_source_is_reported() -> None:
    assert (GLOBAL4.has_ipv4, GLOBAL4.has_ipv6, GLOBAL4.behind_nat) == (True, False, False)
    assert GLOBAL4.kind == "global_ipv4"


def test_classify_nat_when_observed_address_differs() -> None:
    assert NAT4.behind_nat and NAT4.kind == "nat_ipv4"
    assert NAT4.observed_ipv4 == E("203.0.113.5:40001")


def test_classify_nat_when_only_the_port_differs() -> None:
    # A NAT that keeps the address but rewrites the port is still a NAT.
    info = classify([E("198.51.100.7:443")], E("198.51.100.7:61000"))
    assert info.behind_nat


def test_classify_private_lan_seen_unchanged_is_not_nat() -> None:
    info = classify([E("10.0.0.5:443")], E("10.0.0.5:443"))
    assert not info.behind_nat and info.kind == "global_ipv4"


def test_classify_ipv4_mapped_source_is_unmapped() -> None:
    info = classify([E("198.51.100.7:443")], E("[::ffff:198.51.100.7]:443"))
    assert info.observed_ipv4 == E("198.51.100.7:443")
    assert not info.behind_nat and not info.has_ipv6


def test_classify_dual_stack() -> None:
    assert DUAL.has_ipv4 and DUAL.has_ipv6 and not DUAL.behind_nat
    assert DUAL.kind == "dual_stack"
    assert DUAL_NAT.kind == "dual_stack_nat"


def test_classify_over_ipv6_with_private_ipv4_assumes_nat() -> None:
    info = classify([E("192.168.1.30:443"), E("[2001:db8::30]:443")], E("[2001:db8::30]:443"))
    assert info.has_ipv4 and info.behind_nat
    public = classify([E("9.9.9.30:443"), E("[2001:db8::30]:443")], E("[2001:db8::30]:443"))
    assert public.has_ipv4 and not public.behind_nat


def test_classify_drops_link_local_and_unspecified() -> None:
    info = classify([E("[fe80::1]:443"), E("0.0.0.0:443")], E("203.0.113.5:1"))
    assert not info.has_ipv6
    assert info.local_addresses == ()
    assert info.behind_nat


def test_candidates_of_nat_node_hide_private_addresses() -> None:
    assert NAT4.candidates(4) == (E("203.0.113.5:40001"),)
    assert DUAL.candidates(6) == (E("[2001:db8:6::20]:443"),)


# --- the table, one test per cell ------------------------------------------------------------

TABLE = [
    # initiator, responder, pattern, connector
    ("ipv6", "ipv6", Pattern.DIRECT, Side.INITIATOR),
    ("ipv6", "global_ipv4", Pattern.RELAY, Side.INITIATOR),
    ("ipv6", "nat_ipv4", Pattern.RELAY, Side.INITIATOR),
    ("global_ipv4", "ipv6", Pattern.RELAY, Side.INITIATOR),
    ("global_ipv4", "global_ipv4", Pattern.DIRECT, Side.INITIATOR),
    ("global_ipv4", "nat_ipv4", Pattern.NAT_CONNECTS, Side.RESPONDER),
    ("nat_ipv4", "ipv6", Pattern.RELAY, Side.INITIATOR),
    ("nat_ipv4", "global_ipv4", Pattern.NAT_CONNECTS, Side.INITIATOR),
    ("nat_ipv4", "nat_ipv4", Pattern.RELAY, Side.INITIATOR),
]


@pytest.mark.parametrize(("a", "b", "pattern", "connector"), TABLE)
def test_table_cell(a: str, b: str, pattern: Pattern, connector: Side) -> None:
    node_a = KINDS[a]
    node_b = classify(
        # A second node of the same kind, at other addresses.
        [E("[2001:db8:7::1]:443")]
        if b == "ipv6"
        else [E("198.51.100.99:443")]
        if b == "global_ipv4"
        else [E("172.16.0.9:443")],
        E("[2001:db8:7::1]:443")
        if b == "ipv6"
        else E("198.51.100.99:443")
        if b == "global_ipv4"
        else E("203.0.113.77:3000"),
    )
    decision = pattern_for(node_a, node_b)
    assert decision.pattern is pattern
    assert decision.connector is connector
    if pattern is Pattern.RELAY:
        assert decision.family is None and decision.candidates == ()
    else:
        acceptor = node_b if connector is Side.INITIATOR else node_a
        assert decision.family is not None
        assert decision.candidates == acceptor.candidates(int(decision.family))
        assert decision.candidates, "a direct route needs an address to try"


def test_cell_function_matches_table() -> None:
    reach = {"ipv6": Reach.IPV6, "global_ipv4": Reach.GLOBAL_IPV4, "nat_ipv4": Reach.NAT_IPV4}
    for a, b, pattern, connector in TABLE:
        assert cell(reach[a], reach[b]) == (pattern, connector)


def test_pattern_2_connector_candidates_are_the_global_side() -> None:
    decision = pattern_for(NAT4, GLOBAL4)
    assert decision.role_of(Side.INITIATOR) == "connect"
    assert decision.role_of(Side.RESPONDER) == "accept"
    assert decision.candidates == (E("198.51.100.7:443"),)
    reverse = pattern_for(GLOBAL4, NAT4)
    assert reverse.role_of(Side.RESPONDER) == "connect"
    assert reverse.candidates == (E("198.51.100.7:443"),)


# --- dual stack ------------------------------------------------------------------------------


def test_dual_to_dual_prefers_ipv6_direct() -> None:
    other = classify([E("198.51.100.9:443"), E("[2001:db8:6::21]:443")], E("198.51.100.9:443"))
    decision = pattern_for(DUAL, other)
    assert (decision.pattern, decision.family) == (Pattern.DIRECT, Family.IPV6)
    assert decision.candidates == (E("[2001:db8:6::21]:443"),)


def test_dual_to_ipv6_only_uses_ipv6() -> None:
    decision = pattern_for(DUAL, V6)
    assert (decision.pattern, decision.family) == (Pattern.DIRECT, Family.IPV6)
    decision = pattern_for(V6, DUAL)
    assert (decision.pattern, decision.family) == (Pattern.DIRECT, Family.IPV6)


def test_dual_to_global_ipv4_only_uses_ipv4() -> None:
    decision = pattern_for(DUAL, GLOBAL4)
    assert (decision.pattern, decision.family) == (Pattern.DIRECT, Family.IPV4)
    assert decision.candidates == (E("198.51.100.7:443"),)


def test_dual_to_nat_ipv4_only_is_pattern_2() -> None:
    decision = pattern_for(DUAL, NAT4)
    assert (decision.pattern, decision.family) == (Pattern.NAT_CONNECTS, Family.IPV4)
    assert decision.connector is Side.RESPONDER


def test_dual_nat_to_ipv6_uses_ipv6_not_relay() -> None:
    decision = pattern_for(DUAL_NAT, V6)
    assert (decision.pattern, decision.family) == (Pattern.DIRECT, Family.IPV6)


def test_dual_nat_to_nat_ipv4_only_is_relayed() -> None:
    assert pattern_for(DUAL_NAT, NAT4).pattern is Pattern.RELAY


def test_dual_nat_to_global_ipv4_is_pattern_2() -> None:
    decision = pattern_for(DUAL_NAT, GLOBAL4)
    assert (decision.pattern, decision.connector) == (Pattern.NAT_CONNECTS, Side.INITIATOR)


def test_dual_nat_to_dual_nat_uses_ipv6() -> None:
    other = classify([E("10.1.1.1:443"), E("[2001:db8:9::1]:443")], E("203.0.113.10:7"))
    decision = pattern_for(DUAL_NAT, other)
    assert (decision.pattern, decision.family) == (Pattern.DIRECT, Family.IPV6)


def test_node_with_no_address_is_relayed() -> None:
    nothing = NetworkInfo(has_ipv4=False, has_ipv6=False, behind_nat=False)
    assert pattern_for(nothing, GLOBAL4).pattern is Pattern.RELAY
    assert nothing.kind == "none"
