"""Two ``cyphonic-nms`` replicas given the same ``CYPHONIC_SESSION_TICKET_SECRET``: a node
whose replica went away resumes its TLS session at the other one (no certificates in that
handshake) and registers there as itself."""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from cyphonic.config import ALPN_SIGNALLING
from cyphonic.pki import PkiMaterial, init_pki
from cyphonic.registry import create_engine, make_sessionmaker
from cyphonic.session import SignallingSession
from cyphonic_testing.nms import DOMAIN, NmsProcess, add_node
from cyphonic_testing.nms_client import NmsProtocolClient, issue_node_identity

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(180)]

TOKEN = "nms-admin-token-for-resumption-tests"
RELAY_SECRET = "relay-secret-for-resumption-tests-0123"


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, PkiMaterial]]:
    base = tmp_path_factory.mktemp("nms-resumption")
    material = init_pki(base / "pki", domain=DOMAIN, now=datetime.datetime.now(datetime.UTC))
    yield base / "pki", material


async def test_a_node_resumes_at_the_other_replica_and_registers(
    pki_dir: tuple[Path, PkiMaterial], pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    path, material = pki_dir
    engine = create_engine(pg_url)
    try:
        await add_node(make_sessionmaker(engine), "alpha")
    finally:
        await engine.dispose()
    env = {
        "CYPHONIC_REDIS_PREFIX": f"t{secrets.token_hex(4)}:",
        "CYPHONIC_SESSION_TICKET_SECRET": secrets.token_urlsafe(36),
    }
    procs = [
        NmsProcess(
            pki_dir=path,
            database_url=pg_url,
            redis_url=redis_url,
            replica_id=f"nms-{i}",
            log_path=tmp_path / f"nms-{i}.log",
            admin_token=TOKEN,
            relay_secret=RELAY_SECRET,
            extra_env=env,
        )
        for i in (1, 2)
    ]
    node = NmsProtocolClient(
        identity=issue_node_identity(material.node_ca, f"alpha.{DOMAIN}"),
        trust=material.trust,
        nms=("127.0.0.1", 0),
        server_name=f"nms.svc.{DOMAIN}",
    )
    try:
        for proc in procs:
            await proc.start()
        nms1, nms2 = procs
        node.nms = ("127.0.0.1", nms1.quic_port)
        await node.connect()
        await node.register()
        assert node.session is not None and not node.session.connection.resumed

        assert nms1.stop() == 0  # the replica goes away; the node keeps its endpoint
        await node.wait_closed(within_s=10)
        assert node.endpoint is not None
        conn = await node.endpoint.connect(
            ("127.0.0.1", nms2.quic_port),
            alpn=ALPN_SIGNALLING,
            expect="service",
            expected_name=f"nms.svc.{DOMAIN}",
            handler_factory=SignallingSession.factory(node._on_message),
        )
        assert conn.resumed  # the ticket replica 1 issued, opened by replica 2
        assert conn.peer is not None and conn.peer.name == f"nms.svc.{DOMAIN}"
        assert isinstance(conn.handler, SignallingSession)
        node.session = conn.handler
        answer = await node.register()  # replica 2 knows the node by the ticket's identity
        assert answer.fqdn == f"alpha.{DOMAIN}"
    finally:
        await node.close()
        for proc in procs:
            proc.stop()
