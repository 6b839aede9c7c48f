"""The Redis CID table on the real Redis: semantics, key layout, TTLs, races."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from cyphonic.errors import Unavailable
from cyphonic_nms.trs_directory import TrsReplica
from cyphonic_trs.cid import issue_cid
from cyphonic_trs.errors import ConcurrentUpdate
from cyphonic_trs.session import RelaySession, RelaySide
from cyphonic_trs.storage import RedisCidTable, ReplicaInfo

pytestmark = pytest.mark.redis

A, B = "a.cyphonic.internal", "b.cyphonic.internal"


def make_session(route_id: str = "r1", *, replica: int = 4, version: int = 1) -> RelaySession:
    side = RelaySide(
        fqdn=A,
        addr=("192.0.2.1", 4000),
        cids=tuple(issue_cid(replica, os.urandom) for _ in range(3)),
        allocated_ms=123,
    )
    return RelaySession(
        route_id=route_id,
        replica_id=replica,
        pair=(A, B),
        sides=(side, None),
        created_ms=100,
        version=version,
    )


async def test_session_round_trip_and_key_layout(redis_table: RedisCidTable, redis_client) -> None:
    session = make_session()
    await redis_table.reserve_cids(
        session.all_cids(), route_id="r1", fqdn=A, replica_id=4, ttl_s=30
    )
    await redis_table.save_session(session, expected_version=None, ttl_s=30)
    assert await redis_table.load_session("r1") == session
    assert await redis_table.load_session("nope") is None
    p = redis_table.prefix
    stored = await redis_client.hgetall(f"{p}trs:session:r1")
    assert stored[b"version"] == b"1" and stored[b"replica"] == b"4"
    assert json.loads(stored[b"record"])["sides"][0]["host"] == "192.0.2.1"
    cid_hash = await redis_client.hgetall(f"{p}trs:cid:{session.all_cids()[0].hex()}")
    assert cid_hash == {b"route_id": b"r1", b"fqdn": A.encode(), b"replica": b"4"}
    assert 0 < await redis_client.pttl(f"{p}trs:session:r1") <= 30_000
    assert 0 < await redis_client.pttl(f"{p}trs:cid:{session.all_cids()[0].hex()}") <= 30_000
    assert await redis_client.smembers(f"{p}trs:sessions:4") == {b"r1"}


async def test_compare_and_set_refuses_stale_writes(redis_table: RedisCidTable) -> None:
    first = make_session()
    await redis_table.save_session(first, expected_version=None, ttl_s=30)
    with pytest.raises(ConcurrentUpdate):
        await redis_table.save_session(first, expected_version=None, ttl_s=30)
    second = make_session(version=2)
    await redis_table.save_session(second, expected_version=1, ttl_s=30)
    with pytest.raises(ConcurrentUpdate):
        await redis_table.save_session(make_session(version=3), expected_version=1, ttl_s=30)
    assert (await redis_table.load_session("r1")).version == 2


async def test_racing_creators_one_wins(redis_table: RedisCidTable) -> None:
    results = await asyncio.gather(
        *(
            redis_table.save_session(make_session(), expected_version=None, ttl_s=30)
            for _ in range(8)
        ),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, ConcurrentUpdate) for r in results if r is not None)


async def test_token_claims_are_once_per_key_and_expire(redis_table: RedisCidTable) -> None:
    now = 1_700_000_000_000
    assert await redis_table.claim_token("n1:a", expires_ms=now + 300, now_ms=now)
    assert not await redis_table.claim_token("n1:a", expires_ms=now + 300, now_ms=now)
    assert await redis_table.claim_token("n1:b", expires_ms=now + 300, now_ms=now)
    await asyncio.sleep(0.4)
    assert await redis_table.claim_token("n1:a", expires_ms=now + 300, now_ms=now)


async def test_reserving_a_cid_held_by_another_route_reports_it(
    redis_table: RedisCidTable,
) -> None:
    cids = [issue_cid(1, os.urandom) for _ in range(4)]
    assert (
        await redis_table.reserve_cids(cids[:2], route_id="r1", fqdn=A, replica_id=1, ttl_s=30)
        == []
    )
    taken = await redis_table.reserve_cids(cids, route_id="r2", fqdn=B, replica_id=1, ttl_s=30)
    assert taken == cids[:2]
    # Same route again is idempotent.
    assert (
        await redis_table.reserve_cids(cids[:2], route_id="r1", fqdn=A, replica_id=1, ttl_s=30)
        == []
    )
    await redis_table.release_cids(cids[:2])
    assert (
        await redis_table.reserve_cids(cids[:2], route_id="r2", fqdn=B, replica_id=1, ttl_s=30)
        == []
    )


async def test_restart_lists_only_live_sessions_of_the_replica(
    redis_table: RedisCidTable, redis_client
) -> None:
    await redis_table.save_session(make_session("r1"), expected_version=None, ttl_s=30)
    await redis_table.save_session(make_session("r2"), expected_version=None, ttl_s=0.2)
    await redis_table.save_session(make_session("r3", replica=5), expected_version=None, ttl_s=30)
    await asyncio.sleep(0.35)
    sessions = await redis_table.sessions_of_replica(4)
    assert [s.route_id for s in sessions] == ["r1"]
    # The lapsed one was pruned from the replica's set.
    assert await redis_client.smembers(f"{redis_table.prefix}trs:sessions:4") == {b"r1"}


async def test_refresh_extends_ttls_and_stores_counters(
    redis_table: RedisCidTable, redis_client
) -> None:
    session = make_session()
    await redis_table.reserve_cids(session.all_cids(), route_id="r1", fqdn=A, replica_id=4, ttl_s=1)
    await redis_table.save_session(session, expected_version=None, ttl_s=1)
    await redis_table.refresh(["r1", "gone"], ttl_s=60, counters={"r1": (10, 1500), "gone": (1, 1)})
    p = redis_table.prefix
    assert await redis_client.pttl(f"{p}trs:session:r1") > 30_000
    assert await redis_client.pttl(f"{p}trs:cid:{session.all_cids()[2].hex()}") > 30_000
    assert await redis_client.hmget(f"{p}trs:session:r1", "packets", "bytes") == [b"10", b"1500"]
    assert not await redis_client.exists(f"{p}trs:session:gone")  # not resurrected


async def test_delete_session_removes_its_keys(redis_table: RedisCidTable, redis_client) -> None:
    session = make_session()
    await redis_table.reserve_cids(
        session.all_cids(), route_id="r1", fqdn=A, replica_id=4, ttl_s=30
    )
    await redis_table.save_session(session, expected_version=None, ttl_s=30)
    await redis_table.delete_session("r1")
    await redis_table.delete_session("r1")  # idempotent
    keys = [k async for k in redis_client.scan_iter(match=f"{redis_table.prefix}*")]
    assert keys == []


async def test_replica_registration_is_what_the_nms_directory_reads(
    redis_table: RedisCidTable, redis_client
) -> None:
    info = ReplicaInfo(
        replica=3,
        endpoints=("192.0.2.10:443", "[2001:db8::10]:443"),
        server_name="trs.svc.cyphonic.internal",
        load=2,
        updated_ms=99,
    )
    await redis_table.register_replica(info, ttl_s=0.3)
    assert await redis_table.replicas() == [info]
    p = redis_table.prefix
    assert await redis_client.smembers(f"{p}trs:replicas") == {b"trs-3"}
    raw = await redis_client.get(f"{p}trs:replica:trs-3")
    parsed = TrsReplica.from_json(raw)  # the NMS's own parser
    assert parsed.replica_id == "trs-3" and parsed.server_name == info.server_name
    assert [str(e) for e in parsed.endpoints] == list(info.endpoints) and parsed.load == 2
    await asyncio.sleep(0.4)
    assert await redis_table.replicas() == []  # no heartbeat: gone
    await redis_table.register_replica(info)
    await redis_table.unregister_replica(3)
    assert await redis_table.replicas() == []


async def test_unreachable_redis_is_unavailable() -> None:
    table = RedisCidTable.from_url("redis://127.0.0.1:1/0", prefix="x:")
    try:
        with pytest.raises(Unavailable):
            await table.ping()
        with pytest.raises(Unavailable):
            await table.load_session("r1")
    finally:
        await table.close()


async def test_refresh_writes_back_a_session_redis_lost(
    redis_table: RedisCidTable, redis_client
) -> None:
    """Redis restarted without its data while this replica relays: the next sync puts the
    session, its CIDs' owners and the replica's set back; a deleted session stays deleted."""
    session = make_session()
    await redis_table.reserve_cids(
        session.all_cids(), route_id="r1", fqdn=A, replica_id=4, ttl_s=30
    )
    await redis_table.save_session(session, expected_version=None, ttl_s=30)
    gone = make_session("r2")
    await redis_table.save_session(gone, expected_version=None, ttl_s=30)
    await redis_table.delete_session("r2")
    p = redis_table.prefix
    async for key in redis_client.scan_iter(f"{p}*"):  # what a restart without data does
        await redis_client.delete(key)
    await redis_table.refresh(["r1", "r2"], ttl_s=30)
    assert await redis_table.load_session("r1") == session
    assert await redis_table.load_session("r2") is None
    cid_hash = await redis_client.hgetall(f"{p}trs:cid:{session.all_cids()[0].hex()}")
    assert cid_hash == {b"route_id": b"r1", b"fqdn": A.encode(), b"replica": b"4"}
    assert 0 < await redis_client.pttl(f"{p}trs:cid:{session.all_cids()[0].hex()}") <= 30_000
    assert await redis_client.smembers(f"{p}trs:sessions:4") == {b"r1"}
    # the CIDs are reserved again: another route cannot take them
    taken = await redis_table.reserve_cids(
        session.all_cids()[:1], route_id="other", fqdn=B, replica_id=5, ttl_s=30
    )
    assert taken == list(session.all_cids()[:1])
