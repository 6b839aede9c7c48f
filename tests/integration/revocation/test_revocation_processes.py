"""Revocation in the TLS handshake, end to end with real processes on loopback.

``cyphonic-as serve`` (registry on SQLite and on PostgreSQL) and ``cyphonic-trs serve``
(fetching the AS's CRL) run as processes; two nodes enrol with the AS over REST as the
agent does. Node alice holds a TRS control connection and a tunnel to node bob, whose
endpoint checks revocation with the node's revocation cache (the AS's CRL). An admin
revokes alice over the AS admin REST; within a few seconds the TRS and bob close alice's
open connections and refuse new ones in the handshake, while bob is still served.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aioquic.quic.events import QuicEvent
from cyphonic.config import ALPN_SIGNALLING, ALPN_TUNNEL
from cyphonic.errors import CyphonicError, Revoked
from cyphonic.pki import load_identity
from cyphonic.quic import Acceptor, Connection, QuicEndpoint
from cyphonic.revocation import close_revoked_on
from cyphonic.session import SignallingSession
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_agent.enroll import enroll, load_node_trust, node_revocation_cache
from cyphonic_testing.processes import CliService as Service
from cyphonic_testing.processes import start_cli_service

pytestmark = pytest.mark.timeout(240)

BIN = Path(sys.executable).parent
ADMIN_TOKEN = "revocation-e2e-admin-token-0123456789"
RELAY_SECRET = "revocation-e2e-relay-secret-0123456789"
DOMAIN = "cyphonic.internal"
TRS_NAME = f"trs.svc.{DOMAIN}"
REFRESH_S = 0.5
WITHIN_S = 5.0  # "within a few seconds" of the revocation


@dataclass
class Services:
    auth: Service
    trs: Service

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def services(registry_url: str, tmp_path: Path) -> Iterator[Services]:
    pki = tmp_path / "pki"
    subprocess.run(
        [BIN / "cyphonic-as", "init-pki", "--pki-dir", str(pki)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    common = {"CYPHONIC_PKI_DIR": str(pki), "CYPHONIC_ADMIN_TOKEN": ADMIN_TOKEN}
    auth = start_cli_service(
        "as", ["--migrate"], env={**common, "CYPHONIC_DATABASE_URL": registry_url}, tmp=tmp_path
    )
    started = [auth]
    try:
        trs = start_cli_service(
            "trs",
            ["--as-url", auth.url],
            env={
                **common,
                "CYPHONIC_RELAY_TOKEN_SECRET": RELAY_SECRET,
                "CYPHONIC_REVOCATION_REFRESH_S": str(REFRESH_S),
            },
            tmp=tmp_path,
        )
        started.append(trs)
        yield Services(auth=auth, trs=trs)
        for service in reversed(started):
            assert service.stop() == 0, service.log.read_text()
    finally:
        for service in reversed(started):
            service.stop()


class Quiet:
    """A connection handler that takes no requests (the tunnel's side in this test)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def quic_event_received(self, event: QuicEvent) -> None:
        return None

    def connection_lost(self, error: CyphonicError | None) -> None:
        return None


async def _enrolled(
    http: httpx.AsyncClient, services: Services, name: str, state_dir: Path
) -> None:
    assert (await http.post("/v1/nodes", json={"name": name})).status_code == 201
    token = (await http.post(f"/v1/nodes/{name}/enrolment-tokens", json={})).json()["token"]
    await enroll(as_url=services.auth.url, token=token, state_dir=state_dir)


async def _wait_closed(conn: Connection, since: float) -> float:
    await asyncio.wait_for(conn.wait_closed(), WITHIN_S * 2)
    return time.monotonic() - since


async def test_revoked_node_is_refused_by_the_trs_and_by_a_peer(
    services: Services,
    tmp_path: Path,
) -> None:
    alice_dir, bob_dir = tmp_path / "alice", tmp_path / "bob"
    async with httpx.AsyncClient(
        base_url=services.auth.url, headers=services.admin, timeout=10
    ) as http:
        await _enrolled(http, services, "alice", alice_dir)
        await _enrolled(http, services, "bob", bob_dir)
    trs_addr = ("127.0.0.1", services.trs.quic_port)

    bob_cache = node_revocation_cache(bob_dir, interval=REFRESH_S)
    await bob_cache.start()
    assert bob_cache.healthy  # bob fetched and checked the AS's signed CRL
    bob = await QuicEndpoint.open(
        host="127.0.0.1",
        port=0,
        identity=load_identity(bob_dir / "node.crt", bob_dir / "node.key"),
        trust=load_node_trust(bob_dir, is_revoked=bob_cache.is_revoked),
        accept={ALPN_TUNNEL: Acceptor(handler_factory=Quiet, expect="node")},
    )
    bob_cache.subscribe(close_revoked_on(bob, bob_cache))
    alice = await QuicEndpoint.open(
        host="127.0.0.1",
        port=0,
        identity=load_identity(alice_dir / "node.crt", alice_dir / "node.key"),
        trust=load_node_trust(alice_dir),
    )
    try:
        control = await alice.connect(
            trs_addr,
            alpn=ALPN_SIGNALLING,
            expect="service",
            expected_name=TRS_NAME,
            handler_factory=SignallingSession.factory(),
        )
        assert isinstance(control.handler, SignallingSession)
        ack = await control.handler.request(pb.Keepalive(sequence=1))
        assert ack.keepalive_ack.sequence == 1
        tunnel = await alice.connect(
            bob.local_address,
            alpn=ALPN_TUNNEL,
            expect="node",
            expected_name=f"bob.{DOMAIN}",
            handler_factory=Quiet,
        )
        assert tunnel.is_ready

        async with httpx.AsyncClient(
            base_url=services.auth.url, headers=services.admin, timeout=10
        ) as http:
            revoked_at = time.monotonic()
            response = await http.post("/v1/nodes/alice/revoke", json={"reason": "key_compromise"})
            assert response.status_code == 200, response.text

        # Both close what alice has open, each on its own refresh...
        trs_closed_s, peer_closed_s = await asyncio.gather(
            _wait_closed(control, revoked_at), _wait_closed(tunnel, revoked_at)
        )
        # ...and refuse her in the handshake from then on (typed: Revoked).
        with pytest.raises(Revoked):
            await alice.connect(
                trs_addr, alpn=ALPN_SIGNALLING, expect="service", expected_name=TRS_NAME, timeout=5
            )
        with pytest.raises(Revoked):
            await alice.connect(
                bob.local_address,
                alpn=ALPN_TUNNEL,
                expect="node",
                expected_name=f"bob.{DOMAIN}",
                timeout=5,
            )
        refused_s = time.monotonic() - revoked_at
        assert trs_closed_s < WITHIN_S and peer_closed_s < WITHIN_S
        assert refused_s < WITHIN_S + 2

        # Bob is not affected: the TRS still serves him.
        bob_control = await bob.connect(
            trs_addr,
            alpn=ALPN_SIGNALLING,
            expect="service",
            expected_name=TRS_NAME,
            handler_factory=SignallingSession.factory(),
        )
        assert isinstance(bob_control.handler, SignallingSession)
        ack = await bob_control.handler.request(pb.Keepalive(sequence=2))
        assert ack.keepalive_ack.sequence == 2
        trs_log = services.trs.log.read_text()
        assert "connection_closed_revoked" in trs_log and "revocation_not_checked" not in trs_log
        print(
            f"\nrevoked over REST; TRS closed alice's control connection after "
            f"{trs_closed_s:.2f}s, bob closed her tunnel after {peer_closed_s:.2f}s "
            f"(refresh every {REFRESH_S}s); both refusals in the handshake done "
            f"{refused_s:.2f}s after the revocation"
        )
    finally:
        await alice.close()
        await bob.close()
        await bob_cache.close()
