"""The agent's control policy (cyphonic_agent.control), sans-I/O with a fake clock:
reconnect back-off with jitter, route-request de-duplication with a failure hold, connect
retries, route reversal, mobility decisions, bring-up."""

from __future__ import annotations

import ipaddress

import pytest
from cyphonic.errors import (
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    Timeout,
    Unavailable,
    from_wire,
)
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_agent.control import (
    ACCEPT_RETRY_S,
    RECONNECT_SPREAD_S,
    Ask,
    Attempt,
    ConnectPlan,
    Exhausted,
    GiveUp,
    Join,
    Known,
    NoSuchPeer,
    OverlayPlan,
    Reconnect,
    Refused,
    Reversals,
    RouteRequests,
    on_miss,
    on_move,
)
from cyphonic_agent.nms import SILENT_FOR_S, answering_first
from cyphonic_agent.routes import Candidate, RouteState, RouteTable

BOB = "bob.cyphonic.internal"
BOB_V4 = bytes([100, 64, 0, 2])
NMS = Candidate("192.0.2.1", 443)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self, seconds: float = 0.0) -> float:
        self.now += seconds
        return self.now


def fixed_jitter(factor: float):  # type: ignore[no-untyped-def]
    return lambda low, high: factor if low <= factor <= high else pytest.fail("jitter range")


def direction(
    route_id: str = "r1",
    *,
    role: int = pb.ROUTE_ROLE_ACCEPT,
    pattern: int = pb.ROUTE_PATTERN_DIRECT,
) -> pb.RouteDirection:
    d = pb.RouteDirection(
        route_id=route_id,
        pattern=pattern,  # type: ignore[arg-type]
        role=role,  # type: ignore[arg-type]
        peer_fqdn=BOB,
        peer_virtual_ipv4=BOB_V4,
    )
    d.peer_candidates.append(pb.Endpoint(ip=bytes([203, 0, 113, 10]), port=443))
    d.peer_candidates.append(pb.Endpoint(ip=bytes([198, 51, 100, 7]), port=443))
    return d


# --------------------------------------------------------------------------- reconnect


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets_after_registering() -> None:
    clock = Clock()
    policy = Reconnect(max_delay_s=5.0, jitter=fixed_jitter(1.2))
    policy.started(now=clock())
    delays = [policy.lost(Unavailable("x"), now=clock(1)) for _ in range(6)]
    assert delays == pytest.approx([0.6, 1.2, 2.4, 4.8, 6.0, 6.0])  # 0.5*2**n, cap 5, * 1.2
    policy.registered()
    # The first pause after losing a registered connection is spread over the whole window.
    policy.jitter = fixed_jitter(0.5)
    assert policy.lost(Unavailable("x"), now=clock(1)) == pytest.approx(0.5 * RECONNECT_SPREAD_S)
    policy.jitter = fixed_jitter(1.2)
    assert policy.lost(Unavailable("x"), now=clock(1)) == pytest.approx(1.2)  # then doubling


def test_a_lost_replicas_nodes_come_back_spread_over_the_window() -> None:
    delays = []
    for _ in range(400):
        policy = Reconnect(max_delay_s=30.0)
        policy.registered()
        delays.append(policy.lost(Unavailable("nms gone"), now=0.0))
    assert all(0.0 <= d <= RECONNECT_SPREAD_S for d in delays)
    # full jitter: a quarter of the window holds about a quarter of the nodes, not all
    early = sum(d < RECONNECT_SPREAD_S / 4 for d in delays)
    assert 40 < early < 160


