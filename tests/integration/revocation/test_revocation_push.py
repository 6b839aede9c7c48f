"""Revocation reaches every party fast, without waiting for a poll and without the NMS.

Real ``cyphonic-as``, ``cyphonic-nms`` and ``cyphonic-trs`` processes on loopback, the
embedded default (SQLite registry, no Redis), nodes enrolled over the AS's REST API:

- pushed: the NMS polls its registry and the TRS the AS's CRL only every 30 s here, yet
  both refuse a revoked certificate in the handshake within a second of the revoke call,
  because they follow the AS's revocation long-poll;
- without the NMS: two real agents (fake TUNs) hold a tunnel; the NMS is frozen (SIGSTOP:
  it can reach neither node), alice is revoked at the AS, and bob closes her tunnel on his
  own CRL refresh (from the AS over QUIC) within the refresh interval.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import Revoked
from cyphonic.pki import load_identity
from cyphonic.quic import QuicEndpoint
from cyphonic.session import SignallingSession
from cyphonic_agent.enroll import load_node_trust
from cyphonic_agent.routes import RouteState
from cyphonic_testing.agent import RunningAgent
from cyphonic_testing.cloud import DOMAIN, LoopbackCloud, loopback_cloud

pytestmark = pytest.mark.timeout(300)


SLOW_POLL_S = 30.0
CRL_REFRESH_S = 1.0
PUSH_BOUND_S = 5.0  # generous under load; the figure printed is the measurement
PEER_BOUND_S = CRL_REFRESH_S + 5.0


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[LoopbackCloud]:
    async with loopback_cloud(
        tmp_path,
        nms_env={"CYPHONIC_REVOCATION_POLL_S": str(SLOW_POLL_S)},
        trs_env={"CYPHONIC_REVOCATION_REFRESH_S": str(SLOW_POLL_S)},
        agent_defaults={"crl_refresh_s": CRL_REFRESH_S},
    ) as world:
        yield world


async def _refused_after(
    endpoint: QuicEndpoint, address: tuple[str, int], name: str, since: float
) -> float:
    """Dial ``address`` until the handshake is refused as Revoked; seconds since ``since``."""
    while True:
        try:
            conn = await endpoint.connect(
                address,
                alpn=ALPN_SIGNALLING,
                expect="service",
                expected_name=name,
                timeout=3,
                handler_factory=SignallingSession.factory(),
            )
        except Revoked:
            return time.monotonic() - since
        conn.close()
        await asyncio.sleep(0.02)


async def test_nms_and_trs_refuse_a_revoked_certificate_at_once(
    cloud: LoopbackCloud, tmp_path: Path
) -> None:
    state = await cloud.enrol("alice")
    alice = await QuicEndpoint.open(
        host="127.0.0.1",
        port=0,
        identity=load_identity(state / "node.crt", state / "node.key"),
        trust=load_node_trust(state),
    )
    try:
        nms = ("127.0.0.1", cloud.nms.quic_port)
        trs = ("127.0.0.1", cloud.trs_port)
        # Served before: both handshakes complete.
        for address, name in ((nms, f"nms.svc.{DOMAIN}"), (trs, f"trs.svc.{DOMAIN}")):
            conn = await alice.connect(
                address,
                alpn=ALPN_SIGNALLING,
                expect="service",
                expected_name=name,
                handler_factory=SignallingSession.factory(),
            )
            conn.close()
        await asyncio.sleep(1.0)  # the services' long-polls are waiting at the AS
        revoked_at = await cloud.revoke("alice")
        nms_s, trs_s = await asyncio.wait_for(
            asyncio.gather(
                _refused_after(alice, nms, f"nms.svc.{DOMAIN}", revoked_at),
                _refused_after(alice, trs, f"trs.svc.{DOMAIN}", revoked_at),
            ),
            SLOW_POLL_S,
        )
    finally:
        await alice.close()
    print(
        f"\nrevoked over REST; first refused handshake (Revoked) at the NMS after "
        f"{nms_s:.3f}s, at the TRS after {trs_s:.3f}s (their polls: every {SLOW_POLL_S:g}s)"
    )
    assert nms_s < PUSH_BOUND_S and trs_s < PUSH_BOUND_S


async def _up(running: RunningAgent, peer: str) -> None:
    while True:
        route = running.agent.peers.routes.get(peer)
        if route is not None and route.state is RouteState.UP:
            return
        await asyncio.sleep(0.05)


def _open_to(running: RunningAgent, fqdn: str) -> list[object]:
    endpoint = running.agent.endpoint
    assert endpoint is not None
    return [
        c
        for c in endpoint.connections
        if c.peer is not None and c.peer.name == fqdn and not c.is_closed
    ]


async def test_a_revoked_peer_is_cut_off_without_the_nms(cloud: LoopbackCloud) -> None:
    alice = await cloud.agent("alice")
    bob = await cloud.agent("bob")
    assert await alice.agent.peers.lookup(f"bob.{DOMAIN}") is not None
    await asyncio.wait_for(
        asyncio.gather(_up(alice, f"bob.{DOMAIN}"), _up(bob, f"alice.{DOMAIN}")), 60
    )
    assert _open_to(bob, f"alice.{DOMAIN}")
    await asyncio.sleep(2 * CRL_REFRESH_S)  # bob's CRL refreshes are under way

    assert cloud.nms.proc is not None
    cloud.nms.proc.send_signal(signal.SIGSTOP)  # the NMS can reach neither node now
    try:
        revoked_at = await cloud.revoke("alice")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PEER_BOUND_S + 10
        while _open_to(bob, f"alice.{DOMAIN}"):
            assert loop.time() < deadline, "bob kept alice's tunnel"
            await asyncio.sleep(0.02)
        closed_s = time.monotonic() - revoked_at
    finally:
        cloud.nms.proc.send_signal(signal.SIGCONT)
    print(
        f"\nNMS frozen; alice revoked at the AS; bob closed her tunnel after {closed_s:.3f}s "
        f"(CRL refresh every {CRL_REFRESH_S:g}s)"
    )
    assert closed_s < PEER_BOUND_S
    assert bob.agent.revocations.healthy
