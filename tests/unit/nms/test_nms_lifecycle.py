"""Life cycle of a replica: stopping never hangs on a task that lost its cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from cyphonic_nms.cluster import InProcessPresence
from cyphonic_nms.manager import NodeManager
from cyphonic_nms.routing import Endpoint
from cyphonic_testing.nms import DOMAIN, InProcessCluster, RecordingLink, add_node

E = Endpoint.parse


class SwallowingPresence(InProcessPresence):
    """Presence whose refresh loses a cancellation, as a redis-py call can on Python 3.11."""

    def __init__(self) -> None:
        super().__init__()
        self.refreshing = asyncio.Event()

    async def refresh(self, fqdns: Iterable[str], replica_id: str, ttl_s: float) -> None:
        self.refreshing.set()
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            return  # swallowed


async def test_stop_ends_loops_even_when_a_job_swallows_the_cancellation(
    cluster: InProcessCluster,
) -> None:
    presence = SwallowingPresence()
    nms = NodeManager(
        nodes=cluster.store,
        pools=cluster.pools,
        replica_id="r1",
        relay_secret=cluster.secret,
        presence=presence,
        keepalive_interval_s=0.05,
        offline_timeout_s=30,
    )
    await nms.start()
    await add_node(cluster.sessions, "a")
    await nms.register(
        RecordingLink(fqdn=f"a.{DOMAIN}"), local_addresses=[], observed=E("198.51.100.1:443")
    )
    await asyncio.wait_for(presence.refreshing.wait(), 5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(10):
        await nms.stop()
    assert loop.time() - started < 2.0  # the loop noticed; no wait for the grace time
    assert not nms.connected


class GatedPresence(InProcessPresence):
    """Presence whose next claim pauses after claiming, until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.claimed = asyncio.Event()

    async def claim(self, fqdn: str, replica_id: str, ttl_s: float) -> str | None:
        previous = await super().claim(fqdn, replica_id, ttl_s)
        gate, self.gate = self.gate, None
        if gate is not None:
            self.claimed.set()
            await gate.wait()
        return previous


async def _replica(cluster: InProcessCluster, presence: InProcessPresence) -> NodeManager:
    return NodeManager(
        nodes=cluster.store,
        pools=cluster.pools,
        replica_id="r1",
        relay_secret=cluster.secret,
        presence=presence,
    )


async def _online(cluster: InProcessCluster, fqdn: str) -> bool:
    view = await cluster.store.view(fqdn)
    assert view is not None
    return view.online


async def test_old_connection_closing_during_a_new_registration_keeps_the_node_online(
    cluster: InProcessCluster,
) -> None:
    presence = GatedPresence()
    nms = await _replica(cluster, presence)
    await add_node(cluster.sessions, "a")
    fqdn = f"a.{DOMAIN}"
    old, new = RecordingLink(fqdn=fqdn), RecordingLink(fqdn=fqdn)
    await nms.register(old, local_addresses=[], observed=E("198.51.100.1:443"))
    # The node reconnects; its old connection's close is noticed while the new registration
    # has claimed presence but not finished.
    presence.gate = gate = asyncio.Event()
    registering = asyncio.create_task(
        nms.register(new, local_addresses=[], observed=E("198.51.100.2:443"))
    )
    await asyncio.wait_for(presence.claimed.wait(), 5)
    closing = asyncio.create_task(nms.disconnected(old))
    await asyncio.sleep(0.1)
    assert not closing.done()  # it waits for the registration instead of interleaving
    gate.set()
    await asyncio.wait_for(asyncio.gather(registering, closing), 5)
    assert nms.connected[fqdn].link is new
    assert await presence.holder(fqdn) == "r1"
    assert await _online(cluster, fqdn)
    assert old.closed is not None and new.closed is None


async def test_connection_closing_during_its_own_registration_leaves_the_node_offline(
    cluster: InProcessCluster,
) -> None:
    presence = GatedPresence()
    nms = await _replica(cluster, presence)
    await add_node(cluster.sessions, "b")
    fqdn = f"b.{DOMAIN}"
    link = RecordingLink(fqdn=fqdn)
    presence.gate = gate = asyncio.Event()
    registering = asyncio.create_task(
        nms.register(link, local_addresses=[], observed=E("198.51.100.3:443"))
    )
    await asyncio.wait_for(presence.claimed.wait(), 5)
    closing = asyncio.create_task(nms.disconnected(link))  # the node went away meanwhile
    await asyncio.sleep(0.1)
    gate.set()
    await asyncio.wait_for(asyncio.gather(registering, closing), 5)
    assert fqdn not in nms.connected  # not left registered on a dead connection
    assert await presence.holder(fqdn) is None
    assert not await _online(cluster, fqdn)
    assert not nms._node_locks  # no lock left behind