def test_an_overloaded_nms_retry_after_is_the_pause_stretched_by_jitter() -> None:
    policy = Reconnect(max_delay_s=30.0, jitter=fixed_jitter(1.0))
    busy = Overloaded("busy", retry_after_s=4.0)
    assert policy.lost(busy, now=0.0) == pytest.approx(4.0)  # back-off alone: 0.5
    policy.jitter = lambda low, high: high
    assert policy.lost(busy, now=1.0) == pytest.approx(6.0)  # 1.5 x 4.0
    # Refused again and again: still the NMS's word, no doubling on top (that put a
    # storm's last nodes 16-30 s away from a free replica); nothing else counts as an attempt.
    policy.jitter = fixed_jitter(1.0)
    short = Overloaded("busy", retry_after_s=0.5)
    assert [policy.lost(short, now=2.0 + i) for i in range(8)] == [pytest.approx(0.5)] * 8
    assert policy.lost(Unavailable("gone"), now=11.0) == pytest.approx(0.5)  # 0.5 x 2**0
    # the cap still holds: an NMS cannot park a node for longer than reconnect_max_s
    capped = Reconnect(max_delay_s=3.0, jitter=fixed_jitter(1.0))
    assert capped.lost(Overloaded("busy", retry_after_s=60.0), now=0.0) == pytest.approx(3.0)
    # nor does a refusal after a move skip the pause
    moved = Reconnect(max_delay_s=30.0, jitter=fixed_jitter(1.0))
    moved.reconnect_now = True
    assert moved.lost(busy, now=0.0) == pytest.approx(4.0)
    assert not moved.reconnect_now


def test_overloaded_crosses_the_wire_with_its_retry_after() -> None:
    wire = Overloaded("busy", retry_after_s=2.5).to_wire()
    assert wire.code == pb.ERROR_CODE_UNAVAILABLE and wire.retry_after_ms == 2500
    back = from_wire(wire)
    assert isinstance(back, Overloaded) and back.retry_after_s == pytest.approx(2.5)
    plain = from_wire(Unavailable("db down").to_wire())
    assert type(plain) is Unavailable


def test_jitter_stays_within_twenty_percent() -> None:
    policy = Reconnect(max_delay_s=60.0)
    seen = {
        round(Reconnect(max_delay_s=60.0).lost(Unavailable("x"), now=0.0), 3) for _ in range(50)
    }
    assert all(0.4 <= d <= 0.6 for d in seen) and len(seen) > 5
    assert policy.attempt == 0


def test_reconnect_now_after_a_move_skips_the_pause_once() -> None:
    policy = Reconnect(max_delay_s=5.0, jitter=fixed_jitter(1.0))
    policy.lost(Unavailable("x"), now=0.0)
    policy.reconnect_now = True
    assert policy.lost(Unavailable("moved"), now=1.0) == 0.0
    assert policy.lost(Unavailable("x"), now=2.0) == pytest.approx(2.0)


def test_gives_up_only_before_the_first_registration() -> None:
    clock = Clock()
    policy = Reconnect(max_delay_s=5.0, give_up_after_s=10.0, jitter=fixed_jitter(1.0))
    policy.started(now=clock())
    assert isinstance(policy.lost(Timeout("silent"), now=clock(9.9)), float)
    decision = policy.lost(Timeout("silent"), now=clock(0.2))
    assert isinstance(decision, GiveUp) and decision.error.message == "silent"
    # once registered, the agent never gives up
    policy.registered()
    assert isinstance(policy.lost(Timeout("silent"), now=clock(1000)), float)


def test_login_again_after_repeated_nms_dial_failures() -> None:
    policy = Reconnect(max_delay_s=5.0)
    assert policy.needs_login()  # nothing known yet
    policy.logged_in([NMS])
    assert not policy.needs_login()
    policy.dial_failed()
    assert not policy.needs_login()
    policy.dial_failed()
    assert policy.needs_login()  # two failures: ask the AS where the NMS is now
    policy.logged_in([NMS])
    assert policy.nms_failures == 0
    with pytest.raises(Unavailable, match="no NMS endpoint"):
        policy.logged_in([])


# --------------------------------------------------------------------------- route requests


