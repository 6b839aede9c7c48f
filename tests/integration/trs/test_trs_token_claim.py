"""A failed allocation leaves the node's token usable (real Redis).

The TRS claims a token's use before it reserves CIDs and writes the session; when a later
step fails (the route lives on another replica, Redis drops out, the session keeps
changing), the claim is released so that the node's retry is not refused as a replay.
"""

from __future__ import annotations

from typing import Any

import pytest
from cyphonic.errors import CyphonicError, Unavailable
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_testing.trs import mint_token, verifier
from cyphonic_trs.allocation import RelayAllocator
from cyphonic_trs.errors import ConcurrentUpdate, WrongReplica
from cyphonic_trs.relay import RelayCore
from cyphonic_trs.signalling import RelayAllocationService
from cyphonic_trs.storage import RedisCidTable

pytestmark = [pytest.mark.redis, pytest.mark.timeout(30)]

A, B = "a.cyphonic.internal", "b.cyphonic.internal"
ADDR_A, ADDR_B = ("198.51.100.7", 40001), ("203.0.113.9", 50002)
NOW_MS = 1_700_000_000_000


def service(table: Any, replica: int) -> RelayAllocationService:
    allocator = RelayAllocator(
        replica_id=replica, verify_token=verifier(), cids_per_side=4, idle_timeout_s=60
    )
    return RelayAllocationService(
        allocator=allocator,
        core=RelayCore(replica_id=replica, idle_timeout=60),
        table=table,
        session_ttl_s=80,
        clock_ms=lambda: NOW_MS,
    )


def request(token: bytes, route_id: str = "r1") -> pb.RelayAllocationRequest:
    return pb.RelayAllocationRequest(allocation_token=token, route_id=route_id)


async def test_wrong_replica_does_not_use_up_the_token(redis_table: RedisCidTable) -> None:
    one, two = service(redis_table, 1), service(redis_table, 2)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=NOW_MS)
    await one.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A)
    with pytest.raises(WrongReplica):
        await two.allocate(request(token), fqdn=B, is_node=True, addr=ADDR_B)
    # No CID of the failed attempt stays reserved.
    stored = await redis_table.load_session("r1")
    assert stored is not None and stored.side_of(B) is None
    # B retries at the replica that relays the route, with the same token: accepted.
    answer = await one.allocate(request(token), fqdn=B, is_node=True, addr=ADDR_B)
    stored = await redis_table.load_session("r1")
    assert stored is not None and stored.complete
    assert list(stored.side_of(B).cids) == list(answer.connection_ids)
    # A successful allocation keeps its claim: the same token is a replay afterwards.
    with pytest.raises(Exception, match="already used"):
        await one.allocate(request(token), fqdn=B, is_node=True, addr=ADDR_B)


class FlakyTable(RedisCidTable):
    """The real Redis table, with ``save_session`` failing the first ``failures`` calls."""

    def __init__(self, inner: RedisCidTable, *, failures: int, error: CyphonicError) -> None:
        super().__init__(inner._redis, prefix=inner.prefix)
        self.failures = failures
        self.error = error

    async def save_session(
        self, session: Any, *, expected_version: int | None, ttl_s: float
    ) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        await super().save_session(session, expected_version=expected_version, ttl_s=ttl_s)


@pytest.mark.parametrize(
    ("failures", "error", "expected"),
    [
        (1, Unavailable("Redis unavailable (save session)"), Unavailable),
        (5, ConcurrentUpdate("route r1 changed meanwhile"), ConcurrentUpdate),
    ],
    ids=["redis-down", "endless-concurrent-updates"],
)
async def test_failed_save_does_not_use_up_the_token(
    redis_table: RedisCidTable,
    failures: int,
    error: CyphonicError,
    expected: type[CyphonicError],
) -> None:
    flaky = FlakyTable(redis_table, failures=failures, error=error)
    svc = service(flaky, 1)
    token = mint_token(route_id="r1", a=A, b=B, now_ms=NOW_MS)
    with pytest.raises(expected):
        await svc.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A)
    assert await redis_table.load_session("r1") is None
    answer = await svc.allocate(request(token), fqdn=A, is_node=True, addr=ADDR_A)
    stored = await redis_table.load_session("r1")
    assert stored is not None and list(stored.side_of(A).cids) == list(answer.connection_ids)
    assert svc.allocations == {error.code_name: 1, "ok": 1}
