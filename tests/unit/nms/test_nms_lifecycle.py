"""Life cycle of a replica: stopping never hangs on a task that lost its cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from cyphonic_nms.cluster import InProcessPresence
from cyphonic_nms.manager import NodeManager
from cyphonic_nms.routing import Endpoint
from cyphonic_nms.testing import DOMAIN, InProcessCluster, RecordingLink, add_node

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
    nms = NodeManager(nodes=cluster.store, pools=cluster.pools, replica_id="r1",
                      relay_secret=cluster.secret, presence=presence,
                      keepalive_interval_s=0.05, offline_timeout_s=30)
    await nms.start()
    await add_node(cluster.sessions, "a")
    await nms.register(RecordingLink(fqdn=f"a.{DOMAIN}"), local_addresses=[],
                       observed=E("198.51.100.1:443"))
    await asyncio.wait_for(presence.refreshing.wait(), 5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(10):
        await nms.stop()
    assert loop.time() - started < 2.0  # the loop noticed; no wait for the grace time
    assert not nms.connected