def answer(fqdn: str = BOB) -> pb.RouteResponse:
    return pb.RouteResponse(route_id="r1", peer_fqdn=fqdn, peer_virtual_ipv4=BOB_V4)


def test_one_request_per_target_at_a_time() -> None:
    clock = Clock()
    requests: RouteRequests[object] = RouteRequests(RouteTable())
    assert requests.begin(BOB, now=clock()) == Ask(BOB)
    assert requests.begin(BOB, now=clock(0.1)) == Join(BOB)  # the DNS and a packet at once
    answered_at = clock(0.1)
    route = requests.answered(BOB, answer(), now=answered_at)
    decision = requests.begin(BOB, now=clock(0.1))
    assert isinstance(decision, Known) and decision.route is route
    # the same peer by its virtual address: known too, no second request
    by_address = requests.begin(BOB_V4, now=clock())
    assert isinstance(by_address, Known) and by_address.route is route
    assert requests.asked[BOB] == answered_at  # a reversal stays quiet after our own ask


def test_a_failed_request_is_held_then_asked_again() -> None:
    clock = Clock()
    routes: RouteTable[object] = RouteTable(hold_down=2.0)
    requests = RouteRequests(routes)
    assert isinstance(requests.begin(BOB_V4, now=clock()), Ask)
    requests.failed(BOB_V4, Unavailable("peer offline"), now=clock())
    held = requests.begin(BOB_V4, now=clock(1.0))
    assert isinstance(held, Refused) and held.error.message == "peer offline"
    assert routes.stats.held_down == 1
    assert isinstance(requests.begin(BOB_V4, now=clock(1.5)), Ask)  # 2.5 s later


def test_an_unknown_name_answers_no_such_peer_while_held() -> None:
    clock = Clock()
    requests: RouteRequests[object] = RouteRequests(RouteTable(hold_down=2.0))
    requests.begin("nobody.cyphonic.internal", now=clock())
    requests.failed("nobody.cyphonic.internal", NotFound("no such node"), now=clock())
    assert requests.begin("nobody.cyphonic.internal", now=clock(0.5)) == NoSuchPeer()
    requests.expire(now=clock(0.5))
    assert "nobody.cyphonic.internal" in requests.failures
    requests.expire(now=clock(2.0))
    assert requests.failures == {}  # forgotten once no longer held


def test_force_asks_even_with_a_route() -> None:
    requests: RouteRequests[object] = RouteRequests(RouteTable())
    requests.begin(BOB, now=0.0)
    requests.answered(BOB, answer(), now=0.0)
    assert requests.begin(BOB, now=1.0, force=True) == Ask(BOB)


def test_a_failed_route_holds_its_peer_and_addresses() -> None:
    clock = Clock()
    routes: RouteTable[object] = RouteTable(hold_down=2.0)
    requests = RouteRequests(routes)
    action, _ = routes.directed(direction(role=pb.ROUTE_ROLE_CONNECT), now=clock())
    assert requests.route_failed(action.route, "no candidate answered", now=clock())
    assert not requests.route_failed(action.route, "again", now=clock())  # already gone
    held = requests.begin(BOB, now=clock(0.5))
    assert isinstance(held, Refused) and "no candidate answered" in held.error.message
    assert on_miss(BOB_V4, plan=plan(), routes=routes, now=clock()).drop


# --------------------------------------------------------------------------- connecting


def route_to_connect():  # type: ignore[no-untyped-def]
    routes: RouteTable[object] = RouteTable()
    action, _ = routes.directed(direction(role=pb.ROUTE_ROLE_CONNECT), now=0.0)
    return action.route


