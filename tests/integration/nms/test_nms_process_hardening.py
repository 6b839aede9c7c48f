"""``cyphonic-nms`` as real processes: secrets stay out of its output, a Redis that stops
answering does not hang it, and a replica shutting down does not tear down routes."""

from __future__ import annotations

import asyncio
import datetime
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cyphonic.config import ALPN_SIGNALLING
from cyphonic.pki import PkiMaterial, init_pki
from cyphonic.registry import create_engine, make_sessionmaker
from cyphonic.session import SignallingSession
from cyphonic_testing.nms import DOMAIN, NmsProcess, add_node, free_port
from cyphonic_testing.nms_client import NmsProtocolClient, issue_node_identity

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(180)]

TOKEN = "nms-admin-token-for-hardening-tests"
# Pub/sub channels are global to a Redis server: this run's own key prefix keeps parallel
# test runs (other checkouts) from talking to these processes.
ISOLATION = {"CYPHONIC_REDIS_PREFIX": f"t{secrets.token_hex(4)}:"}
RELAY_SECRET = "relay-secret-for-hardening-tests-0123"


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, PkiMaterial]]:
    base = tmp_path_factory.mktemp("nms-hardening")
    material = init_pki(base / "pki", domain=DOMAIN, now=datetime.datetime.now(datetime.UTC))
    yield base / "pki", material


def _with_password(url: str, password: str, *, user: str) -> str:
    """``scheme://user:password@rest`` from a URL without credentials."""
    scheme, rest = url.split("://", 1)
    rest = rest.split("@", 1)[-1]
    return f"{scheme}://{user}:{password}@{rest}"


def _cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cyphonic_nms.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- secrets


