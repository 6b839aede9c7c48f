"""The TRS replica on real UDP sockets (loopback) with the real Redis CID table.

Real aioquic endpoints play the two nodes; each uses only its TRS-issued CIDs, and every
packet of their end-to-end connection passes the TRS's socket unchanged. The TRS runs as
``cyphonic-trs serve`` does: its QUIC endpoint (trs.crt from a test PKI directory) with the
relay in the endpoint's drain loop. Control connections on that socket:
test_trs_pattern3.py.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived
from cyphonic.pki import init_pki
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_testing.trs import (
    TEST_SECRET,
    mint_token,
    random_cid,
    self_signed,
    short_packet,
    use_relay_cids,
)
from cyphonic_trs.api import create_app
from cyphonic_trs.config import TrsSettings
from cyphonic_trs.relay import Forward
from cyphonic_trs.service import TrsService
from cyphonic_trs.storage import RedisCidTable

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]  # a loaded 2-core machine is slow

A, B = "a.cyphonic.internal", "b.cyphonic.internal"
MARKER = b"CYPHONIC-MARKER-STRING-0042"
ALPN = "cyphonic-tun/1"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PKI_DIR: list[Path] = []  # the module's PKI directory (set by the fixture below)


@pytest.fixture(scope="module", autouse=True)
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """trs.crt/trs.key and the CA certificates, as ``cyphonic-as init-pki`` leaves them."""
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory, now=datetime.datetime.now(datetime.UTC))
    PKI_DIR.append(directory)
    yield directory
    PKI_DIR.remove(directory)


def settings(prefix: str, *, replica: int, port: int = 0, **extra: Any) -> TrsSettings:
    return TrsSettings(
        environment="test",
        quic_host="127.0.0.1",
        quic_port=port,
        replica_id=replica,
        redis_url=os.environ.get("CYPHONIC_TEST_REDIS", "redis://127.0.0.1:6379/0"),
        redis_prefix=prefix,
        relay_token_secret=TEST_SECRET.decode(),
        admin_token="admin-token-for-tests",
        cids_per_side=8,
        pki_dir=PKI_DIR[-1],
        **extra,
    )


@pytest.fixture
async def trs(redis_table: RedisCidTable, key_prefix: str) -> AsyncIterator[TrsService]:
    service = TrsService(settings(key_prefix, replica=7))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


class UdpPeer:
    """A plain UDP socket in the loop: what a node's socket looks like to the TRS."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.addr: tuple[str, int] = self.sock.getsockname()

    async def recv(self, within: float = 1.0) -> tuple[bytes, Any] | None:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recvfrom(self.sock, 65535), within)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


async def allocate(
    service: TrsService, token: bytes, fqdn: str, addr: Any, route_id: str = "r1"
) -> list[bytes]:
    assert service.allocation is not None
    answer = await service.allocation.allocate(
        pb.RelayAllocationRequest(allocation_token=token, route_id=route_id),
        fqdn=fqdn,
        is_node=True,
        addr=addr,
    )
    return list(answer.connection_ids)


async def test_forwarding_on_real_sockets_and_the_third_host(trs: TrsService) -> None:
    a, b, c = UdpPeer(), UdpPeer(), UdpPeer()
    try:
        token = mint_token(route_id="r1", a=A, b=B, now_ms=int(time.time() * 1000))
        cids_b = await allocate(trs, token, B, b.addr)
        cids_a = await allocate(trs, token, A, a.addr)
        trs_addr = ("127.0.0.1", trs.address[1])

        to_b = short_packet(cids_b[3], MARKER + os.urandom(40))
        a.sock.sendto(to_b, trs_addr)
        got = await b.recv()
        assert got is not None and got[0] == to_b and got[1][1] == trs_addr[1]
        to_a = short_packet(cids_a[0])
        b.sock.sendto(to_a, trs_addr)
        got = await a.recv()
        assert got is not None and got[0] == to_a

        # The third host knows a valid CID: not forwarded; a random CID: not relay traffic.
        c.sock.sendto(short_packet(cids_b[3]), trs_addr)
        c.sock.sendto(short_packet(random_cid()), trs_addr)
        assert await b.recv(within=0.3) is None
        assert await a.recv(within=0.1) is None
        totals = trs.totals()
        assert totals.forwarded_packets == 2 and totals.to_local_server == 1
        assert totals.drops[next(r for r in totals.drops if r.value == "spoofed_source")] == 1
    finally:
        for p in (a, b, c):
            p.close()


