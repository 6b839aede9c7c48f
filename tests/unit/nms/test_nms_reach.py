"""Reachability: the probe core (nonces, matching, verdicts with a fake clock) and what its
verdicts do to route decisions and their reasons (inbound-blocked public nodes connect out;
two endpoint-independent NATs punch; a symmetric NAT stays relayed, and the words say so)."""

from __future__ import annotations

from cyphonic.wire.reach import KIND_ECHO, KIND_INBOUND, KIND_MAPPING, frame, parse
from cyphonic_nms.reach import ReachProbes
from cyphonic_nms.route_reason import explain
from cyphonic_nms.routing import (
    Endpoint,
    Inbound,
    NatMapping,
    Pattern,
    Reach,
    Side,
    classify,
    pattern_for,
)

E = Endpoint.parse

GLOBAL4 = classify([E("198.51.100.7:443")], E("198.51.100.7:443"))
NAT_A = classify([E("192.168.1.20:443")], E("203.0.113.5:443"))
NAT_B = classify([E("192.168.2.20:443")], E("203.0.113.6:443"))
V6 = classify([E("[2001:db8:6::10]:443")], E("[2001:db8:6::10]:443"))
V6B = classify([E("[2001:db8:7::10]:443")], E("[2001:db8:7::10]:443"))

EIM = NatMapping.ENDPOINT_INDEPENDENT


# --- frames ----------------------------------------------------------------------------------


def test_frame_round_trip_and_refusals() -> None:
    nonce = bytes(range(16))
    data = frame(KIND_MAPPING, nonce)
    assert data[0] == 0  # never a QUIC packet (fixed bit clear)
    assert parse(data) == (KIND_MAPPING, nonce)
    assert parse(data + b"x") is None
    assert parse(b"\x01" + data[1:]) is None
    assert parse(data[:9] + b"\x09" + data[10:]) is None


# --- the core --------------------------------------------------------------------------------


def test_mapping_same_as_observed_and_echo_give_eim_and_open() -> None:
    probes = ReachProbes(timeout_s=1.0)
    observed = E("203.0.113.5:443")
    nonce = probes.begin("a.x", observed=observed, behind_nat=True, now=0.0)
    assert nonce is not None and probes.target(nonce) == observed
    assert probes.received(frame(KIND_MAPPING, nonce), observed, now=0.1) is None
    verdict = probes.received(frame(KIND_ECHO, nonce), observed, now=0.2)
    assert verdict is not None
    assert (verdict.nat_mapping, verdict.inbound) == (EIM, Inbound.OPEN)
    assert len(probes) == 0 and probes.target(nonce) is None


def test_mapping_from_another_port_is_symmetric_and_silence_is_blocked() -> None:
    probes = ReachProbes(timeout_s=1.0)
    nonce = probes.begin("a.x", observed=E("203.0.113.5:443"), behind_nat=True, now=0.0)
    assert nonce is not None
    probes.received(frame(KIND_MAPPING, nonce), E("203.0.113.5:61001"), now=0.1)
    assert probes.expire(now=0.9) == []
    [verdict] = probes.expire(now=1.0)
    assert (verdict.nat_mapping, verdict.inbound) == (NatMapping.DEPENDENT, Inbound.BLOCKED)


def test_public_node_without_echo_is_blocked_and_mapping_none() -> None:
    probes = ReachProbes(timeout_s=1.0)
    probes.begin("fw.x", observed=E("198.51.100.7:443"), behind_nat=False, now=0.0)
    [verdict] = probes.expire(now=2.0)
    assert (verdict.nat_mapping, verdict.inbound) == (NatMapping.NONE, Inbound.BLOCKED)


def test_nat_node_whose_mapping_probe_never_came_is_unknown() -> None:
    probes = ReachProbes(timeout_s=1.0)
    probes.begin("a.x", observed=E("203.0.113.5:443"), behind_nat=True, now=0.0)
    [verdict] = probes.expire(now=1.0)
    assert verdict.nat_mapping is NatMapping.UNKNOWN


def test_foreign_frames_are_ignored() -> None:
    probes = ReachProbes(timeout_s=1.0)
    observed = E("203.0.113.5:443")
    nonce = probes.begin("a.x", observed=observed, behind_nat=True, now=0.0)
    assert nonce is not None
    # An echo from elsewhere (a spoofer who learnt nothing) does not count.
    assert probes.received(frame(KIND_ECHO, nonce), E("192.0.2.66:443"), now=0.1) is None
    # Unknown nonce, wrong kind, garbage.
    assert probes.received(frame(KIND_MAPPING, b"\x07" * 16), observed, now=0.1) is None
    assert probes.received(frame(KIND_INBOUND, nonce), observed, now=0.1) is None
    assert probes.received(b"\x00CYREACH1", observed, now=0.1) is None
    [verdict] = probes.expire(now=1.0)
    assert verdict.inbound is Inbound.BLOCKED


