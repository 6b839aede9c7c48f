"""The agent's side of the reachability probes: only its own registration's inbound probe is
echoed, at most a few times; and what a RouteDirection's hole punching and reason become."""

from __future__ import annotations

from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.reach import KIND_ECHO, KIND_INBOUND, KIND_MAPPING, frame, parse
from cyphonic_agent.reach import MAX_ECHOES, ReachResponder
from cyphonic_agent.routes import Candidate, RouteTable

NONCE = bytes(range(16))


def test_echoes_only_its_own_inbound_probe_a_bounded_number_of_times() -> None:
    r = ReachResponder(nonce=NONCE)
    assert parse(r.mapping_frame()) == (KIND_MAPPING, NONCE)
    assert r.on_datagram(frame(KIND_INBOUND, b"\x09" * 16)) is None  # another nonce
    assert r.on_datagram(frame(KIND_MAPPING, NONCE)) is None  # not a probe to answer
    assert r.on_datagram(b"\x40" + bytes(25)) is None  # a QUIC short header
    echoes = [r.on_datagram(frame(KIND_INBOUND, NONCE)) for _ in range(MAX_ECHOES + 2)]
    assert echoes[:MAX_ECHOES] == [frame(KIND_ECHO, NONCE)] * MAX_ECHOES
    assert echoes[MAX_ECHOES:] == [None, None]


def _direction(**kw: object) -> pb.RouteDirection:
    return pb.RouteDirection(
        route_id="r1",
        pattern=pb.ROUTE_PATTERN_RELAY,
        role=pb.ROUTE_ROLE_CONNECT,
        peer_fqdn="bob.x",
        peer_virtual_ipv4=bytes([100, 64, 0, 2]),
        **kw,  # type: ignore[arg-type]
    )


def test_direction_carries_punch_and_reason_onto_the_route() -> None:
    table: RouteTable[object] = RouteTable()
    punch = pb.HolePunch(
        peer=pb.Endpoint(ip=bytes([203, 0, 113, 6]), port=443),
        delay_ms=0,
        interval_ms=100,
        window_ms=3000,
    )
    action, _ = table.directed(
        _direction(punch=punch, reason_code="hole_punching", reason="both EIM"), now=0.0
    )
    route = action.route
    assert route.punch is not None and route.punch.peer == Candidate("203.0.113.6", 443)
    assert (route.punch.interval_s, route.punch.window_s) == (0.1, 3.0)
    assert (route.reason_code, route.reason) == ("hole_punching", "both EIM")


def test_a_bad_or_absent_punch_is_ignored_and_limits_hold() -> None:
    table: RouteTable[object] = RouteTable()
    bad = pb.HolePunch(peer=pb.Endpoint(ip=b"\x01\x02", port=443))
    action, _ = table.directed(_direction(punch=bad), now=0.0)
    assert action.route.punch is None
    huge = pb.HolePunch(
        peer=pb.Endpoint(ip=bytes([203, 0, 113, 6]), port=443),
        delay_ms=10**9,
        interval_ms=0,
        window_ms=10**9,
    )
    table2: RouteTable[object] = RouteTable()
    action, _ = table2.directed(_direction(punch=huge, reason="x" * 1000), now=0.0)
    p = action.route.punch
    assert p is not None and (p.delay_s, p.interval_s, p.window_s) == (10.0, 0.02, 30.0)
    assert len(action.route.reason) == 300
