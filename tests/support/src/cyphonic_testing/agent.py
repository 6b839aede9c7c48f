"""The real node agent (``cyphonic_agent.agent.Agent``) with fake edges: no root, no TUN.

- ``FakeTun``: a ``TunDevice`` over one end of a Unix datagram socket pair; the test holds
  the other end (``kernel``) and reads or writes IP packets there as the kernel would.
- ``FakeWatcher``: the netlink watcher, silent unless the test calls ``move()``.
- ``fake_edges()``: the real QUIC endpoint (loopback UDP) with the fakes above.

    agent = RunningAgent(settings, edges=fake_edges())
    await agent.start()                  # until its first registration brought the TUN up
    tun = agent.tun                      # FakeTun; tun.kernel is the test's side
    ...
    await agent.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cyphonic.quic import QuicEndpoint
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_agent.agent import Agent, AgentEdges
from cyphonic_agent.config import AgentSettings
from cyphonic_agent.enroll import enroll
from cyphonic_agent.mobility import HostPath, Move, MoveDetector, PathLost
from cyphonic_agent.overlay_routes import HostNetworks
from cyphonic_agent.tun import IpNetwork, TunConfig, TunDevice

from cyphonic_testing.processes import ServiceProcess, free_port

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FakeTun(TunDevice):
    """A TUN device without the kernel: packets the agent writes arrive at ``kernel``, and
    datagrams sent on ``kernel`` are read by the agent as packets from local applications.
    """

    def __init__(self, config: TunConfig) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        theirs.settimeout(10.0)
        self.kernel = theirs
        super().__init__(fd=ours.detach(), name=config.name, index=0, config=config)

    @classmethod
    def open(cls, config: TunConfig) -> FakeTun:
        return cls(config)

    def set_mtu(self, mtu: int) -> None:
        self.bufsize = mtu + 1

    def set_routes(self, routes: Iterable[IpNetwork]) -> None:
        self.routes = list(routes)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)
            self.kernel.close()

    def send_from_app(self, packet: bytes) -> None:
        """An application on this host sends ``packet`` into the overlay."""
        self.kernel.send(packet)

    async def delivered(self, *, within_s: float = 10.0) -> bytes:
        """The next packet the agent delivered to applications on this host."""
        loop = asyncio.get_running_loop()
        self.kernel.setblocking(False)
        return await asyncio.wait_for(loop.sock_recv(self.kernel, 65535), within_s)


@dataclass
class FakeWatcher:
    """The netlink watcher as the agent sees it; ``move()`` plays a host move."""

    on_move: Callable[[Move], Awaitable[None]]
    on_lost: Callable[[PathLost], None] = field(default=lambda _lost: None)
    exclude_ifindexes: Callable[[], Iterable[int]] = field(default=lambda: ())
    detector: MoveDetector = field(default_factory=MoveDetector)

    async def run(self) -> None:
        await asyncio.Event().wait()  # until cancelled

    async def move(self, old: HostPath, new: HostPath) -> None:
        self.detector.moves += 1
        await self.on_move(Move(old=old, new=new))


def fake_edges(
    addresses: Iterable[str] = ("127.0.0.1",), *, engine: str | None = None
) -> AgentEdges:
    """Real QUIC on loopback (``engine``: ``qh3`` or ``aioquic``, default the endpoint's);
    a fake TUN, watcher and address list; no TUN access check."""
    listed = [ipaddress.ip_address(a) for a in addresses]

    async def open_endpoint(**kwargs: Any) -> QuicEndpoint:
        return await QuicEndpoint.open(engine=engine, **kwargs)

    def host_addresses(**_kwargs: object) -> list[IPAddress]:
        return list(listed)

    return AgentEdges(
        open_endpoint=open_endpoint,
        check_tun=lambda: None,
        open_tun=FakeTun.open,
        watch_moves=FakeWatcher,
        host_addresses=host_addresses,
        link_mtus=list,  # no links known: the configured MTU
        host_networks=lambda **_kwargs: HostNetworks(),  # nothing overlaps the pool
    )


class RunningAgent:
    """An ``Agent`` in a task of the test's event loop. ``pushed`` records what the NMS
    pushed to it (observed on the way in; the agent handles every push as usual)."""

    def __init__(self, settings: AgentSettings, *, edges: AgentEdges | None = None) -> None:
        self.agent = Agent(settings, edges=edges or fake_edges())
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.pushed: list[pb.Envelope] = []
        self._pushed = asyncio.Event()
        handle = self.agent.nms.on_push

        def observe(message: pb.Envelope) -> None:
            self.pushed.append(message)
            self._pushed.set()
            handle(message)

        self.agent.nms.on_push = observe

    def of(self, body: str) -> list[pb.Envelope]:
        """Pushes of one kind (``route_direction``, ``peer_offline``...), oldest first."""
        return [e for e in self.pushed if e.WhichOneof("body") == body]

    async def wait_for(self, body: str, *, count: int = 1, within_s: float = 10.0) -> pb.Envelope:
        """Wait for the ``count``-th push of ``body``."""
        async with asyncio.timeout(within_s):
            while len(self.of(body)) < count:
                self._pushed.clear()
                await self._pushed.wait()
        return self.of(body)[count - 1]

    async def start(self, *, within_s: float = 30.0) -> None:
        """Run the agent until its first registration brought the overlay up."""
        self._task = asyncio.create_task(self.agent.run(self._stop))
        registered = asyncio.ensure_future(self.agent.registered.wait())
        done, _ = await asyncio.wait(
            {registered, self._task}, timeout=within_s, return_when=asyncio.FIRST_COMPLETED
        )
        registered.cancel()
        if self._task in done:
            self._task.result()  # raises why it stopped
            raise RuntimeError("the agent stopped before registering")
        if not done:
            raise TimeoutError(f"{self.agent.fqdn} did not register in {within_s} s")

    @property
    def tun(self) -> FakeTun:
        assert isinstance(self.agent.tun, FakeTun)
        return self.agent.tun

    @property
    def watcher(self) -> FakeWatcher:
        assert isinstance(self.agent.mobility, FakeWatcher)
        return self.agent.mobility

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 20)


def udp_packet(src: str, dst: str, payload: bytes, *, sport: int = 40000, dport: int = 9) -> bytes:
    """An IPv4 UDP packet (header checksum right, UDP checksum 0 = none)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0x4000,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    total = sum(struct.unpack("!10H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    checksum = struct.pack("!H", ~total & 0xFFFF)
    return header[:10] + checksum + header[12:] + udp


def as_process(
    *,
    tmp: Path,
    pki_dir: Path,
    database_url: str,
    domain: str,
    nms_endpoints: Iterable[str],
) -> ServiceProcess:
    """``cyphonic-as serve --migrate`` on loopback (QUIC on 127.0.0.1), for agents to enrol
    and log in; ``ready_marker`` is its ``as_serving`` line."""
    quic_port = free_port(socket.SOCK_DGRAM, host="127.0.0.1")
    return ServiceProcess(
        "cyphonic_auth.cli",
        command=["serve", "--migrate"],
        env={
            "CYPHONIC_DATABASE_URL": database_url,
            "CYPHONIC_PKI_DIR": str(pki_dir),
            "CYPHONIC_DOMAIN": domain,
            "CYPHONIC_QUIC_HOST": "127.0.0.1",
            "CYPHONIC_QUIC_PORT": str(quic_port),
            "CYPHONIC_NMS_ENDPOINTS": ",".join(nms_endpoints),
            "CYPHONIC_AS_ENDPOINTS": f"127.0.0.1:{quic_port}",
        },
        log_path=tmp / "as.log",
        ready_marker=b"as_serving",
    )


async def enrol(auth: ServiceProcess, *, name: str, pki_dir: Path, state_dir: Path) -> Path:
    """Create node ``name`` at the AS, issue a token and enrol with it as ``cyphonic-agent
    enroll`` does (key made here, CSR sent); the state directory."""
    async with auth.admin() as admin:
        (await admin.post("/v1/nodes", json={"name": name})).raise_for_status()
        issued = await admin.post(f"/v1/nodes/{name}/enrolment-tokens", json={"ttl_seconds": 600})
        issued.raise_for_status()
    pem = (pki_dir / "root-ca.crt").read_text()
    await enroll(
        as_url=auth.rest,
        token=issued.json()["token"],
        state_dir=state_dir,
        root_ca_sha256=hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest(),
    )
    return state_dir


def agent_settings(
    state_dir: Path, *, quic_host: str = "127.0.0.1", **extra: object
) -> AgentSettings:
    """Settings of an agent in a test: loopback UDP on any port, no DNS stub, status socket
    beside the state directory."""
    return AgentSettings(
        state_dir=state_dir,
        quic_host=quic_host,
        quic_port=0,
        dns_listen="off",
        status_socket=state_dir.parent / f"{state_dir.name}.sock",
        tun_name=f"fake-{state_dir.name}"[:15],
        **extra,  # type: ignore[arg-type]
    )
