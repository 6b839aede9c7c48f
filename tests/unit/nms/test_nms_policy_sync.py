"""The policy sync without a fast poll, on SQLite (the embedded default): an unchanged
revision costs no walk over the nodes held, a failed filter push is retried, a woken job runs
soon after its event, SQLite has no registry notices (the Postgres run is in
tests/integration/nms/test_nms_change_events.py); and the routes decided here are found by
pair, not by a walk."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cyphonic.errors import Unavailable
from cyphonic.pki import init_pki
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms import manager as manager_module
from cyphonic_nms.cluster import RouteRecord
from cyphonic_nms.config import NmsSettings
from cyphonic_nms.registry_events import RegistryEvents
from cyphonic_nms.routing import Endpoint
from cyphonic_nms.signalling import start_signalling
from cyphonic_testing.nms import DOMAIN, InProcessCluster, RecordingLink, add_node


async def _settled(nms: manager_module.NodeManager) -> None:
    """Let the registrations' own filter pushes run."""
    for _ in range(20):
        await asyncio.sleep(0)
    await nms.sync_policy()


async def test_an_unchanged_revision_compiles_no_filter(
    cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    nms = await cluster.replica("r1")
    links = [await cluster.node(nms, f"n{i}") for i in range(5)]
    await _settled(nms)
    assert all(len(link.of("policy_filter")) == 1 for link in links)
    assert nms.access is not None
    compiled: list[str] = []
    original = nms.access.compile_for
    monkeypatch.setattr(
        nms.access, "compile_for", lambda fqdn: compiled.append(fqdn) or original(fqdn)
    )
    assert nms._filters_due == set()  # what an unchanged revision looks at: nothing
    for _ in range(3):
        await nms.sync_policy()
    assert compiled == []
    await nms.sync_policy(force=True)  # forced: every node again (nothing new to push)
    assert sorted(compiled) == sorted(link.fqdn for link in links)
    assert all(len(link.of("policy_filter")) == 1 for link in links)


class _FlakyLink(RecordingLink):
    fail = True

    async def push(self, envelope: pb.Envelope) -> None:
        if self.fail and envelope.WhichOneof("body") == "policy_filter":
            raise Unavailable("stream refused")
        await super().push(envelope)


async def test_a_filter_that_did_not_get_through_is_pushed_on_the_next_sync(
    cluster: InProcessCluster,
) -> None:
    nms = await cluster.replica("r1")
    ok = await cluster.node(nms, "ok")
    flaky = _FlakyLink(fqdn=f"flaky.{DOMAIN}", serial_hex="1")
    await add_node(cluster.sessions, "flaky")
    here = Endpoint.parse("198.51.100.9:443")
    await nms.register(flaky, local_addresses=[here], observed=here)
    await _settled(nms)
    assert flaky.of("policy_filter") == []
    flaky.fail = False
    await nms.sync_policy()
    assert len(flaky.of("policy_filter")) == 1
    assert len(ok.of("policy_filter")) == 1  # not pushed again


async def test_a_woken_job_runs_at_once_and_the_period_still_holds(
    cluster: InProcessCluster,
) -> None:
    nms = await cluster.replica("r1")
    runs: list[float] = []
    ran = asyncio.Event()

    def job() -> None:
        runs.append(time.monotonic())
        ran.set()

    wake = asyncio.Event()
    task = asyncio.create_task(nms._every(30.0, job, wake=wake))
    try:
        await asyncio.sleep(0.05)
        assert runs == []  # the period is 30 s: nothing yet
        start = time.monotonic()
        wake.set()
        await asyncio.wait_for(ran.wait(), 1)
        assert runs[0] - start < 0.1
        # events in a burst: at most one run per MIN_WAKE_GAP_S
        for _ in range(10):
            wake.set()
            await asyncio.sleep(0.01)
        await asyncio.sleep(manager_module.MIN_WAKE_GAP_S + 0.2)
        assert len(runs) == 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_sqlite_has_no_registry_notices(cluster: InProcessCluster) -> None:
    assert RegistryEvents.for_engine(cluster.engine, {}) is None
    nms = await cluster.replica("r1")
    assert nms._events is None


def _route(route_id: str, a: str, b: str) -> RouteRecord:
    return RouteRecord(
        route_id=route_id,
        initiator=a,
        responder=b,
        pattern=1,
        family=4,
        connector="initiator",
        trs_replica=None,
        created_ms=0,
        decided_by="r1",
    )


def test_decided_routes_keep_one_route_a_pair_without_a_walk() -> None:
    decided = manager_module._DecidedRoutes()
    decided.add(_route("r1", "a", "b"))
    decided.add(_route("r2", "a", "c"))
    decided.add(_route("r3", "b", "a"))  # the pair's new route replaces r1
    assert sorted(decided.by_id) == ["r2", "r3"]
    decided.forget_pair("a", "b", keep="r3")  # a RouteDirection of this very route
    assert sorted(decided.by_id) == ["r2", "r3"]
    decided.forget_pair("c", "a")  # another replica decided the pair anew
    assert sorted(decided.by_id) == ["r3"]
    decided.pop("r3")
    decided.pop("r3")  # gone already: nothing
    assert len(decided) == 0
    decided.add(_route("r4", "a", "b"))
    assert sorted(decided.by_id) == ["r4"]


async def test_the_quic_revocation_cache_and_the_manager_wake_each_other(
    cluster: InProcessCluster, tmp_path: Path
) -> None:
    """A revocation the cache learnt (the AS's watch) makes the manager poll now; one the
    registry notified (Postgres) makes the cache refresh now."""
    init_pki(tmp_path / "pki", domain=DOMAIN, now=datetime.now(UTC))
    nms = await cluster.replica("r1")
    settings = NmsSettings(
        environment="test",
        database_url=str(cluster.engine.url),
        pki_dir=tmp_path / "pki",
        quic_host="127.0.0.1",
        quic_port=0,
    )
    server = await start_signalling(nms, settings)
    try:
        cache = server.revocations
        assert cache is not None
        assert not nms._revocation_wake.is_set()
        cache.add([0x7A])
        assert nms._revocation_wake.is_set()
        before = cache.refreshes
        nms._registry_revoked()
        async with asyncio.timeout(5):
            while cache.refreshes == before:  # noqa: ASYNC110 (a counter, no event to wait on)
                await asyncio.sleep(0.01)
    finally:
        await server.close()
