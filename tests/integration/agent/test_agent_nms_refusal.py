"""The agent's NMS dial against an NMS endpoint that refuses handshakes as overloaded
(``cyphonic.quic.refusal``), over real UDP sockets on loopback: it passes to another
endpoint, or raises ``Overloaded`` with the retry-after at once, and its back-off waits at
least that long."""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cyphonic import pki
from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import Overloaded, Unavailable
from cyphonic.quic import QuicEndpoint
from cyphonic.session import SignallingSession
from cyphonic_agent.config import AgentSettings
from cyphonic_agent.control import Reconnect
from cyphonic_agent.nms import NmsClient, NmsLink
from cyphonic_agent.routes import Candidate

pytestmark = pytest.mark.timeout(60)

DOMAIN = "cyphonic.internal"
NMS_NAME = f"nms.svc.{DOMAIN}"


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiMaterial:
    return pki.init_pki(
        tmp_path_factory.mktemp("pki"), domain=DOMAIN, now=datetime.datetime.now(datetime.UTC)
    )


@pytest.fixture
async def opened() -> AsyncIterator[list[QuicEndpoint]]:
    endpoints: list[QuicEndpoint] = []
    try:
        yield endpoints
    finally:
        for endpoint in endpoints:
            await endpoint.close()


async def nms(material: pki.PkiMaterial, opened: list[QuicEndpoint], **kwargs: Any) -> Candidate:
    server = await QuicEndpoint.open(
        host="127.0.0.1",
        port=0,
        identity=material.services["nms"],
        trust=material.trust,
        accept={ALPN_SIGNALLING: SignallingSession.factory(None)},
        **kwargs,
    )
    opened.append(server)
    return Candidate("127.0.0.1", server.local_address[1])


async def agent(material: pki.PkiMaterial, opened: list[QuicEndpoint], tmp: Path) -> NmsClient:
    from cyphonic_testing.nms_client import issue_node_identity, nms_only_state

    fqdn = f"alice.{DOMAIN}"
    endpoint = await QuicEndpoint.open(
        host="127.0.0.1",
        port=0,
        identity=issue_node_identity(material.node_ca, fqdn),
        trust=material.trust,
    )
    opened.append(endpoint)
    state = nms_only_state(fqdn, "alice", DOMAIN)

    async def nothing(*_args: Any) -> Any:
        return []

    return NmsClient(
        settings=AgentSettings(state_dir=tmp, connect_timeout_s=5.0),
        state=state,
        fqdn=fqdn,
        domain=DOMAIN,
        endpoint=lambda: endpoint,
        on_push=lambda _envelope: None,
        on_registered=nothing,
        local_endpoints=nothing,
    )


async def test_a_refusing_nms_is_passed_over_then_reported_overloaded(
    material: pki.PkiMaterial, opened: list[QuicEndpoint], tmp_path: Path
) -> None:
    busy = await nms(material, opened, max_handshakes=0)  # every client refused
    live = await nms(material, opened)
    client = await agent(material, opened, tmp_path)

    # Busy first in the list: refused at once, the next endpoint serves.
    started = time.monotonic()
    session, where = await client.dial([busy, live], server_name=NMS_NAME, what="NMS")
    assert where == live and time.monotonic() - started < 2.0
    session.close()

    # Only the busy one: Overloaded with its retry-after, not the 5 s connect timeout.
    started = time.monotonic()
    with pytest.raises(Overloaded) as refused:
        await client.dial([busy], server_name=NMS_NAME, what="NMS")
    assert time.monotonic() - started < 2.0
    assert 0.25 <= refused.value.retry_after_s <= 10.0
    assert busy not in client._silent

    # The back-off waits at least the retry-after (stretched by the jitter).
    policy = Reconnect(max_delay_s=60.0, jitter=lambda low, _high: low)
    policy.registered()
    assert policy.lost(refused.value, now=0.0) >= refused.value.retry_after_s


async def test_an_nms_that_stops_answering_pings_is_dialled_last(
    material: pki.PkiMaterial, opened: list[QuicEndpoint], tmp_path: Path
) -> None:
    """A replica that died under its nodes: the next dial goes to another endpoint first
    (not the dead one's connect timeout, which would also use up the session ticket)."""
    dead = await nms(material, opened)
    live = await nms(material, opened)
    client = await agent(material, opened, tmp_path)
    session, where = await client.dial([dead, live], server_name=NMS_NAME, what="NMS")
    assert where == dead
    link = NmsLink(session=session, endpoint=dead, keepalive_s=1.0, ping=True)
    server = opened[0]
    server._loop.remove_reader(server._sock.fileno())  # the process froze: nothing answers
    with pytest.raises(Unavailable, match="stopped answering"):
        await client._keep_alive(link)
    started = time.monotonic()
    session, where = await client.dial([dead, live], server_name=NMS_NAME, what="NMS")
    assert where == live and time.monotonic() - started < 2.0
    session.close()


async def test_a_refusal_is_not_followed_by_a_dial_of_a_dead_replica(
    material: pki.PkiMaterial, opened: list[QuicEndpoint], tmp_path: Path
) -> None:
    """A dead replica's node refused by the busy survivor: ``Overloaded`` at once, not a
    dial of the dead replica (a connect timeout, and the session ticket used up there)."""
    dead = await nms(material, opened)
    busy = await nms(material, opened, max_handshakes=0)
    client = await agent(material, opened, tmp_path)
    session, _ = await client.dial([dead, busy], server_name=NMS_NAME, what="NMS")
    link = NmsLink(session=session, endpoint=dead, keepalive_s=1.0, ping=True)
    server = opened[0]
    server._loop.remove_reader(server._sock.fileno())  # SIGKILLed: nothing answers
    with pytest.raises(Unavailable, match="stopped answering"):
        await client._keep_alive(link)
    started = time.monotonic()
    with pytest.raises(Overloaded) as refused:
        await client.dial([dead, busy], server_name=NMS_NAME, what="NMS")
    assert time.monotonic() - started < 2.0
    assert str(dead) not in refused.value.message and str(busy) in refused.value.message
    # Nobody refused: the silent one is still dialled (it may be back).
    server._loop.add_reader(server._sock.fileno(), server._on_readable)
    session, where = await client.dial([dead], server_name=NMS_NAME, what="NMS")
    assert where == dead
    session.close()