def test_a_peer_not_yet_directed_is_retried_with_growing_pauses() -> None:
    plan_ = ConnectPlan.for_route(route_to_connect(), lambda c: True)
    assert isinstance(plan_, ConnectPlan)
    first = plan_.first()
    assert first == Attempt(Candidate("203.0.113.10", 443))
    pauses = []
    step = plan_.failed(PermissionDenied("no route directed"))
    while isinstance(step, Attempt) and step.candidate == first.candidate:
        pauses.append(step.pause)
        step = plan_.failed(PermissionDenied("no route directed"))
    assert pauses == list(ACCEPT_RETRY_S)
    # then the next candidate, from scratch
    assert step == Attempt(Candidate("198.51.100.7", 443))
    step = plan_.failed(Timeout("no answer"))  # not a refusal: no retry
    assert isinstance(step, Exhausted)
    assert step.reason == ("203.0.113.10:443: no route directed; 198.51.100.7:443: no answer")


def test_unroutable_candidates_are_skipped_or_fail_the_route() -> None:
    route = route_to_connect()
    only_second = ConnectPlan.for_route(route, lambda c: c.host.startswith("198."))
    assert isinstance(only_second, ConnectPlan)
    assert only_second.first().candidate == Candidate("198.51.100.7", 443)
    none = ConnectPlan.for_route(route, lambda c: False)
    assert isinstance(none, Exhausted)
    assert "no candidate address of the peer is routable" in none.reason
    assert "203.0.113.10:443, 198.51.100.7:443" in none.reason


# --------------------------------------------------------------------------- reversal


def test_a_silent_accepted_direct_route_is_reversed_once_per_quiet_period() -> None:
    clock = Clock()
    routes: RouteTable[object] = RouteTable()
    reversals = Reversals(after_s=2.0, quiet_s=30.0)
    action, _ = routes.directed(direction(), now=clock())
    route = action.route
    assert reversals.watches(route) and route.state is RouteState.AWAITING_PEER
    assert reversals.due(route, routes, {}, now=clock(2.0))
    # the reversal's own request brings a new direction; if that one is silent too, the
    # quiet period stops the two firewalled nodes from swapping roles forever
    action, _ = routes.directed(direction("r2"), now=clock())
    assert not reversals.due(action.route, routes, {}, now=clock(2.0))
    assert reversals.due(action.route, routes, {}, now=clock(30.0))


def test_no_reversal_when_the_peer_came_or_we_asked_or_it_is_not_direct() -> None:
    clock = Clock()
    routes: RouteTable[object] = RouteTable()
    reversals = Reversals()
    route = routes.directed(direction(), now=clock())[0].route
    routes.tunnel_up(route, object(), now=clock(1.0))
    assert not reversals.due(route, routes, {}, now=clock(1.0))  # the peer connected
    route = routes.directed(direction("r2"), now=clock())[0].route
    assert not reversals.due(route, routes, {BOB: clock.now - 5}, now=clock(2.0))  # we asked
    relayed = routes.directed(direction("r3", pattern=pb.ROUTE_PATTERN_RELAY), now=clock())[0]
    assert not reversals.watches(relayed.route)
    connect = routes.directed(direction("r4", role=pb.ROUTE_ROLE_CONNECT), now=clock())[0]
    assert not reversals.watches(connect.route)
    stale = routes.directed(direction("r5"), now=clock())[0].route
    routes.directed(direction("r6"), now=clock())  # replaced meanwhile
    assert not reversals.due(stale, routes, {}, now=clock(60))


# --------------------------------------------------------------------------- mobility


def test_move_decisions() -> None:
    connected = {"nms_open": True, "registered": True, "nms_routable": True}
    assert on_move(rotated_on_loss=False, **connected) == on_move(
        rotated_on_loss=False, **connected
    )
    d = on_move(rotated_on_loss=False, **connected)
    assert (d.rotate, d.reregister, d.reconnect) == (True, True, False)
    # the path loss already rotated the connection IDs: only probe
    assert not on_move(rotated_on_loss=True, **connected).rotate
    # the NMS endpoint is unreachable from the new path: reconnect at once
    d = on_move(rotated_on_loss=False, nms_open=True, registered=True, nms_routable=False)
    assert (d.reregister, d.reconnect) == (False, True)
    # not connected (or never registered): the control loop registers when it connects
    d = on_move(rotated_on_loss=False, nms_open=False, registered=True, nms_routable=True)
    assert (d.reregister, d.reconnect) == (False, False)
    d = on_move(rotated_on_loss=False, nms_open=True, registered=False, nms_routable=True)
    assert (d.reregister, d.reconnect) == (False, False)


