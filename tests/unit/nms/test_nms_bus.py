"""The in-process replica bus: a message for a replica that is not there is not lost
silently (the requester must hear PEER_OFFLINE, not OK)."""

from __future__ import annotations

import pytest
from cyphonic.errors import PeerOffline
from cyphonic_nms.cluster import BusMessage, InProcessBus


async def test_publish_to_a_missing_replica_is_peer_offline() -> None:
    bus = InProcessBus()
    got: list[BusMessage] = []

    async def handler(message: BusMessage) -> None:
        got.append(message)

    await bus.subscribe("r1", handler)
    message = BusMessage(op="push", fqdn="a.cyphonic.internal", payload=b"x")
    await bus.publish("r1", message)
    assert got == [message]
    with pytest.raises(PeerOffline, match="r2"):
        await bus.publish("r2", message)