async def test_a_gro_train_is_forwarded_whole(trs: TrsService) -> None:
    """A node's GSO burst reaches the TRS as one UDP GRO train: one relay decision, one GSO
    send onwards, and the peer gets the same datagrams, unchanged and in order. A train
    with a foreign CID in it (or from the wrong source) is decided datagram by datagram."""
    a, b, c = UdpPeer(), UdpPeer(), UdpPeer()
    try:
        token = mint_token(route_id="r1", a=A, b=B, now_ms=int(time.time() * 1000))
        cids_b = await allocate(trs, token, B, b.addr)
        await allocate(trs, token, A, a.addr)
        trs_addr = ("127.0.0.1", trs.address[1])
        burst = [short_packet(cids_b[2], bytes([i]) * 1100) for i in range(12)]
        segment = [(socket.SOL_UDP, 103, (1 + 8 + 1100).to_bytes(2, sys.byteorder))]
        a.sock.sendmsg([b"".join(burst)], segment, 0, trs_addr)
        got = [await b.recv() for _ in burst]
        assert [g[0] if g else None for g in got] == burst
        assert trs.forwarder is not None and trs.forwarder.trains_forwarded == 1
        totals = trs.totals()
        assert totals.forwarded_packets == len(burst)

        # The third host sends a train with the same CID: refused as a whole, nothing sent.
        c.sock.sendmsg([b"".join(burst)], segment, 0, trs_addr)
        # A mixed train (a random CID in the middle) goes datagram by datagram.
        mixed = [*burst[:3], short_packet(random_cid(), bytes(1100)), *burst[4:6]]
        a.sock.sendmsg([b"".join(mixed)], segment, 0, trs_addr)
        got = [await b.recv() for _ in range(5)]
        assert [g[0] if g else None for g in got] == [*burst[:3], *burst[4:6]]
        assert await b.recv(within=0.3) is None
        assert trs.forwarder.trains_forwarded == 1
        totals = trs.totals()
        assert totals.forwarded_packets == len(burst) + 5
        assert totals.to_local_server >= 1
        assert totals.drops[next(r for r in totals.drops if r.value == "spoofed_source")] == 1
    finally:
        for p in (a, b, c):
            p.close()


async def test_admin_api_shows_the_session_and_replicas(trs: TrsService) -> None:
    a, b = UdpPeer(), UdpPeer()
    try:
        token = mint_token(route_id="r1", a=A, b=B, now_ms=int(time.time() * 1000))
        cids_b = await allocate(trs, token, B, b.addr)
        await allocate(trs, token, A, a.addr)
        packet = short_packet(cids_b[0])
        for _ in range(5):
            a.sock.sendto(packet, ("127.0.0.1", trs.address[1]))
            assert await b.recv() is not None
        app = create_app(trs)
        headers = {"Authorization": "Bearer admin-token-for-tests"}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://trs"
        ) as http:
            assert (await http.get("/v1/sessions")).status_code == 401
            page = (await http.get("/v1/sessions", headers=headers)).json()
            assert page["total"] == 1
            s = page["items"][0]
            assert s["pair"] == [A, B] and s["complete"] and s["packets"] == 5
            assert s["bytes"] == 5 * len(packet)
            assert s["sides"][0]["address"] == f"127.0.0.1:{a.addr[1]}"
            assert (await http.get("/v1/sessions/nope", headers=headers)).status_code == 404
            status = (await http.get("/v1/replica", headers=headers)).json()
            assert status["replica"] == 7 and status["forwarded_packets"] == 5
            assert status["allocations"] == {"ok": 2}
            replicas = (await http.get("/v1/replicas", headers=headers)).json()
            assert [r["replica_id"] for r in replicas] == ["trs-7"]
            assert replicas[0]["endpoints"] == [f"127.0.0.1:{trs.address[1]}"]
            metrics = (await http.get("/metrics")).text
            assert "cyphonic_trs_forwarded_packets_total 5.0" in metrics
            assert (await http.get("/readyz")).json() == {"status": "ready"}
            assert (await http.delete("/v1/sessions/r1", headers=headers)).status_code == 204
            assert (await http.get("/v1/sessions", headers=headers)).json()["total"] == 0
    finally:
        a.close()
        b.close()


