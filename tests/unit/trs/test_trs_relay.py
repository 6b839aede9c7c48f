"""The forwarding core with an explicit clock: the normal path and the attack cases."""

from __future__ import annotations

import os

import pytest
from cyphonic.errors import AlreadyExists, NotFound
from cyphonic_testing.trs import random_cid, short_packet
from cyphonic_trs.cid import issue_cid
from cyphonic_trs.relay import TO_LOCAL_SERVER, Drop, DropReason, Forward, RelayCore
from cyphonic_trs.session import RelaySession, RelaySide

A, B = "a.cyphonic.internal", "b.cyphonic.internal"
ADDR_A = ("198.51.100.7", 40001)  # A's NAT mapping towards the TRS
ADDR_B = ("2001:db8::b", 50002)  # B on IPv6 only
THIRD = ("203.0.113.66", 40001)


def side(fqdn: str, addr: tuple[str, int], n: int = 4, replica: int = 3) -> RelaySide:
    return RelaySide(
        fqdn=fqdn,
        addr=addr,
        cids=tuple(issue_cid(replica, os.urandom) for _ in range(n)),
        allocated_ms=0,
    )


def session(route_id: str = "r1", *, a: RelaySide | None, b: RelaySide | None) -> RelaySession:
    return RelaySession(
        route_id=route_id, replica_id=3, pair=(A, B), sides=(a, b), created_ms=0, version=1
    )


@pytest.fixture
def sides() -> tuple[RelaySide, RelaySide]:
    return side(A, ADDR_A), side(B, ADDR_B)


@pytest.fixture
def core(sides: tuple[RelaySide, RelaySide]) -> RelayCore:
    c = RelayCore(replica_id=3, idle_timeout=60.0)
    c.install(session(a=sides[0], b=sides[1]), now=0.0)
    return c


def test_packet_to_b_from_a_goes_to_b_and_back(core: RelayCore, sides) -> None:
    side_a, side_b = sides
    to_b = short_packet(side_b.cids[2])
    assert core.datagram_received(to_b, ADDR_A, 1.0) == Forward(ADDR_B)
    to_a = short_packet(side_a.cids[0])
    assert core.datagram_received(to_a, ADDR_B, 1.0) == Forward(ADDR_A)
    stats = core.session("r1", now=2.0)
    assert stats.sides[0].packets == 1 and stats.sides[0].bytes == len(to_b)
    assert stats.sides[1].packets == 1 and stats.sides[1].bytes == len(to_a)
    assert stats.packets == 2 and stats.age_s == 2.0 and stats.idle_s == 1.0


def test_long_header_initial_with_peer_cid_is_forwarded(core: RelayCore, sides) -> None:
    initial = (
        b"\xc3"
        + (1).to_bytes(4, "big")
        + b"\x08"
        + sides[1].cids[0]
        + b"\x08"
        + sides[0].cids[0]
        + os.urandom(1200)
    )
    assert core.datagram_received(initial, ADDR_A, 0.5) == Forward(ADDR_B)


def test_valid_cid_from_a_third_host_is_not_forwarded(core: RelayCore, sides) -> None:
    packet = short_packet(sides[1].cids[0])
    assert core.datagram_received(packet, THIRD, 1.0) == Drop(DropReason.SPOOFED_SOURCE)
    # Same IP as A but another port (another NAT mapping) is a third host too.
    assert core.datagram_received(packet, (ADDR_A[0], ADDR_A[1] + 1), 1.0) == Drop(
        DropReason.SPOOFED_SOURCE
    )
    stats = core.session("r1", now=1.0)
    assert stats.packets == 0 and stats.spoofed_drops == 2
    assert core.totals().drops[DropReason.SPOOFED_SOURCE] == 2


def test_owner_cannot_reflect_to_itself(core: RelayCore, sides) -> None:
    # B sending a packet carrying its own CID would make the TRS send to B: refused.
    assert core.datagram_received(short_packet(sides[1].cids[0]), ADDR_B, 1.0) == Drop(
        DropReason.SPOOFED_SOURCE
    )


def test_spoofed_packets_do_not_keep_a_session_alive(core: RelayCore, sides) -> None:
    for t in range(1, 100):
        core.datagram_received(short_packet(sides[1].cids[0]), THIRD, float(t))
    assert core.expire(now=61.0) == ["r1"]


def test_nothing_flows_before_the_peer_allocates(sides) -> None:
    c = RelayCore(replica_id=3)
    c.install(session(a=None, b=sides[1]), now=0.0)
    assert c.datagram_received(short_packet(sides[1].cids[0]), ADDR_A, 0.1) == Drop(
        DropReason.NO_PEER
    )
    c.install(session(a=sides[0], b=sides[1]), now=0.2)
    assert c.datagram_received(short_packet(sides[1].cids[0]), ADDR_A, 0.3) == Forward(ADDR_B)


def test_unknown_cids_go_to_the_local_server_and_do_not_disturb(core: RelayCore, sides) -> None:
    for i in range(1000):
        assert core.datagram_received(short_packet(random_cid()), THIRD, 1.0 + i / 1e4) is (
            TO_LOCAL_SERVER
        )
    assert core.datagram_received(short_packet(sides[1].cids[1]), ADDR_A, 2.0) == Forward(ADDR_B)
    totals = core.totals()
    assert totals.to_local_server == 1000 and totals.forwarded_packets == 1


