"""The agent's route table (sans-I/O, explicit clock): requests, directions, tunnels, expiry."""

from __future__ import annotations

from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_agent.routes import (
    Accept,
    Candidate,
    Connect,
    Keep,
    RouteState,
    RouteTable,
    pattern_name,
)

BOB = "bob.cyphonic.internal"
CAROL = "carol.cyphonic.internal"
BOB_V4 = bytes([100, 64, 0, 2])
BOB_V6 = bytes.fromhex("fd000000000000000000000000000002")


def direction(
    route_id: str = "r1",
    *,
    role: int = pb.ROUTE_ROLE_CONNECT,
    peer: str = BOB,
    pattern: int = pb.ROUTE_PATTERN_DIRECT,
    candidates: tuple[tuple[bytes, int], ...] = ((bytes([203, 0, 113, 10]), 443),),
) -> pb.RouteDirection:
    d = pb.RouteDirection(
        route_id=route_id,
        pattern=pattern,
        role=role,  # type: ignore[arg-type]
        peer_fqdn=peer,
        peer_virtual_ipv4=BOB_V4,
        peer_virtual_ipv6=BOB_V6,
    )
    d.peer_candidates.extend(pb.Endpoint(ip=ip, port=port) for ip, port in candidates)
    return d


def test_a_request_is_made_once_per_peer() -> None:
    table = RouteTable()
    assert table.should_request(BOB, now=0.0)
    route = table.requested(BOB, [BOB_V4, BOB_V6], now=0.1)
    assert route.state is RouteState.REQUESTED
    # by name or by either virtual address: the route exists, nothing more to ask
    assert not table.should_request(BOB, now=0.2)
    assert not table.should_request(BOB_V4, now=0.2)
    assert table.for_address(BOB_V6) is route


def test_connect_direction_then_tunnel_up() -> None:
    table = RouteTable()
    action, replaced = table.directed(direction(), now=1.0)
    assert isinstance(action, Connect) and replaced is None
    route = action.route
    assert route.state is RouteState.CONNECTING and route.pattern_name == "direct"
    assert route.candidates == (Candidate("203.0.113.10", 443),)
    assert str(route.candidates[0]) == "203.0.113.10:443" and route.candidates[0].family == 4
    assert route.addresses == {BOB_V4, BOB_V6}
    # the RouteResponse arriving after the push only confirms what the push said
    assert table.requested(BOB, [BOB_V4], now=1.1) is route
    assert table.for_address(BOB_V4) is route
    assert table.may_accept(BOB) is None  # we connect; bob does not connect to us
    assert table.tunnel_up(route, "tunnel", now=1.2) is route
    assert route.state is RouteState.UP and route.tunnel == "tunnel"


def test_only_a_directed_peer_may_connect() -> None:
    table = RouteTable()
    assert table.may_accept(BOB) is None
    action, _ = table.directed(direction(role=pb.ROUTE_ROLE_ACCEPT, candidates=()), now=0.0)
    assert isinstance(action, Accept)
    assert table.may_accept(BOB) is action.route
    assert table.may_accept(CAROL) is None


def test_same_route_again_keeps_what_runs() -> None:
    table = RouteTable()
    action, _ = table.directed(direction(), now=0.0)
    route = action.route
    # a re-direction (the peer moved) while connecting: no second connection attempt
    again, replaced = table.directed(
        direction(candidates=((bytes([198, 51, 100, 7]), 443),)), now=0.5
    )
    assert isinstance(again, Keep) and again.route is route and replaced is None
    assert route.candidates == (Candidate("198.51.100.7", 443),)
    table.tunnel_up(route, object(), now=1.0)
    kept, _ = table.directed(direction(role=pb.ROUTE_ROLE_ACCEPT), now=2.0)
    assert isinstance(kept, Keep)  # up: QUIC migration covers a move


def test_a_new_route_id_replaces_the_route() -> None:
    table = RouteTable()
    old = table.directed(direction("r1"), now=0.0)[0].route
    table.tunnel_up(old, "old tunnel", now=0.1)
    action, replaced = table.directed(direction("r2", role=pb.ROUTE_ROLE_ACCEPT), now=1.0)
    assert isinstance(action, Accept) and replaced is old
    assert table.get(BOB) is action.route and action.route.route_id == "r2"
    assert not table.is_current(old)
    assert table.tunnel_up(old, "late", now=1.1) is None  # the old one may not come back
    assert table.stats.replaced == 1


def test_tear_down_lets_the_next_packet_ask_again() -> None:
    table = RouteTable()
    route = table.directed(direction(), now=0.0)[0].route
    table.tunnel_up(route, "t", now=0.1)
    assert table.tear_down(route)
    assert not table.tear_down(route)
    assert table.get(BOB) is None and table.for_address(BOB_V4) is None
    assert table.should_request(BOB_V4, now=0.2)  # no hold-down after a lost tunnel


def test_failures_are_held_down_for_a_while() -> None:
    table = RouteTable(hold_down=2.0)
    table.request_failed(BOB_V4, now=10.0)
    assert table.is_held(BOB_V4, now=11.0) and not table.is_held(BOB_V4, now=12.0)
    assert not table.should_request(BOB_V4, now=11.0)
    assert table.stats.held_down == 1
    assert table.should_request(BOB_V4, now=12.0)
    route = table.directed(direction(), now=20.0)[0].route
    assert table.fail(route, now=21.0)
    assert not table.should_request(BOB, now=22.0)
    assert not table.should_request(BOB_V6, now=22.0)
    assert table.should_request(BOB, now=23.5)


def test_routes_stuck_in_set_up_expire() -> None:
    table = RouteTable(setup_timeout=5.0)
    stuck = table.directed(direction(), now=0.0)[0].route
    up = table.directed(direction("r9", peer=CAROL), now=0.0)[0].route
    table.tunnel_up(up, "t", now=1.0)
    assert table.expire(now=4.0) == []
    assert table.expire(now=5.5) == [stuck]
    assert table.get(BOB) is None and table.get(CAROL) is up
    assert table.stats.failed == 1


def test_relay_direction_is_kept_for_the_relayed_path() -> None:
    table = RouteTable()
    d = direction(pattern=pb.ROUTE_PATTERN_RELAY, candidates=())
    d.relay.trs.append(pb.Endpoint(ip=bytes([192, 0, 2, 12]), port=443))
    d.relay.trs_server_name = "trs.svc.cyphonic.internal"
    d.relay.allocation_token = b"token"
    route = table.directed(d, now=0.0)[0].route
    assert route.relay is not None and route.relay.token == b"token"
    assert route.relay.trs == (Candidate("192.0.2.12", 443),)
    assert route.pattern_name == "relay"


def test_pattern_names() -> None:
    assert [pattern_name(p) for p in (1, 2, 3, 0)] == ["direct", "nat_connects", "relay", "-"]