async def test_idle_sessions_expire_here_and_in_redis(
    redis_table: RedisCidTable, key_prefix: str
) -> None:
    service = TrsService(settings(key_prefix, replica=3, idle_timeout_s=0.5, sync_interval_s=0.2))
    await service.start()
    try:
        token = mint_token(route_id="r1", a=A, b=B, now_ms=int(time.time() * 1000))
        cids = await allocate(service, token, A, ("127.0.0.1", 9))
        assert await redis_table.load_session("r1") is not None
        deadline = time.monotonic() + 5
        while await redis_table.load_session("r1") is not None:
            assert time.monotonic() < deadline, "idle session never expired"
            await asyncio.sleep(0.1)
        assert service.core is not None and "r1" not in service.core
        assert (
            await redis_table.reserve_cids(cids, route_id="other", fqdn=B, replica_id=3, ttl_s=5)
            == []
        )  # its CIDs were freed
    finally:
        await service.stop()


async def test_two_replicas_share_redis(redis_table: RedisCidTable, key_prefix: str) -> None:
    one = TrsService(settings(key_prefix, replica=1))
    two = TrsService(settings(key_prefix, replica=2))
    await one.start()
    await two.start()
    try:
        assert [r.replica for r in await redis_table.replicas()] == [1, 2]
        now = int(time.time() * 1000)
        token = mint_token(route_id="r1", a=A, b=B, now_ms=now)
        await allocate(one, token, A, ("127.0.0.1", 1000))
        # The other side went to the wrong replica: refused, nothing half-made there.
        assert two.allocation is not None
        answer = await two.allocation.handle(
            pb.Envelope(
                relay_allocation_request=pb.RelayAllocationRequest(
                    allocation_token=token, route_id="r1"
                )
            ),
            fqdn=B,
            is_node=True,
            addr=("127.0.0.1", 2000),
        )
        assert answer.error.code == pb.ERROR_CODE_UNAVAILABLE
        # A replay of A's use on the other replica is refused too.
        answer = await two.allocation.handle(
            pb.Envelope(
                relay_allocation_request=pb.RelayAllocationRequest(
                    allocation_token=token, route_id="r1"
                )
            ),
            fqdn=A,
            is_node=True,
            addr=("127.0.0.1", 1000),
        )
        assert answer.error.code == pb.ERROR_CODE_TOKEN_INVALID
        # Each replica's sessions are its own.
        token2 = mint_token(route_id="r2", a=A, b=B, now_ms=now)
        await allocate(two, token2, A, ("127.0.0.1", 1000), route_id="r2")
        assert [s.route_id for s in await redis_table.sessions_of_replica(1)] == ["r1"]
        assert [s.route_id for s in await redis_table.sessions_of_replica(2)] == ["r2"]
    finally:
        await one.stop()
        await two.stop()
    assert await redis_table.replicas() == []


# --- real QUIC through the relay ------------------------------------------------------


class EchoServer(QuicConnectionProtocol):
    """Node B's tunnel side: echoes every stream; uses B's TRS CIDs."""

    cids: list[bytes] = []

    def __init__(self, quic: Any, *args: Any, **kwargs: Any) -> None:
        use_relay_cids(quic, self.cids)
        super().__init__(quic, *args, **kwargs)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self._quic.send_stream_data(event.stream_id, event.data, end_stream=event.end_stream)
            self.transmit()


def client_protocol(own: list[bytes], peer_initial: bytes) -> Callable[..., Any]:
    class RelayedClient(QuicConnectionProtocol):
        def __init__(self, quic: Any, *args: Any, **kwargs: Any) -> None:
            use_relay_cids(quic, own, peer_initial=peer_initial)
            super().__init__(quic, *args, **kwargs)

    return RelayedClient


def spy_forwarded(service: TrsService) -> dict[str, Any]:
    """Count forwarded datagrams and those containing the marker in clear."""
    assert service.core is not None
    core = service.core
    original = core.datagram_received
    seen: dict[str, Any] = {"forwarded": 0, "marker": 0, "senders": set()}

    def spy(data: bytes, addr: Any, now: float) -> Any:
        action = original(data, addr, now)
        if isinstance(action, Forward):
            seen["forwarded"] += 1
            seen["senders"].add((addr[0], addr[1]))
            if MARKER in data:
                seen["marker"] += 1
        return action

    core.datagram_received = spy  # type: ignore[method-assign]
    return seen


async def echo(client: QuicConnectionProtocol, payload: bytes) -> bytes:
    reader, writer = await client.create_stream()
    writer.write(payload)
    writer.write_eof()
    return await reader.read()


