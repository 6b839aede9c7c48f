"""Relay allocation over the control connection, with the in-process CID table."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_testing.trs import mint_token, short_packet, verifier
from cyphonic_trs.allocation import RelayAllocator
from cyphonic_trs.cid import NONCE_LEN, issue_cid
from cyphonic_trs.relay import Drop, DropReason, Forward, RelayCore
from cyphonic_trs.signalling import RelayAllocationService
from cyphonic_trs.storage import InMemoryCidTable

A, B, C = "a.cyphonic.internal", "b.cyphonic.internal", "c.cyphonic.internal"
ADDR_A, ADDR_B = ("198.51.100.7", 40001), ("203.0.113.9", 50002)


class Clock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000
        self.mono = 100.0

    def wall(self) -> int:
        return self.ms

    def monotonic(self) -> float:
        return self.mono


def make_service(
    table: InMemoryCidTable, clock: Clock, *, replica: int = 2, rng=None
) -> RelayAllocationService:
    allocator = RelayAllocator(
        replica_id=replica, verify_token=verifier(), cids_per_side=4, idle_timeout_s=60
    )
    kwargs = {"rng": rng} if rng is not None else {}
    return RelayAllocationService(
        allocator=allocator,
        core=RelayCore(replica_id=replica, idle_timeout=60),
        table=table,
        session_ttl_s=80,
        clock_ms=clock.wall,
        monotonic=clock.monotonic,
        **kwargs,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock: Clock) -> InMemoryCidTable:
    return InMemoryCidTable(clock=clock.monotonic)


def request(token: bytes, route_id: str = "r1") -> pb.RelayAllocationRequest:
    return pb.RelayAllocationRequest(allocation_token=token, route_id=route_id)


async def test_both_sides_allocate_then_packets_flow(table, clock) -> None:
    svc = make_service(table, clock)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=clock.ms)
    got_b = await svc.allocate(request(token), fqdn=B, is_node=True, addr=ADDR_B)
    assert len(got_b.connection_ids) == 4 and got_b.route_id == "r1"
    stored = await table.load_session("r1")
    assert stored is not None and not stored.complete
    assert table.cid_owner(got_b.connection_ids[0]) == ("r1", B, 2)
    # B's CIDs exist, but A has not allocated: nothing flows yet.
    assert svc.core.datagram_received(
        short_packet(got_b.connection_ids[0]), ADDR_A, clock.mono
    ) == Drop(DropReason.NO_PEER)
    got_a = await svc.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A)
    assert svc.core.datagram_received(
        short_packet(got_b.connection_ids[0]), ADDR_A, clock.mono
    ) == Forward(ADDR_B)
    assert svc.core.datagram_received(
        short_packet(got_a.connection_ids[3]), ADDR_B, clock.mono
    ) == Forward(ADDR_A)
    stored = await table.load_session("r1")
    assert stored is not None and stored.complete and stored.version == 2
    assert svc.allocations["ok"] == 2


async def test_replayed_token_is_refused(table, clock) -> None:
    svc = make_service(table, clock)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=clock.ms)
    first = await svc.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A)
    answer = await svc.handle(
        pb.Envelope(relay_allocation_request=request(token)), fqdn=A, is_node=True, addr=ADDR_A
    )
    assert answer.WhichOneof("body") == "error"
    assert answer.error.code == pb.ERROR_CODE_TOKEN_INVALID and "already used" in (
        answer.error.message
    )
    # The refused replay changed nothing: the first CIDs still belong to A.
    session = await table.load_session("r1")
    assert session is not None and list(session.side_of(A).cids) == list(first.connection_ids)
    assert svc.allocations["token_invalid"] == 1


async def test_replay_on_another_replica_sharing_the_table_is_refused(table, clock) -> None:
    one, two = make_service(table, clock, replica=1), make_service(table, clock, replica=2)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=clock.ms)
    await one.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A)
    with pytest.raises(Exception, match="already used"):
        await two.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A)


async def test_second_side_on_another_replica_is_told_so(table, clock) -> None:
    one, two = make_service(table, clock, replica=1), make_service(table, clock, replica=2)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=clock.ms)
    await one.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A)
    answer = await two.handle(
        pb.Envelope(relay_allocation_request=request(token)), fqdn=B, is_node=True, addr=ADDR_B
    )
    assert answer.error.code == pb.ERROR_CODE_UNAVAILABLE and "replica 1" in answer.error.message
    assert len(two.core) == 0
    # The refusal did not use up B's token: B retries at replica 1 with it.
    await one.allocate(request(token), fqdn=B, is_node=True, addr=ADDR_B)
    session = await table.load_session("r1")
    assert session is not None and session.complete


async def test_third_node_and_services_are_refused(table, clock) -> None:
    svc = make_service(table, clock)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=clock.ms)
    answer = await svc.handle(
        pb.Envelope(relay_allocation_request=request(token)), fqdn=C, is_node=True, addr=ADDR_A
    )
    assert answer.error.code == pb.ERROR_CODE_TOKEN_INVALID
    answer = await svc.handle(
        pb.Envelope(relay_allocation_request=request(token)), fqdn=A, is_node=False, addr=ADDR_A
    )
    assert answer.error.code == pb.ERROR_CODE_PERMISSION_DENIED
    assert await table.load_session("r1") is None
    # C's failed attempt did not burn A's use of the token.
    await svc.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A)


async def test_expired_token_is_refused_at_the_boundary(table, clock) -> None:
    svc = make_service(table, clock)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=clock.ms, lifetime_ms=500)
    clock.ms += 500
    answer = await svc.handle(
        pb.Envelope(relay_allocation_request=request(token)), fqdn=A, is_node=True, addr=ADDR_A
    )
    assert answer.error.code == pb.ERROR_CODE_TOKEN_INVALID and "expired" in answer.error.message


async def test_unexpected_messages_get_a_typed_error_and_keepalives_an_ack(table, clock) -> None:
    svc = make_service(table, clock)
    answer = await svc.handle(
        pb.Envelope(login_request=pb.LoginRequest()), fqdn=A, is_node=True, addr=ADDR_A
    )
    assert answer.error.code == pb.ERROR_CODE_UNEXPECTED_MESSAGE
    answer = await svc.handle(
        pb.Envelope(keepalive=pb.Keepalive(sequence=7)), fqdn=A, is_node=True, addr=ADDR_A
    )
    assert answer.keepalive_ack.sequence == 7


async def test_concurrent_allocations_of_both_sides_both_succeed(table, clock) -> None:
    svc = make_service(table, clock)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=clock.ms)

    original_load = table.load_session

    async def slow_load(route_id: str):
        result = await original_load(route_id)
        await asyncio.sleep(0.01)  # both read "absent" before either writes
        return result

    table.load_session = slow_load  # type: ignore[method-assign]
    a, b = await asyncio.gather(
        svc.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A),
        svc.allocate(request(token), fqdn=B, is_node=True, addr=ADDR_B),
    )
    session = await original_load("r1")
    assert session is not None and session.complete
    assert list(session.side_of(A).cids) == list(a.connection_ids)
    assert list(session.side_of(B).cids) == list(b.connection_ids)
    assert svc.core.datagram_received(
        short_packet(b.connection_ids[0]), ADDR_A, clock.mono
    ) == Forward(ADDR_B)


async def test_reallocation_with_a_new_token_replaces_and_releases_cids(table, clock) -> None:
    svc = make_service(table, clock)
    t1 = mint_token(route_id="r1", a=A, b=B, now_ms=clock.ms)
    old = await svc.allocate(request(t1), fqdn=A, is_node=True, addr=ADDR_A)
    t2 = mint_token(route_id="r1", a=A, b=B, now_ms=clock.ms)
    new = await svc.allocate(request(t2), fqdn=A, is_node=True, addr=ADDR_A)
    assert not set(old.connection_ids) & set(new.connection_ids)
    assert all(table.cid_owner(c) is None for c in old.connection_ids)
    assert all(table.cid_owner(c) == ("r1", A, 2) for c in new.connection_ids)
    assert svc.core.owner_of(old.connection_ids[0]) is None


async def test_colliding_cids_are_replaced_before_use(table, clock) -> None:
    # Reserve, for another route, the CID the rigged random source will produce first.
    nonces = itertools.count(1)

    def rng(n: int) -> bytes:
        return next(nonces).to_bytes(NONCE_LEN, "big")[:n]

    taken = issue_cid(2, lambda n: (1).to_bytes(NONCE_LEN, "big"))
    await table.reserve_cids([taken], route_id="other", fqdn=C, replica_id=2, ttl_s=60)
    svc = make_service(table, clock, rng=rng)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=clock.ms)
    got = await svc.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A)
    assert taken not in got.connection_ids and len(set(got.connection_ids)) == 4
    assert table.cid_owner(taken) == ("other", C, 2)


async def test_control_connection_moves_the_address_everywhere(table, clock) -> None:
    svc = make_service(table, clock)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=clock.ms)
    got_b = await svc.allocate(request(token), fqdn=B, is_node=True, addr=ADDR_B)
    await svc.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A)
    new_a = ("::ffff:192.0.2.77", 61000, 0, 0)  # as a dual-stack socket reports it
    answer = await svc.handle(
        pb.Envelope(keepalive=pb.Keepalive(sequence=1)), fqdn=A, is_node=True, addr=new_a
    )
    assert answer.keepalive_ack.sequence == 1
    session = await table.load_session("r1")
    assert session is not None and session.side_of(A).addr == ("192.0.2.77", 61000)
    assert svc.core.datagram_received(
        short_packet(got_b.connection_ids[0]), ADDR_A, clock.mono
    ) == Drop(DropReason.SPOOFED_SOURCE)
    assert svc.core.datagram_received(
        short_packet(got_b.connection_ids[0]), ("192.0.2.77", 61000), clock.mono
    ) == Forward(ADDR_B)


async def test_restart_restores_sessions_from_the_table(table, clock) -> None:
    svc = make_service(table, clock)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=clock.ms)
    got_b = await svc.allocate(request(token), fqdn=B, is_node=True, addr=ADDR_B)
    await svc.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A)
    other = make_service(table, clock, replica=3)
    await other.allocate(
        request(mint_token(route_id="r9", a=A, b=C, now_ms=clock.ms), "r9"),
        fqdn=A,
        is_node=True,
        addr=ADDR_A,
    )

    restarted = make_service(table, clock)  # same replica id, empty memory
    assert await restarted.restore() == 1
    assert "r9" not in restarted.core
    assert restarted.core.datagram_received(
        short_packet(got_b.connection_ids[1]), ADDR_A, clock.mono
    ) == Forward(ADDR_B)


async def test_release_removes_everywhere(table, clock) -> None:
    svc = make_service(table, clock)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=clock.ms)
    got = await svc.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A)
    await svc.release("r1")
    assert await table.load_session("r1") is None
    assert table.cid_owner(got.connection_ids[0]) is None and "r1" not in svc.core
