"""Allocation control, sans-I/O: token checks, sides, sessions, answers."""

from __future__ import annotations

import random

import pytest
from cyphonic.errors import InvalidArgument, PermissionDenied, TokenInvalid
from cyphonic_testing.trs import mint_token, verifier
from cyphonic_trs.allocation import RelayAllocator
from cyphonic_trs.cid import replica_of
from cyphonic_trs.errors import AllocationTokenError, CidError, WrongReplica

A, B, C = "a.cyphonic.internal", "b.cyphonic.internal", "c.cyphonic.internal"
NOW = 1_700_000_000_000


@pytest.fixture
def allocator() -> RelayAllocator:
    return RelayAllocator(
        replica_id=9, verify_token=verifier(), cids_per_side=4, idle_timeout_s=120
    )


def test_grant_for_either_node_of_the_pair(allocator: RelayAllocator) -> None:
    token = mint_token(route_id="r1", a=A, b=B, now_ms=NOW)
    grant_a = allocator.authorize(token=token, route_id="r1", requester_fqdn=A, now_ms=NOW)
    grant_b = allocator.authorize(
        token=token, route_id="r1", requester_fqdn=B.upper(), now_ms=NOW + 1
    )
    assert (grant_a.fqdn, grant_a.peer_fqdn) == (A, B)
    assert (grant_b.fqdn, grant_b.peer_fqdn) == (B, A)
    assert grant_a.pair == grant_b.pair == (A, B)
    assert grant_a.nonce == grant_b.nonce and len(grant_a.nonce) == 16
    assert grant_a.replay_key != grant_b.replay_key  # each side may use the token once


def test_token_for_another_pair_is_refused(allocator: RelayAllocator) -> None:
    token = mint_token(route_id="r1", a=A, b=B, now_ms=NOW)
    with pytest.raises(AllocationTokenError, match="another pair"):
        allocator.authorize(token=token, route_id="r1", requester_fqdn=C, now_ms=NOW)


def test_token_for_another_route_is_refused(allocator: RelayAllocator) -> None:
    token = mint_token(route_id="r1", a=A, b=B, now_ms=NOW)
    with pytest.raises(AllocationTokenError, match="another route"):
        allocator.authorize(token=token, route_id="r2", requester_fqdn=A, now_ms=NOW)


def test_expired_token_is_refused(allocator: RelayAllocator) -> None:
    token = mint_token(route_id="r1", a=A, b=B, now_ms=NOW, lifetime_ms=1000)
    allocator.authorize(token=token, route_id="r1", requester_fqdn=A, now_ms=NOW + 999)
    with pytest.raises(AllocationTokenError, match="expired") as err:
        allocator.authorize(token=token, route_id="r1", requester_fqdn=A, now_ms=NOW + 1000)
    assert isinstance(err.value, TokenInvalid) and err.value.code_name == "token_invalid"


def test_forged_and_tampered_tokens_are_refused(allocator: RelayAllocator) -> None:
    forged = mint_token(route_id="r1", a=A, b=C, now_ms=NOW, secret=b"x" * 32)
    with pytest.raises(AllocationTokenError):
        allocator.authorize(token=forged, route_id="r1", requester_fqdn=C, now_ms=NOW)
    good = bytearray(mint_token(route_id="r1", a=A, b=B, now_ms=NOW))
    good[-40] ^= 1
    with pytest.raises(AllocationTokenError):
        allocator.authorize(token=bytes(good), route_id="r1", requester_fqdn=A, now_ms=NOW)
    for bad in (b"", b"\x01" * 5000):
        with pytest.raises(AllocationTokenError):
            allocator.authorize(token=bad, route_id="r1", requester_fqdn=A, now_ms=NOW)


def test_token_naming_one_node_twice_is_refused(allocator: RelayAllocator) -> None:
    token = mint_token(route_id="r1", a=A, b=A.upper(), now_ms=NOW)
    with pytest.raises(AllocationTokenError):
        allocator.authorize(token=token, route_id="r1", requester_fqdn=A, now_ms=NOW)