@pytest.mark.parametrize("data", [b"", b"\x40" + b"\x00" * 10, b"\xc0\x00\x00\x00\x01\x15"])
def test_malformed_datagrams_are_dropped(core: RelayCore, data: bytes) -> None:
    assert core.datagram_received(data, ADDR_A, 1.0) == Drop(DropReason.MALFORMED)


def test_address_moves_only_through_update_address(core: RelayCore, sides) -> None:
    new_a = ("192.0.2.200", 61000)
    to_b = short_packet(sides[1].cids[0])
    # A packet from A's new address is not enough ...
    assert core.datagram_received(to_b, new_a, 1.0) == Drop(DropReason.SPOOFED_SOURCE)
    assert core.datagram_received(short_packet(sides[0].cids[0]), ADDR_B, 1.0) == Forward(ADDR_A)
    # ... the control connection moves it.
    assert core.update_address(A, new_a) == ["r1"]
    assert core.update_address(A, new_a) == []  # idempotent
    assert core.datagram_received(to_b, new_a, 2.0) == Forward(ADDR_B)
    assert core.datagram_received(to_b, ADDR_A, 2.0) == Drop(DropReason.SPOOFED_SOURCE)
    assert core.datagram_received(short_packet(sides[0].cids[0]), ADDR_B, 2.0) == Forward(new_a)
    assert core.session("r1", 2.0).sides[0].addr == new_a


def test_idle_sessions_expire_and_their_cids_are_forgotten(core: RelayCore, sides) -> None:
    to_b = short_packet(sides[1].cids[0])
    assert core.datagram_received(to_b, ADDR_A, 50.0) == Forward(ADDR_B)
    assert core.expire(now=109.0) == []
    assert core.active_since(40.0) == ["r1"] and core.active_since(50.0) == []
    assert core.expire(now=110.0) == ["r1"]
    assert "r1" not in core and len(core) == 0
    assert core.datagram_received(to_b, ADDR_A, 111.0) is TO_LOCAL_SERVER
    assert core.totals().forwarded_packets == 1  # retired counters are kept in the totals


def test_install_again_keeps_counters_and_swaps_cids(core: RelayCore, sides) -> None:
    side_a, side_b = sides
    core.datagram_received(short_packet(side_b.cids[0]), ADDR_A, 1.0)
    new_b = side(B, ADDR_B)
    core.install(session(a=side_a, b=new_b), now=2.0)
    assert core.datagram_received(short_packet(side_b.cids[0]), ADDR_A, 3.0) is TO_LOCAL_SERVER
    assert core.datagram_received(short_packet(new_b.cids[0]), ADDR_A, 3.0) == Forward(ADDR_B)
    assert core.session("r1", 3.0).sides[0].packets == 2


def test_a_cid_of_another_route_is_refused_atomically(core: RelayCore, sides) -> None:
    thief = RelaySide(fqdn=A, addr=THIRD, cids=(sides[1].cids[0],), allocated_ms=0)
    with pytest.raises(AlreadyExists):
        core.install(session("r2", a=thief, b=None), now=1.0)
    assert "r2" not in core
    assert core.owner_of(sides[1].cids[0]) == ("r1", B)
    with pytest.raises(AlreadyExists):
        core.install(
            RelaySession(
                route_id="r1", replica_id=3, pair=(A, "c.x"), sides=(None, None), created_ms=0
            ),
            now=1.0,
        )


def test_remove_and_routes_of(core: RelayCore, sides) -> None:
    assert core.routes_of(A) == ["r1"] and core.routes_of("z") == []
    core.remove("r1")
    with pytest.raises(NotFound):
        core.remove("r1")
    with pytest.raises(NotFound):
        core.session("r1", 0.0)
    assert core.owner_of(sides[0].cids[0]) is None


def test_native_addresses_are_compared_in_the_sockets_form(sides) -> None:
    def mapped(hp: tuple[str, int]) -> tuple[str, int, int, int]:
        host = f"::ffff:{hp[0]}" if "." in hp[0] else hp[0]
        return (host, hp[1], 0, 0)

    c = RelayCore(replica_id=3, native_addr=mapped)
    c.install(session(a=sides[0], b=sides[1]), now=0.0)
    action = c.datagram_received(
        short_packet(sides[1].cids[0]), ("::ffff:198.51.100.7", 40001, 0, 0), 1.0
    )
    assert action == Forward(("2001:db8::b", 50002, 0, 0))
    assert c.session("r1", 1.0).sides[0].addr == ADDR_A  # shown in the stored form


def test_short_header_length_boundary(core: RelayCore, sides) -> None:
    from cyphonic_trs.header import SHORT_MIN_AFTER_DCID

    shortest = b"\x40" + sides[1].cids[0] + b"\x00" * SHORT_MIN_AFTER_DCID
    assert core.datagram_received(shortest, ADDR_A, 1.0) == Forward(ADDR_B)
    assert core.datagram_received(shortest[:-1], ADDR_A, 1.0) == Drop(DropReason.MALFORMED)


def test_routes_of_follows_installs_and_expiry(sides) -> None:
    c = RelayCore(replica_id=3, idle_timeout=10)
    c.install(session("r1", a=sides[0], b=None), now=0.0)
    c.install(session("r2", a=side(A, ADDR_A, n=1), b=sides[1]), now=5.0)
    assert c.routes_of(A) == ["r1", "r2"] and c.routes_of(B) == ["r2"]
    assert c.update_address(B, THIRD) == ["r2"]
    assert c.expire(now=12.0) == ["r1"]
    assert c.routes_of(A) == ["r2"]
    c.remove("r2")
    assert c.routes_of(A) == [] and c.routes_of(B) == [] and c.update_address(A, THIRD) == []