# --------------------------------------------------------------------------- bring-up


def registration(v4: str = "100.64.0.5", v6: str = "fd00::5") -> pb.RegisterResponse:
    return pb.RegisterResponse(
        virtual_ipv4=ipaddress.ip_address(v4).packed,
        virtual_ipv4_prefix_len=10,
        virtual_ipv6=ipaddress.ip_address(v6).packed,
        virtual_ipv6_prefix_len=64,
    )


def plan() -> OverlayPlan:
    return OverlayPlan.from_registration(registration())


def test_overlay_plan_from_the_first_registration() -> None:
    p = plan()
    assert str(p.ipv4) == "100.64.0.5/10" and str(p.ipv6) == "fd00::5/64"
    assert p.own_addresses == {
        ipaddress.ip_address("100.64.0.5").packed,
        ipaddress.ip_address("fd00::5").packed,
    }
    host_only = OverlayPlan.from_registration(
        pb.RegisterResponse(virtual_ipv4=ipaddress.ip_address("100.64.0.9").packed)
    )
    assert str(host_only.ipv4) == "100.64.0.9/32" and host_only.ipv6 is None


def test_which_tun_misses_ask_for_a_route() -> None:
    p = plan()
    ip = lambda text: ipaddress.ip_address(text).packed  # noqa: E731
    assert p.routable(ip("100.64.0.2")) and p.routable(ip("fd00::2"))
    assert not p.routable(ip("100.64.0.5"))  # ourselves
    assert not p.routable(ip("100.64.0.0")) and not p.routable(ip("100.127.255.255"))
    assert not p.routable(ip("192.0.2.1"))  # not the overlay
    assert not p.routable(ip("ff02::1"))  # multicast
    routes: RouteTable[object] = RouteTable()
    assert on_miss(ip("100.64.0.2"), plan=p, routes=routes, now=0.0).ask
    assert on_miss(ip("192.0.2.1"), plan=p, routes=routes, now=0.0).drop
    assert on_miss(ip("100.64.0.2"), plan=None, routes=routes, now=0.0).drop  # not up yet
    routes.requested(BOB, [ip("100.64.0.2")], now=0.0)
    waiting = on_miss(ip("100.64.0.2"), plan=p, routes=routes, now=0.0)
    assert not waiting.ask and not waiting.drop  # its route is being set up


def test_a_different_lease_later_is_refused() -> None:
    p = plan()
    p.check_same_lease(registration())
    with pytest.raises(InvalidArgument, match="restart the agent"):
        p.check_same_lease(registration(v4="100.64.0.6"))


def test_endpoints_that_did_not_answer_are_dialled_last() -> None:
    """A reconnect storm's nodes whose first NMS endpoint is a dead replica: once it was
    silent, the live one is tried first; a live one too busy to answer once still comes
    before the dead one that never answers; after ``SILENT_FOR_S`` the order is back."""
    dead, live, third = (Candidate(f"192.0.2.{i}", 443) for i in (1, 2, 3))
    order = [dead, live, third]
    assert answering_first(order, {}, 100.0) == order
    assert answering_first(order, {dead: (1, 90.0)}, 100.0) == [live, third, dead]
    busy = {dead: (3, 90.0), live: (1, 95.0)}
    assert answering_first(order, busy, 100.0) == [third, live, dead]
    assert answering_first(order, {dead: (5, 100.0 - SILENT_FOR_S)}, 100.0) == order