def test_a_new_probe_replaces_the_node_old_one_and_pending_is_bounded() -> None:
    probes = ReachProbes(timeout_s=1.0, max_pending=2)
    first = probes.begin("a.x", observed=E("203.0.113.5:443"), behind_nat=True, now=0.0)
    second = probes.begin("a.x", observed=E("203.0.113.5:443"), behind_nat=True, now=0.1)
    assert first is not None and second is not None and first != second
    assert len(probes) == 1 and probes.target(first) is None
    assert probes.begin("b.x", observed=E("203.0.113.6:443"), behind_nat=True, now=0.1)
    assert probes.begin("c.x", observed=E("203.0.113.7:443"), behind_nat=True, now=0.1) is None
    assert probes.next_deadline() == 1.1


# --- decisions -------------------------------------------------------------------------------


def test_firewalled_public_ipv4_node_connects_out_from_the_first_route() -> None:
    fw = GLOBAL4.probed(nat_mapping=NatMapping.NONE, inbound=Inbound.BLOCKED)
    other = classify([E("198.51.100.9:443")], E("198.51.100.9:443"))
    assert fw.ipv4_reach is Reach.NAT_IPV4
    decision = pattern_for(other, fw)
    assert (decision.pattern, decision.connector) == (Pattern.NAT_CONNECTS, Side.RESPONDER)
    assert decision.candidates == (E("198.51.100.9:443"),)
    reason = explain(
        pattern=2,
        family=4,
        initiator="alice.x",
        responder="fw.x",
        initiator_net=other,
        responder_net=fw,
    )
    assert reason.code == "inbound_blocked"
    assert "fw connects to alice" in reason.text


def test_open_probe_changes_nothing() -> None:
    open_node = GLOBAL4.probed(nat_mapping=NatMapping.NONE, inbound=Inbound.OPEN)
    other = classify([E("198.51.100.9:443")], E("198.51.100.9:443"))
    assert pattern_for(other, open_node).pattern is Pattern.DIRECT


def test_firewalled_ipv6_node_connects_out() -> None:
    fw = V6B.probed(nat_mapping=NatMapping.NONE, inbound=Inbound.BLOCKED)
    decision = pattern_for(V6, fw)
    assert (decision.pattern, decision.connector) == (Pattern.NAT_CONNECTS, Side.RESPONDER)
    assert pattern_for(fw, V6).connector is Side.INITIATOR
    assert pattern_for(fw, fw).pattern is Pattern.RELAY


def test_two_eim_nats_are_relayed_with_a_punch() -> None:
    a = NAT_A.probed(nat_mapping=EIM, inbound=Inbound.BLOCKED)
    b = NAT_B.probed(nat_mapping=EIM, inbound=Inbound.BLOCKED)
    decision = pattern_for(a, b)
    assert decision.pattern is Pattern.RELAY
    assert decision.punch == (E("203.0.113.5:443"), E("203.0.113.6:443"))
    reason = explain(
        pattern=3, family=None, initiator="a.x", responder="b.x", initiator_net=a, responder_net=b
    )
    assert reason.code == "hole_punching"
    assert "direct after hole punching" in reason.text


def test_a_symmetric_nat_on_either_side_means_no_punch_and_says_so() -> None:
    a = NAT_A.probed(nat_mapping=EIM, inbound=Inbound.BLOCKED)
    home = NAT_B.probed(nat_mapping=NatMapping.DEPENDENT, inbound=Inbound.BLOCKED)
    for x, y in ((a, home), (home, a)):
        assert pattern_for(x, y).punch is None
    reason = explain(
        pattern=3,
        family=None,
        initiator="a.x",
        responder="home.x",
        initiator_net=a,
        responder_net=home,
    )
    assert reason.code == "both_behind_nat"
    assert "home: symmetric mapping" in reason.text
    # Unprobed NATs are not punched either.
    assert pattern_for(NAT_A, NAT_B).punch is None


def test_a_node_on_tcp_443_is_relayed_and_the_words_say_udp_is_blocked() -> None:
    # Its packets reach the NMS over a TLS stream: observed at a stream address (240/8).
    tcp = classify([E("192.168.5.10:443")], E("240.0.0.3:40000"))
    assert tcp.relay_only
    for x, y in ((tcp, GLOBAL4), (GLOBAL4, tcp)):
        assert pattern_for(x, y).pattern is Pattern.RELAY
    reason = explain(
        pattern=3,
        family=None,
        initiator="ub.x",
        responder="g1.x",
        initiator_net=tcp,
        responder_net=GLOBAL4,
    )
    assert reason.code == "udp_blocked"
    assert reason.text.startswith("ub reaches the overlay only over TCP 443")
