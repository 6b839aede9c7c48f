"""``cyphonic-nms serve`` as real processes on Postgres and Redis. Nodes are the real agent
with fake edges (``World.agent``, logging in at a ``cyphonic-as`` process that points it at
one replica) where a node only registers, asks for routes and receives directions, and
``NmsProtocolClient`` (``World.node``) where a test sends registrations the agent never
would (chosen addresses, a silent node, a revoked node registering again).

Loopback stands in for the Internet: a node that reports its own socket address is seen
unchanged (global IPv4, or IPv6 over ::1); a node that reports a private address other than
the one the NMS observes is seen as behind NAT.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, ip_address, ip_network
from pathlib import Path

import pytest
import redis.asyncio as redis_asyncio
from cyphonic.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Revoked,
    Unauthenticated,
)
from cyphonic.pki import PkiMaterial, init_pki
from cyphonic.registry import Node, create_engine, make_sessionmaker
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms.routing import Endpoint
from cyphonic_nms.trs_directory import RedisTrsDirectory, TrsReplica
from cyphonic_testing.agent import (
    RunningAgent,
    agent_settings,
    as_process,
    enrol,
    fake_edges,
    udp_packet,
)
from cyphonic_testing.nms import NmsProcess, add_node, revoke_node
from cyphonic_testing.nms_client import NmsProtocolClient, issue_node_identity
from cyphonic_testing.processes import ServiceProcess
from sqlalchemy import select

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(240)]

DOMAIN = "cyphonic.internal"
TOKEN = "nms-admin-token-for-integration-tests"
SECRET = "relay-secret-for-integration-tests-0123"


class World:
    """PKI, database, Redis and the NMS processes of one test."""

    def __init__(self, tmp: Path, pki: PkiMaterial, pg_url: str, redis_url: str) -> None:
        self.tmp = tmp
        self.pki = pki
        self.pg_url = pg_url
        self.redis_url = redis_url
        self.processes: list[NmsProcess] = []
        self.nodes: list[NmsProtocolClient] = []
        self.auth: dict[str, ServiceProcess] = {}
        self.agents: list[RunningAgent] = []

    async def nms(
        self, replica_id: str = "nms-1", *, redis: bool = True, env: dict[str, str] | None = None
    ) -> NmsProcess:
        proc = NmsProcess(
            extra_env=env,
            pki_dir=self.tmp / "pki",
            database_url=self.pg_url,
            admin_token=TOKEN,
            relay_secret=SECRET,
            redis_url=self.redis_url if redis else None,
            replica_id=replica_id,
            log_path=self.tmp / f"{replica_id}.log",
        )
        self.processes.append(proc)
        await proc.start()
        return proc

    async def enrol(self, name: str) -> None:
        engine = create_engine(self.pg_url)
        try:
            await add_node(make_sessionmaker(engine), name)
        finally:
            await engine.dispose()

    async def node(
        self, name: str, nms: NmsProcess, *, enrol: bool = True, ipv6: bool = False
    ) -> NmsProtocolClient:
        if enrol:
            await self.enrol(name)
        node = NmsProtocolClient(
            identity=issue_node_identity(self.pki.node_ca, f"{name}.{DOMAIN}"),
            trust=self.pki.trust,
            nms=("::1" if ipv6 else "127.0.0.1", nms.quic_port),
            server_name=f"nms.svc.{DOMAIN}",
            bind_host="::1" if ipv6 else "127.0.0.1",
        )
        self.nodes.append(node)
        await node.connect()
        return node

    async def agent(self, name: str, nms: NmsProcess) -> RunningAgent:
        """The real agent, enrolled and logged in at an AS that sends it to ``nms``,
        running with fake edges until its first registration brought its overlay up."""
        auth = self.auth.get(nms.replica_id)
        if auth is None:
            home = self.tmp / f"as-{nms.replica_id}"
            home.mkdir()
            auth = as_process(
                tmp=home,
                pki_dir=self.tmp / "pki",
                database_url=self.pg_url,
                domain=DOMAIN,
                nms_endpoints=[f"127.0.0.1:{nms.quic_port}"],
            )
            self.auth[nms.replica_id] = auth
            await auth.start()
        state = await enrol(
            auth, name=name, pki_dir=self.tmp / "pki", state_dir=self.tmp / "agents" / name
        )
        agent = RunningAgent(agent_settings(state), edges=fake_edges())
        self.agents.append(agent)
        await agent.start()
        return agent

    async def close(self) -> None:
        for agent in self.agents:
            await agent.stop()
        for node in self.nodes:
            await node.close()
        for proc in self.processes:
            proc.stop()
        for auth in self.auth.values():
            auth.stop()


@pytest.fixture(scope="module")
def pki_material(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, PkiMaterial]]:
    base = tmp_path_factory.mktemp("nms-world")
    material = init_pki(base / "pki", domain=DOMAIN, now=datetime.datetime.now(datetime.UTC))
    yield base, material


@pytest.fixture
async def world(
    pki_material: tuple[Path, PkiMaterial], pg_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[World]:
    base, material = pki_material
    (tmp_path / "pki").symlink_to(base / "pki")
    w = World(tmp_path, material, pg_url, redis_url)
    try:
        yield w
    finally:
        await w.close()


def _nat_report(node: NmsProtocolClient) -> list[Endpoint]:
    # What a node behind NAT reports: its private LAN address, not what the NMS will see.
    return [Endpoint(ip_address("192.168.77.10"), node.local.port)]


async def test_register_detects_nat_and_shows_in_admin_rest(world: World) -> None:
    nms = await world.nms()
    direct = await world.node("direct", nms)
    natted = await world.node("natted", nms)
    reg_direct = await direct.register()
    reg_nat = await natted.register(_nat_report(natted))
    assert reg_direct.fqdn == f"direct.{DOMAIN}"
    assert not reg_direct.network.behind_nat and reg_direct.network.has_ipv4
    assert reg_nat.network.behind_nat
    assert (ip_address(reg_nat.network.observed_ipv4.ip), reg_nat.network.observed_ipv4.port) == (
        ip_address("127.0.0.1"),
        natted.local.port,
    )
    assert IPv4Address(reg_direct.virtual_ipv4) in ip_network("100.64.0.0/16")
    assert reg_direct.virtual_ipv4_prefix_len == 16 and reg_direct.virtual_ipv6_prefix_len == 48
    assert reg_direct.virtual_ipv4 != reg_nat.virtual_ipv4
    assert reg_direct.keepalive_interval_ms == 1000
    assert (await direct.keepalive(5)).sequence == 5
    async with nms.admin() as admin:
        nodes = {n["fqdn"]: n for n in (await admin.get("/v1/nodes")).json()["items"]}
        assert nodes[f"natted.{DOMAIN}"]["network"]["behind_nat"] is True
        assert nodes[f"direct.{DOMAIN}"]["network"]["behind_nat"] is False
        assert nodes[f"direct.{DOMAIN}"]["online"] is True
        vip = str(IPv4Address(reg_direct.virtual_ipv4))
        assert nodes[f"direct.{DOMAIN}"]["virtual_ipv4"] == vip
        metrics = (await admin.get("/metrics")).text
        assert 'cyphonic_nms_registrations_total{outcome="ok"} 2.0' in metrics


async def test_unenrolled_node_and_service_certificate_are_refused(world: World) -> None:
    nms = await world.nms()
    stranger = await world.node("stranger", nms, enrol=False)
    with pytest.raises(PermissionDenied, match="not enrolled"):
        await stranger.register()
    # A service certificate (the AS's) is not a node: refused inside the handshake.
    service = NmsProtocolClient(
        identity=world.pki.services["as"],
        trust=world.pki.trust,
        nms=("127.0.0.1", nms.quic_port),
        server_name=f"nms.svc.{DOMAIN}",
    )
    world.nodes.append(service)
    with pytest.raises(Unauthenticated):
        await service.connect(timeout_s=5)


async def test_lease_stable_across_nms_restart(world: World) -> None:
    nms = await world.nms(redis=False)
    node = await world.node("stable", nms)
    first = await node.register()
    await node.close()
    assert nms.stop() == 0
    nms2 = await world.nms("nms-1-again", redis=False)
    node2 = await world.node("stable", nms2, enrol=False)
    second = await node2.register()
    assert (second.virtual_ipv4, second.virtual_ipv6) == (first.virtual_ipv4, first.virtual_ipv6)


KINDS = ("ipv6", "global_ipv4", "nat_ipv4")
EXPECTED = {
    ("ipv6", "ipv6"): 1,
    ("ipv6", "global_ipv4"): 3,
    ("ipv6", "nat_ipv4"): 3,
    ("global_ipv4", "ipv6"): 3,
    ("global_ipv4", "global_ipv4"): 1,
    ("global_ipv4", "nat_ipv4"): 2,
    ("nat_ipv4", "ipv6"): 3,
    ("nat_ipv4", "global_ipv4"): 2,
    ("nat_ipv4", "nat_ipv4"): 3,
}


async def test_route_pattern_for_each_cell_pushed_to_both(world: World) -> None:
    client = redis_asyncio.Redis.from_url(world.redis_url)
    try:
        await RedisTrsDirectory(client).register(
            TrsReplica(
                replica_id="trs-0",
                endpoints=(Endpoint.parse("127.0.0.1:4433"),),
                server_name=f"trs.svc.{DOMAIN}",
            ),
            ttl_s=600,
        )
    finally:
        await client.aclose()
    nms = await world.nms()
    nodes: dict[tuple[str, int], NmsProtocolClient] = {}
    for kind in KINDS:
        for i in (1, 2):
            node = await world.node(f"{kind.replace('_', '-')}-{i}", nms, ipv6=kind == "ipv6")
            await node.register(_nat_report(node) if kind == "nat_ipv4" else None)
            nodes[(kind, i)] = node
    pushes: dict[int, int] = {}
    for (ka, kb), pattern in EXPECTED.items():
        a, b = nodes[(ka, 1)], nodes[(kb, 2)]
        na, nb = pushes.get(id(a), 0) + 1, pushes.get(id(b), 0) + 1
        pushes[id(a)], pushes[id(b)] = na, nb
        response = await a.route(fqdn=f"{kb.replace('_', '-')}-2.{DOMAIN}")
        assert response.pattern == pattern, (ka, kb)
        da = (await a.wait_for("route_direction", count=na)).route_direction
        db = (await b.wait_for("route_direction", count=nb)).route_direction
        assert da.route_id == db.route_id == response.route_id
        assert {da.role, db.role} == {pb.ROUTE_ROLE_CONNECT, pb.ROUTE_ROLE_ACCEPT}
        if pattern == 2:  # the NATed side connects
            nat_side = da if ka == "nat_ipv4" else db
            assert nat_side.role == pb.ROUTE_ROLE_CONNECT and nat_side.peer_candidates
        if pattern == 3:
            assert da.relay.allocation_token == db.relay.allocation_token != b""
            assert da.relay.trs_server_name == f"trs.svc.{DOMAIN}"
    async with nms.admin() as admin:
        routes = (await admin.get("/v1/routes")).json()
    assert {r["pattern"] for r in routes["items"]} == {1, 2, 3}


async def test_cross_replica_push_between_two_processes(world: World) -> None:
    nms1 = await world.nms("nms-1")
    nms2 = await world.nms("nms-2")
    a = await world.agent("alpha", nms1)
    b = await world.agent("bravo", nms2)
    a_vip = a.agent.snapshot().virtual_ipv4
    b_vip = b.agent.snapshot().virtual_ipv4
    assert a_vip is not None and b_vip is not None
    # An application on bravo sends to alpha's virtual address: bravo asks by address.
    b.tun.send_from_app(udp_packet(b_vip, a_vip, b"to alpha"))
    pushed = (await a.wait_for("route_direction")).route_direction
    await b.wait_for("route_direction")  # bravo's own direction names its route to alpha
    by_vip = b.agent.peers.routes.get(f"alpha.{DOMAIN}")
    assert by_vip is not None
    assert by_vip.fqdn == f"alpha.{DOMAIN}" and by_vip.pattern == pb.ROUTE_PATTERN_DIRECT
    assert pushed.route_id == by_vip.route_id and pushed.peer_fqdn == f"bravo.{DOMAIN}"
    assert pushed.role == pb.ROUTE_ROLE_ACCEPT
    async with nms2.admin() as admin:
        text = (await admin.get("/metrics")).text
    assert 'cyphonic_nms_pushes_total{kind="route_direction",via="bus"} 1.0' in text
    # bravo leaves nms-2; alpha on nms-1 is told.
    await b.stop()
    notice = (await a.wait_for("peer_offline")).peer_offline
    assert notice.fqdn == f"bravo.{DOMAIN}" and notice.route_id == by_vip.route_id


async def test_silent_node_goes_offline(world: World) -> None:
    nms = await world.nms()
    a = await world.node("talker", nms)
    b = await world.node("sleeper", nms)
    await a.register()
    await b.register()
    await a.route(fqdn=f"sleeper.{DOMAIN}")

    async def keep_talking() -> None:
        for i in range(20):
            await a.keepalive(i)
            await asyncio.sleep(0.5)

    talking = asyncio.create_task(keep_talking())
    try:
        error = await b.wait_closed(within_s=10)  # QUIC idle timeout 4 s
        assert error is not None
        assert (await a.wait_for("peer_offline", within_s=5)).peer_offline.fqdn == (
            f"sleeper.{DOMAIN}"
        )
    finally:
        talking.cancel()
    async with nms.admin() as admin:
        view = (await admin.get(f"/v1/nodes/sleeper.{DOMAIN}")).json()
    assert view["online"] is False


async def test_quic_pings_keep_a_node_present_and_their_end_takes_it_offline(
    world: World,
) -> None:
    """Presence is the QUIC connection: PINGs alone (no Keepalive request, no stream) keep a
    node online past several offline timeouts; once they stop, the idle timeout (4 s here)
    takes it offline and its peer is told within that time."""
    nms = await world.nms()
    a = await world.node("watcher", nms)
    b = await world.node("pinger", nms)
    reg = await b.register()
    assert 0 < reg.ping_interval_ms <= 0.6 * 4000  # told to PING inside the idle timeout
    await a.register()
    await a.route(fqdn=f"pinger.{DOMAIN}")
    assert b.session is not None and a.session is not None

    async def ping(node: NmsProtocolClient, seconds: float) -> None:
        assert node.session is not None
        conn = node.session.connection
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while loop.time() < until:
            conn.quic.send_ping(1)
            conn.transmit()
            await asyncio.sleep(reg.ping_interval_ms / 1000)

    await asyncio.gather(ping(a, 10.0), ping(b, 10.0))  # 2.5 offline timeouts
    assert a.of("peer_offline") == []
    async with nms.admin() as admin:
        assert (await admin.get(f"/v1/nodes/pinger.{DOMAIN}")).json()["online"] is True
    # b goes silent (a process that vanished: no CONNECTION_CLOSE); a keeps pinging.
    started = asyncio.get_running_loop().time()
    watcher = asyncio.create_task(ping(a, 15.0))
    try:
        notice = (await a.wait_for("peer_offline", within_s=10)).peer_offline
    finally:
        watcher.cancel()
    took = asyncio.get_running_loop().time() - started
    assert notice.fqdn == f"pinger.{DOMAIN}"
    assert took < 4 + 2, f"peer_offline {took:.1f} s after the node went silent"
    async with nms.admin() as admin:
        assert (await admin.get(f"/v1/nodes/pinger.{DOMAIN}")).json()["online"] is False
        metrics = (await admin.get("/metrics")).text
    assert 'cyphonic_nms_offline_total{cause="timeout"} 1.0' in metrics


async def test_agent_keeps_its_nms_connection_with_quic_pings(world: World) -> None:
    """The real agent PINGs (no Keepalive request) at the interval the NMS tells, stays
    registered past several offline timeouts, and notices within one interval that its
    NMS vanished (SIGKILL: no CONNECTION_CLOSE)."""
    nms = await world.nms()
    running = await world.agent("pinging", nms)
    client = running.agent.nms
    link = client.link
    assert link is not None and link.ping
    assert 0 < link.keepalive_s <= 0.6 * 4  # inside the NMS's idle timeout (4 s here)
    await asyncio.sleep(10)  # 2.5 offline timeouts
    assert client.link is link and link.sequence == 0  # no Keepalive request was sent
    assert client.counters.registrations == 1 and client.counters.nms_losses == 0
    async with nms.admin() as admin:
        assert (await admin.get(f"/v1/nodes/pinging.{DOMAIN}")).json()["online"] is True
    assert nms.proc is not None
    nms.proc.kill()
    nms.proc.wait(timeout=10)
    started = asyncio.get_running_loop().time()
    for _ in range(int((link.keepalive_s + 3) * 10)):  # polled: the loss is a counter
        if client.counters.nms_losses:
            break
        await asyncio.sleep(0.1)
    assert client.counters.nms_losses == 1
    took = asyncio.get_running_loop().time() - started
    assert took <= link.keepalive_s + 1, f"the dead NMS noticed after {took:.1f} s"


async def test_agent_sends_keepalives_to_an_nms_that_does_not_ask_for_pings(
    world: World,
) -> None:
    """An NMS that tells no PING interval (an older one) gets Keepalive requests."""
    nms = await world.nms(env={"CYPHONIC_PING_INTERVAL_S": "0"})
    running = await world.agent("classic", nms)
    link = running.agent.nms.link
    assert link is not None and not link.ping
    await asyncio.sleep(6)  # offline timeout 4 s, Keepalive every second
    assert running.agent.nms.link is link and link.sequence >= 3
    assert running.agent.nms.counters.nms_losses == 0


async def test_revoked_node_cut_off(world: World) -> None:
    nms = await world.nms()
    victim = await world.node("victim", nms)
    await victim.register()
    serial = format(victim.identity.cert.serial_number, "x")
    engine = create_engine(world.pg_url)
    try:
        sessions = make_sessionmaker(engine)
        async with nms.admin() as admin:
            assert (await admin.get(f"/v1/nodes/victim.{DOMAIN}")).json()["online"]
        async with sessions() as s:
            node_id = await s.scalar(select(Node.id).where(Node.fqdn == f"victim.{DOMAIN}"))
        assert node_id is not None
        started = asyncio.get_running_loop().time()
        await revoke_node(sessions, node_id, serial=serial, reason="key_compromise")
    finally:
        await engine.dispose()
    error = await victim.wait_closed(within_s=10)
    took = asyncio.get_running_loop().time() - started
    assert took < 5.0, f"revoked node stayed connected {took:.1f} s"
    assert error is not None
    again = await world.node("victim", nms, enrol=False)
    with pytest.raises(Revoked):
        await again.register()


async def test_relay_cids_exchanged_between_replicas(world: World) -> None:
    """The CID_A / CID_B exchange through two NMS processes: each node's RelayCids reaches
    the other node (held by the other replica) as a push; outsiders are refused."""
    client = redis_asyncio.Redis.from_url(world.redis_url)
    try:
        await RedisTrsDirectory(client).register(
            TrsReplica(
                replica_id="trs-0",
                endpoints=(Endpoint.parse("127.0.0.1:4433"),),
                server_name=f"trs.svc.{DOMAIN}",
            ),
            ttl_s=600,
        )
    finally:
        await client.aclose()
    nms1 = await world.nms("nms-1")
    nms2 = await world.nms("nms-2")
    a = await world.node("relay-a", nms1)
    b = await world.node("relay-b", nms2)
    outsider = await world.node("relay-c", nms1)
    for node in (a, b, outsider):
        await node.register(_nat_report(node))
    route = await a.route(fqdn=f"relay-b.{DOMAIN}")
    assert route.pattern == pb.ROUTE_PATTERN_RELAY
    assert (await b.wait_for("route_direction")).route_direction.role == pb.ROUTE_ROLE_ACCEPT

    def relay_cids(cids: list[bytes], route_id: str = route.route_id) -> pb.Envelope:
        return pb.Envelope(
            version=pb.PROTOCOL_VERSION_1,
            relay_cids=pb.RelayCids(route_id=route_id, connection_ids=cids),
        )

    cid_b = [os.urandom(8) for _ in range(16)]
    echo = await b.request(relay_cids(cid_b))  # B (accepting side) first, as in the proposal
    assert list(echo.relay_cids.connection_ids) == cid_b
    pushed = (await a.wait_for("relay_cids")).relay_cids
    assert (pushed.route_id, list(pushed.connection_ids)) == (route.route_id, cid_b)
    cid_a = [os.urandom(8) for _ in range(16)]
    await a.request(relay_cids(cid_a))
    assert list((await b.wait_for("relay_cids")).relay_cids.connection_ids) == cid_a

    with pytest.raises(PermissionDenied, match="not a node of route"):
        await outsider.request(relay_cids(cid_a))
    with pytest.raises(NotFound):
        await b.request(relay_cids(cid_b, route_id="feedfacefeedface"))
    with pytest.raises(InvalidArgument):
        await b.request(relay_cids([b"short"]))
    assert outsider.of("relay_cids") == [] and len(a.of("relay_cids")) == 1
    async with nms1.admin() as admin:
        text = (await admin.get("/metrics")).text
    assert 'cyphonic_nms_pushes_total{kind="relay_cids",via="bus"} 1.0' in text


async def test_moved_node_rerouted_and_handover_shown(world: World) -> None:
    # "roamer" behind NAT connects to "home"; then it re-registers on the same connection as
    # a node with a global address (it moved): the NAT route (roamer connects) becomes a
    # direct one, pushed to both under a new route id; the admin view shows the handover.
    nms = await world.nms()
    home = await world.node("home", nms)
    roamer = await world.node("roamer", nms)
    await home.register()
    first_reg = await roamer.register(_nat_report(roamer))
    first = await roamer.route(fqdn=f"home.{DOMAIN}")
    assert first.pattern == pb.ROUTE_PATTERN_NAT_CONNECTS
    async with nms.admin() as admin:
        before = (await admin.get(f"/v1/nodes/roamer.{DOMAIN}")).json()
    assert before["last_handover"] is None and before["network"]["behind_nat"] is True

    moved_reg = await roamer.register()
    assert not moved_reg.network.behind_nat
    assert (moved_reg.virtual_ipv4, moved_reg.virtual_ipv6) == (
        first_reg.virtual_ipv4,
        first_reg.virtual_ipv6,
    )
    to_roamer = (await roamer.wait_for("route_direction", count=2)).route_direction
    to_home = (await home.wait_for("route_direction", count=2)).route_direction
    assert to_roamer.route_id == to_home.route_id != first.route_id
    assert to_roamer.pattern == to_home.pattern == pb.ROUTE_PATTERN_DIRECT
    async with nms.admin() as admin:
        after = (await admin.get(f"/v1/nodes/roamer.{DOMAIN}")).json()
        routes = (await admin.get("/v1/routes", params={"node": f"roamer.{DOMAIN}"})).json()
    handover = after["last_handover"]
    assert handover["old"]["behind_nat"] is True and handover["new"]["behind_nat"] is False
    assert handover["old"]["local_addresses"] == [f"192.168.77.10:{roamer.local.port}"]
    assert after["network"] == handover["new"]
    assert after["virtual_ipv4"] == before["virtual_ipv4"]
    assert [(r["route_id"], r["pattern"]) for r in routes["items"]] == [(to_home.route_id, 1)]