def test_route_id_must_be_given(allocator: RelayAllocator) -> None:
    token = mint_token(route_id="r1", a=A, b=B, now_ms=NOW)
    with pytest.raises(InvalidArgument):
        allocator.authorize(token=token, route_id="", requester_fqdn=A, now_ms=NOW)


def test_first_then_second_side_completes_the_session(allocator: RelayAllocator) -> None:
    rng = random.Random(1).randbytes
    token = mint_token(route_id="r1", a=A, b=B, now_ms=NOW)
    grant_b = allocator.authorize(token=token, route_id="r1", requester_fqdn=B, now_ms=NOW)
    session, side_b = allocator.allocate(
        grant_b, current=None, addr=("2001:db8::b", 443), cids=allocator.new_cids(rng), now_ms=NOW
    )
    assert not session.complete and session.version == 1 and session.replica_id == 9
    assert session.side_of(B) == side_b and session.peer_of(B) is None
    assert all(replica_of(c) == 9 for c in side_b.cids) and len(set(side_b.cids)) == 4
    answer = allocator.answer(session, side_b, now_ms=NOW)
    assert list(answer.connection_ids) == list(side_b.cids) and answer.route_id == "r1"
    assert answer.expires_ms == NOW + 120_000

    grant_a = allocator.authorize(token=token, route_id="r1", requester_fqdn=A, now_ms=NOW)
    done, side_a = allocator.allocate(
        grant_a,
        current=session,
        addr=("198.51.100.7", 4000),
        cids=allocator.new_cids(rng),
        now_ms=NOW + 5,
    )
    assert done.complete and done.version == 2
    assert done.peer_of(A) == side_b and done.side_of(A) == side_a
    assert not set(side_a.cids) & set(side_b.cids)


def test_session_of_another_replica_or_pair_is_refused(allocator: RelayAllocator) -> None:
    rng = random.Random(2).randbytes
    token = mint_token(route_id="r1", a=A, b=B, now_ms=NOW)
    grant = allocator.authorize(token=token, route_id="r1", requester_fqdn=A, now_ms=NOW)
    other = RelayAllocator(replica_id=10, verify_token=verifier(), cids_per_side=4)
    theirs, _ = other.allocate(
        grant, current=None, addr=("192.0.2.1", 1), cids=other.new_cids(rng), now_ms=NOW
    )
    with pytest.raises(WrongReplica):
        allocator.allocate(
            grant, current=theirs, addr=("192.0.2.1", 1), cids=allocator.new_cids(rng), now_ms=NOW
        )
    token_ac = mint_token(route_id="r1", a=A, b=C, now_ms=NOW)
    grant_ac = allocator.authorize(token=token_ac, route_id="r1", requester_fqdn=A, now_ms=NOW)
    mine, _ = allocator.allocate(
        grant, current=None, addr=("192.0.2.1", 1), cids=allocator.new_cids(rng), now_ms=NOW
    )
    with pytest.raises(PermissionDenied):
        allocator.allocate(
            grant_ac, current=mine, addr=("192.0.2.1", 1), cids=allocator.new_cids(rng), now_ms=NOW
        )


def test_cid_count_is_checked_and_bounded() -> None:
    with pytest.raises(InvalidArgument):
        RelayAllocator(replica_id=1, verify_token=verifier(), cids_per_side=0)
    allocator = RelayAllocator(replica_id=1, verify_token=verifier(), cids_per_side=2)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=NOW)
    grant = allocator.authorize(token=token, route_id="r1", requester_fqdn=A, now_ms=NOW)
    with pytest.raises(CidError):
        allocator.allocate(
            grant, current=None, addr=("192.0.2.1", 1), cids=[b"12345678"], now_ms=NOW
        )
    with pytest.raises(CidError):
        allocator.new_cids(lambda n: b"\x00" * n)  # a stuck random source