async def test_passwords_in_urls_never_reach_output(
    pki_dir: tuple[Path, PkiMaterial], pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    # Postgres trusts loopback and Redis's default user has no password, so both accept
    # these credentials: the NMS really runs with them.
    db = _with_password(pg_url, password, user="postgres")
    rds = _with_password(redis_url, password, user="default")
    env = {
        **os.environ,
        "CYPHONIC_ENVIRONMENT": "test",
        "CYPHONIC_DATABASE_URL": db,
        "CYPHONIC_REDIS_URL": rds,
        "CYPHONIC_RELAY_TOKEN_SECRET": RELAY_SECRET,
    }

    shown = _cli("settings", env=env)
    assert shown.returncode == 0, shown.stderr
    assert password not in shown.stdout + shown.stderr
    assert ":***@" in shown.stdout  # masked, not dropped

    bad = _cli("settings", env={**env, "CYPHONIC_KEEPALIVE_INTERVAL_S": "99"})
    assert bad.returncode == 2 and "keepalive" in bad.stderr
    assert password not in bad.stdout + bad.stderr

    nms = NmsProcess(
        pki_dir=pki_dir[0],
        database_url=db,
        redis_url=rds,
        replica_id="nms-s",
        log_path=tmp_path / "nms.log",
        admin_token=TOKEN,
        relay_secret=RELAY_SECRET,
        extra_env={**ISOLATION, "CYPHONIC_LOG_LEVEL": "debug"},
    )
    try:
        await nms.start()
        async with nms.admin() as admin:
            assert (await admin.get("/readyz")).status_code == 200
            replica = (await admin.get("/v1/replica")).text
        assert password not in replica
    finally:
        assert nms.stop() == 0
    log = nms.log_path.read_text()
    assert "nms_started" in log and password not in log

    # Unreachable services: the error names the URL, masked.
    closed = free_port(socket.SOCK_STREAM)
    down = _cli(
        "serve",
        env={**nms.env, "CYPHONIC_REDIS_URL": f"redis://default:{password}@127.0.0.1:{closed}/0"},
    )
    assert down.returncode == 1 and "unreachable" in down.stderr
    assert "default:***@" in down.stderr and password not in down.stdout + down.stderr
    no_db = f"postgresql+asyncpg://postgres:{password}@127.0.0.1:{closed}/x"
    for command in ("serve", "migrate"):
        failed = _cli(command, env={**nms.env, "CYPHONIC_DATABASE_URL": no_db})
        assert failed.returncode != 0
        assert password not in failed.stdout + failed.stderr, command


# --------------------------------------------------------------------------- Redis timeouts


@pytest.fixture
def silent_redis() -> Iterator[int]:
    """A TCP listener that accepts connections and never answers (a hung Redis)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield int(server.getsockname()[1])
    finally:
        server.close()


async def test_a_redis_that_never_answers_fails_start_within_the_timeout(
    pki_dir: tuple[Path, PkiMaterial], pg_url: str, silent_redis: int, tmp_path: Path
) -> None:
    nms = NmsProcess(
        pki_dir=pki_dir[0],
        database_url=pg_url,
        redis_url=f"redis://127.0.0.1:{silent_redis}/0",
        replica_id="nms-t",
        log_path=tmp_path / "nms.log",
        admin_token=TOKEN,
        relay_secret=RELAY_SECRET,
        extra_env={"CYPHONIC_REDIS_TIMEOUT_S": "1"},
    )
    started = time.monotonic()
    # Without a socket timeout the first PING waits forever.
    result = await asyncio.to_thread(_cli, "serve", env=nms.env, timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert "unreachable" in result.stderr
    assert took < 30, f"start-up took {took:.1f} s against a silent Redis"


async def test_redis_client_commands_are_bounded(silent_redis: int) -> None:
    from cyphonic.errors import Unavailable
    from cyphonic_nms.cluster import RedisPresence, redis_client

    client = redis_client(f"redis://127.0.0.1:{silent_redis}/0", timeout_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            async with asyncio.timeout(10):
                await RedisPresence(client).holder(f"a.{DOMAIN}")
        assert time.monotonic() - started < 5
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- rolling restart


async def test_sigterm_of_a_replica_leaves_routes_and_peers_alone(
    pki_dir: tuple[Path, PkiMaterial], pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    path, material = pki_dir
    engine = create_engine(pg_url)
    try:
        for name in ("alpha", "bravo"):
            await add_node(make_sessionmaker(engine), name)
    finally:
        await engine.dispose()
    procs = [
        NmsProcess(
            pki_dir=path,
            database_url=pg_url,
            redis_url=redis_url,
            replica_id=f"nms-{i}",
            log_path=tmp_path / f"nms-{i}.log",
            admin_token=TOKEN,
            relay_secret=RELAY_SECRET,
            extra_env=ISOLATION,
        )
        for i in (1, 2)
    ]
    nodes: list[NmsProtocolClient] = []

    async def node(name: str, nms: NmsProcess) -> NmsProtocolClient:
        sim = NmsProtocolClient(
            identity=issue_node_identity(material.node_ca, f"{name}.{DOMAIN}"),
            trust=material.trust,
            nms=("127.0.0.1", nms.quic_port),
            server_name=f"nms.svc.{DOMAIN}",
        )
        nodes.append(sim)
        await sim.connect()
        await sim.register()
        return sim

    try:
        for proc in procs:
            await proc.start()
        nms1, nms2 = procs
        alpha = await node("alpha", nms1)
        bravo = await node("bravo", nms2)
        route = await bravo.route(fqdn=f"alpha.{DOMAIN}")
        await alpha.wait_for("route_direction")

        assert nms1.stop() == 0  # SIGTERM: a rolling restart takes replica 1 down
        assert await alpha.wait_closed(within_s=10) is not None
        await asyncio.sleep(2.0)  # PeerOffline, if any, would have reached bravo by now
        assert bravo.of("peer_offline") == []
        async with nms2.admin() as admin:
            routes = (await admin.get("/v1/routes")).json()["items"]
            assert [r["route_id"] for r in routes] == [route.route_id]
            view = (await admin.get(f"/v1/nodes/alpha.{DOMAIN}")).json()
            assert view["online"] is False  # released: nobody holds it until it returns
        # alpha comes back through replica 2: the route is still there, bravo still quiet.
        await node("alpha", nms2)
        async with nms2.admin() as admin:
            routes = (await admin.get("/v1/routes")).json()["items"]
            assert [r["route_id"] for r in routes] == [route.route_id]
            assert (await admin.get(f"/v1/nodes/alpha.{DOMAIN}")).json()["online"] is True
        assert bravo.of("peer_offline") == []
        assert "draining" in nms1.log_path.read_text()
    finally:
        for sim in nodes:
            await sim.close()
        for proc in procs:
            proc.stop()


# --------------------------------------------------------------------------- resumption


async def test_a_node_resumes_at_the_other_replica_and_registers(
    pki_dir: tuple[Path, PkiMaterial], pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Two replicas given the same ``CYPHONIC_SESSION_TICKET_SECRET``: a node whose replica
    went away resumes its TLS session at the other one (no certificates in that handshake)
    and registers there as itself."""
    path, material = pki_dir
    engine = create_engine(pg_url)
    try:
        await add_node(make_sessionmaker(engine), "echo")
    finally:
        await engine.dispose()
    env = {**ISOLATION, "CYPHONIC_SESSION_TICKET_SECRET": secrets.token_urlsafe(36)}
    procs = [
        NmsProcess(
            pki_dir=path,
            database_url=pg_url,
            redis_url=redis_url,
            replica_id=name,
            log_path=tmp_path / f"{name}.log",
            admin_token=TOKEN,
            relay_secret=RELAY_SECRET,
            extra_env=env,
        )
        for name in ("nms-1", "nms-2")
    ]
    node = NmsProtocolClient(
        identity=issue_node_identity(material.node_ca, f"echo.{DOMAIN}"),
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
        assert answer.fqdn == f"echo.{DOMAIN}"
    finally:
        await node.close()
        for proc in procs:
            proc.stop()
