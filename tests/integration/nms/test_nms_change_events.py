"""Policy changes and revocations reach every NMS replica by a Postgres notice, not a fast
poll (``cyphonic_nms.registry_events``, migration 0004): two replicas on real Postgres and
Redis with the default (slow, safety) poll intervals; a change made through one replica, or a
revocation written as the AS writes it, is in force at the other replica's nodes within 1 s,
also after the LISTEN connection was cut."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from cyphonic.errors import Revoked
from cyphonic.policy import filter_from_pb
from cyphonic.registry import create_engine, make_sessionmaker
from cyphonic_nms.config import NmsSettings
from cyphonic_nms.manager import NodeManager
from cyphonic_nms.registry_events import RETRY_S
from cyphonic_testing.nms import DOMAIN, RecordingLink, revoke_node
from sqlalchemy import text
from test_nms_shared_state import _enrol, _register, replica

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(120)]

DENY_ALL_RULES = {"rules": []}


def test_the_polls_are_only_a_safety_net() -> None:
    settings = NmsSettings(environment="test")
    assert settings.policy_poll_s >= 10 and settings.revocation_poll_s >= 10
    fields = NodeManager.__dataclass_fields__
    assert fields["policy_poll_s"].default == settings.policy_poll_s
    assert fields["revocation_poll_s"].default == settings.revocation_poll_s


async def _revoke(pg_url: str, node_id: int, serial: str) -> None:
    engine = create_engine(pg_url)
    try:
        await revoke_node(
            make_sessionmaker(engine), node_id, serial=serial, reason="key_compromise"
        )
    finally:
        await engine.dispose()


async def _listening(*managers: NodeManager) -> None:
    for m in managers:
        assert m._events is not None, "Postgres registry: the replica must LISTEN"
        await asyncio.wait_for(m._events.connected.wait(), 10)


async def _filter_revision(link: RecordingLink, revision: int, within_s: float) -> float:
    start = time.perf_counter()
    async with asyncio.timeout(within_s):
        while True:
            pushed = link.of("policy_filter")
            if pushed and pushed[-1].policy_filter.revision >= revision:
                return time.perf_counter() - start
            await asyncio.sleep(0.01)


async def test_a_policy_change_through_one_replica_is_in_force_at_the_other_within_1s(
    pg_url: str, redis_url: str
) -> None:
    await _enrol(pg_url, "a", "b")
    async with (
        replica(pg_url, redis_url, "r1", revocation_poll_s=60) as r1,
        replica(pg_url, redis_url, "r2", revocation_poll_s=60) as r2,
    ):
        assert r1.policy_poll_s >= 10  # the default: the poll cannot be what delivers it
        await _listening(r1, r2)
        a = await _register(r1, "a", "198.51.100.1")
        await _register(r2, "b", "198.51.100.2")
        await a.wait_for("policy_filter")
        assert filter_from_pb(a.of("policy_filter")[-1].policy_filter).allow_all
        # what the admin API of r2 does: write, then apply at r2
        assert r2.policy_store is not None
        stored = await r2.policy_store.replace(DENY_ALL_RULES, actor="test", now=datetime.now(UTC))
        await r2.sync_policy()
        await _filter_revision(a, stored.revision, within_s=1.0)
        pushed = filter_from_pb(a.of("policy_filter")[-1].policy_filter)
        assert not pushed.allow_all and pushed.entries == ()
        # a node's tags move the revision too (same trigger)
        await r2.policy_store.set_tags(
            f"b.{DOMAIN}", {"group": "x"}, actor="test", now=datetime.now(UTC)
        )
        await _filter_revision(a, stored.revision + 1, within_s=1.0)


async def test_a_revocation_is_in_force_at_every_replica_within_1s(
    pg_url: str, redis_url: str
) -> None:
    await _enrol(pg_url, "victim", "bystander")
    async with (
        replica(pg_url, redis_url, "r1", revocation_poll_s=60) as r1,
        replica(pg_url, redis_url, "r2", revocation_poll_s=60) as r2,
    ):
        await _listening(r1, r2)
        victim = await _register(r1, "victim", "198.51.100.1", serial="7a")
        bystander = await _register(r2, "bystander", "198.51.100.2", serial="7b")
        view = await r1.nodes.view(victim.fqdn)
        assert view is not None
        await _revoke(pg_url, view.node_id, "7a")
        error = await victim.wait_closed(within_s=1.0)
        assert isinstance(error, Revoked)
        assert victim.of("revocation_notice")[0].revocation_notice.reason == "key_compromise"
        assert bystander.closed is None


async def test_events_come_back_after_the_listen_connection_is_cut(
    pg_url: str, redis_url: str
) -> None:
    await _enrol(pg_url, "first", "second")
    async with replica(pg_url, redis_url, "r1", revocation_poll_s=60) as r1:
        await _listening(r1)
        first = await _register(r1, "first", "198.51.100.1", serial="9a")
        second = await _register(r1, "second", "198.51.100.2", serial="9b")
        ids = {}
        for link in (first, second):
            view = await r1.nodes.view(link.fqdn)
            assert view is not None
            ids[link.fqdn] = view.node_id
        engine = create_engine(pg_url)
        try:
            async with engine.begin() as conn:
                cut = await conn.scalar(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE query LIKE 'LISTEN%' AND datname = current_database()"
                    )
                )
        finally:
            await engine.dispose()
        assert cut == 1
        # revoked while nobody listens: applied once the replica LISTENs again
        await _revoke(pg_url, ids[first.fqdn], "9a")
        assert isinstance(await first.wait_closed(within_s=RETRY_S + 2.0), Revoked)
        await _listening(r1)
        await _revoke(pg_url, ids[second.fqdn], "9b")
        assert isinstance(await second.wait_closed(within_s=1.0), Revoked)