async def relayed_pair(service: TrsService, route_id: str = "r1") -> tuple[QuicServer, Any, int]:
    """Node B listening, node A's CIDs allocated; (B's server, A's connect(), A's port)."""
    port_a = free_udp_port()
    cert, key = self_signed(B)
    server_cfg = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    server_cfg.certificate, server_cfg.private_key = cert, key
    server = await serve("127.0.0.1", 0, configuration=server_cfg, create_protocol=EchoServer)
    addr_b = server._transport.get_extra_info("sockname")
    token = mint_token(route_id=route_id, a=A, b=B, now_ms=int(time.time() * 1000))
    cids_b = await allocate(service, token, B, addr_b, route_id)
    EchoServer.cids = cids_b[1:]
    cids_a = await allocate(service, token, A, ("127.0.0.1", port_a), route_id)
    client_cfg = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], verify_mode=0, server_name=B
    )
    ctx = connect(
        "127.0.0.1",
        service.address[1],
        configuration=client_cfg,
        create_protocol=client_protocol(cids_a, cids_b[0]),
        local_port=port_a,
    )
    return server, ctx, port_a


FLOODER = """
import os, socket, sys, time
port, stolen, rate = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
sent, start = 0, time.monotonic()
while True:
    for i in range(100):
        cid = stolen if i % 2 else os.urandom(8)
        try:
            s.sendto(b"\\x40" + cid + os.urandom(40), ("127.0.0.1", port))
        except OSError:
            pass
    sent += 100
    ahead = sent / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
"""
FLOOD_PPS = 20_000


async def test_end_to_end_quic_through_the_relay_with_a_flood(trs: TrsService) -> None:
    seen = spy_forwarded(trs)
    server, ctx, _ = await relayed_pair(trs)
    flooder: asyncio.subprocess.Process | None = None
    try:
        async with ctx as client:
            payload = MARKER * (1_000_000 // len(MARKER))
            started = time.perf_counter()
            assert await echo(client, payload) == payload
            quiet_s = time.perf_counter() - started

            # The same transfer while a third host (another process) sends random CIDs and
            # a CID it stole from the relayed connection.
            stolen = EchoServer.cids[0]
            flooder = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                FLOODER,
                str(trs.address[1]),
                stolen.hex(),
                str(FLOOD_PPS),
                stdout=asyncio.subprocess.PIPE,
            )
            assert flooder.stdout is not None
            flood_port = int((await flooder.stdout.readline()).decode())
            await asyncio.sleep(0.2)
            before = trs.totals()
            started = time.perf_counter()
            assert await echo(client, payload) == payload
            flood_s = time.perf_counter() - started
            after = trs.totals()
        refused = sum(after.drops.values()) - sum(before.drops.values())
        local = after.to_local_server - before.to_local_server
        assert refused > 0 and local > 0
        assert ("127.0.0.1", flood_port) not in seen["senders"] and len(seen["senders"]) == 2
        assert seen["forwarded"] > 1000 and seen["marker"] == 0
        print(
            f"\n1 MB echoed through the relay: quiet {quiet_s:.3f}s; during a "
            f"{FLOOD_PPS} pps flood {flood_s:.3f}s ({refused} stolen-CID packets refused, "
            f"{local} random-CID packets left to the QUIC endpoint)"
        )
    finally:
        if flooder is not None:
            flooder.kill()
            await flooder.wait()
        server.close()


async def test_replica_restart_during_a_transfer_recovers_by_itself(
    redis_table: RedisCidTable, key_prefix: str
) -> None:
    port = free_udp_port()
    first = TrsService(settings(key_prefix, replica=4, port=port))
    await first.start()
    server, ctx, _ = await relayed_pair(first)
    second: TrsService | None = None
    try:
        async with ctx as client:
            payload = MARKER * 2000
            assert await echo(client, payload) == payload
            pending = asyncio.create_task(echo(client, payload * 10))
            await asyncio.sleep(0.05)
            await first.stop()  # the process goes away mid-transfer
            down_at = time.perf_counter()
            second = TrsService(settings(key_prefix, replica=4, port=port))
            await second.start()
            assert second.restored == 1  # reloaded from Redis, nothing rebuilt by hand
            assert await asyncio.wait_for(pending, 30) == payload * 10
            probe_started = time.perf_counter()
            assert await echo(client, b"after restart") == b"after restart"
            print(
                f"\nrestart: relay down for {probe_started - down_at:.3f}s until the "
                f"interrupted transfer completed"
            )
    finally:
        server.close()
        if second is not None:
            await second.stop()
