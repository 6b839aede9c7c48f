"""Short-lived node certificates renewed in place, with real AS and NMS processes on loopback
(SQLite registry) and two real agents over fake TUNs.

The AS issues 45-second certificates here (``CYPHONIC_NODE_CERT_SECONDS``). While a tunnel
carries a packet every 50 ms from alice to bob, both agents renew at two thirds of the
lifetime with a new key: the tunnel keeps carrying every packet (the renewal gap is the
longest silence measured around it), the state directory holds the new pair, and a new
handshake presents the new certificate. With the AS gone, nothing can renew: at expiry the
agent stops with a clear ``expired`` error, and says so again at the next start.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cyphonic.config import ALPN_TUNNEL
from cyphonic.errors import CyphonicError, Expired
from cyphonic.pki import TrustStore, load_certificates, load_identity
from cyphonic.quic import QuicEndpoint
from cyphonic_agent.agent import Agent, AgentFailed
from cyphonic_agent.routes import RouteState
from cyphonic_testing.agent import (
    RunningAgent,
    fake_edges,
    udp_packet,
)
from cyphonic_testing.cloud import DOMAIN, LoopbackCloud, loopback_cloud

pytestmark = pytest.mark.timeout(300)


LIFETIME_S = 45
PING_S = 0.05
GAP_BOUND_S = 3.0  # generous under load; the printed figure is the measurement


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[LoopbackCloud]:
    async with loopback_cloud(
        tmp_path, as_env={"CYPHONIC_NODE_CERT_SECONDS": str(LIFETIME_S)}
    ) as world:
        yield world


async def _up(running: RunningAgent, peer: str) -> None:
    while True:
        route = running.agent.peers.routes.get(peer)
        if route is not None and route.state is RouteState.UP:
            return
        await asyncio.sleep(0.05)


async def test_certificates_renew_in_place_and_the_tunnel_keeps_passing_packets(
    cloud: LoopbackCloud,
) -> None:
    alice = await cloud.agent("alice")
    bob = await cloud.agent("bob")
    first = {r.agent.fqdn: r.agent.identity.cert for r in (alice, bob)}
    assert await alice.agent.peers.lookup(f"bob.{DOMAIN}") is not None
    await asyncio.wait_for(
        asyncio.gather(_up(alice, f"bob.{DOMAIN}"), _up(bob, f"alice.{DOMAIN}")), 60
    )
    alice_vip, bob_vip = alice.agent.snapshot().virtual_ipv4, bob.agent.snapshot().virtual_ipv4
    assert alice_vip is not None and bob_vip is not None
    tunnel_before = [c for c in bob.agent.endpoint.connections if not c.is_closed]  # type: ignore[union-attr]

    arrivals: list[float] = []
    sent = 0

    async def pinger() -> None:
        nonlocal sent
        while True:
            alice.tun.send_from_app(udp_packet(alice_vip, bob_vip, f"ping {sent}".encode()))
            sent += 1
            await asyncio.sleep(PING_S)

    async def receiver() -> None:
        while True:
            await bob.tun.delivered(within_s=60)
            arrivals.append(time.monotonic())

    tasks = [asyncio.create_task(pinger()), asyncio.create_task(receiver())]
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LIFETIME_S * 2
        while alice.agent.renewal.renewals < 1 or bob.agent.renewal.renewals < 1:
            assert loop.time() < deadline, "no renewal within the certificates' lifetime"
            await asyncio.sleep(0.1)
        renewed_at = time.monotonic()
        await asyncio.sleep(3.0)  # packets keep flowing after the renewal
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # Every packet passed, none waited long: the renewal gap.
    window = [t for t in arrivals if renewed_at - 10 <= t <= renewed_at + 3]
    gaps = [b - a for a, b in itertools.pairwise(window)]
    gap = max(gaps) if gaps else float("inf")
    took = [r.agent.renewal.last_renewal_s or 0.0 for r in (alice, bob)]
    print(
        f"\nrenewed ({LIFETIME_S}s certificates, at 2/3): alice in {took[0] * 1000:.0f} ms, "
        f"bob in {took[1] * 1000:.0f} ms; {len(arrivals)}/{sent} pings arrived, longest gap "
        f"around the renewal {gap * 1000:.0f} ms (one ping every {PING_S * 1000:.0f} ms)"
    )
    assert gap < GAP_BOUND_S
    assert len(arrivals) >= sent - 2  # the last ones may still be in flight when cancelled
    # The tunnel is the same connection: it was not dropped and made again.
    assert all(not c.is_closed for c in tunnel_before)

    for running in (alice, bob):
        agent = running.agent
        old, new = first[agent.fqdn], agent.identity.cert
        assert new.serial_number != old.serial_number
        assert new.public_key().public_numbers() != old.public_key().public_numbers()  # type: ignore[union-attr]
        assert new.not_valid_after_utc > old.not_valid_after_utc
        state_dir = agent.settings.state_dir
        on_disk = load_identity(state_dir / "node.crt", state_dir / "node.key")
        assert on_disk.cert.serial_number == new.serial_number
        assert agent.endpoint is not None and agent.endpoint.identity.cert == new

    # A new handshake with alice presents her new certificate (her agent then refuses us:
    # no route was directed, which does not matter here).
    seen: list[x509.Certificate] = []
    root = load_certificates(cloud.pki / "root-ca.crt")[0]
    node_ca = load_certificates(cloud.pki / "node-ca.crt")[0]
    carol_dir = await cloud.enrol("carol", state_dir=cloud.tmp / "c")
    carol = await QuicEndpoint.open(
        host="127.0.0.1",
        port=0,
        identity=load_identity(carol_dir / "node.crt", carol_dir / "node.key"),
        trust=TrustStore(root=root, node_ca=node_ca, is_revoked=lambda c: bool(seen.append(c))),
    )
    try:
        assert alice.agent.endpoint is not None
        with pytest.raises(CyphonicError):
            await carol.connect(
                alice.agent.endpoint.local_address,
                alpn=ALPN_TUNNEL,
                expect="node",
                expected_name=f"alice.{DOMAIN}",
                timeout=10,
            )
    finally:
        await carol.close()
    assert seen and seen[0].serial_number == alice.agent.identity.cert.serial_number


async def test_expiry_without_renewal_is_a_clear_error(tmp_path: Path) -> None:
    async with loopback_cloud(tmp_path, as_env={"CYPHONIC_NODE_CERT_SECONDS": "20"}) as world:
        alice = await world.agent("alice")
        assert world.auth.proc is not None
        world.auth.proc.send_signal(signal.SIGSTOP)  # no AS: nothing can renew
        assert alice._task is not None
        with pytest.raises(AgentFailed) as info:
            await asyncio.wait_for(alice._task, 60)
        world.agents.remove(alice)  # it stopped by itself
        assert isinstance(info.value.error, Expired)
        message = str(info.value)
        assert message.startswith("expired: the node certificate") and "enrol again" in message
        # The next start refuses at once, with the same message.
        again = Agent(alice.agent.settings, edges=fake_edges())
        with pytest.raises(AgentFailed, match="expired: the node certificate"):
            await asyncio.wait_for(again.run(asyncio.Event()), 10)
        print(f"\n{message}")
