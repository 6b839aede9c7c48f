"""The DNS stub over real UDP sockets on loopback, with a real (tiny) upstream resolver."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import cast

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from cyphonic.errors import PolicyDenied, Unavailable
from cyphonic_agent.dns import DnsStub, PeerAddresses

DOMAIN = "cyphonic.internal"
BOB = PeerAddresses(ipv4=ipaddress.IPv4Address("100.64.0.7"))

pytestmark = pytest.mark.timeout(30)


class Upstream(asyncio.DatagramProtocol):
    """A resolver on loopback: answers every A query with 192.0.2.1, optionally a wrong ID first."""

    def __init__(self, *, spoof_first: bool = False, silent: bool = False) -> None:
        self.received: list[bytes] = []
        self.spoof_first = spoof_first
        self.silent = silent
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        if self.silent or self.transport is None:
            return
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        name = query.question[0].name
        response.answer.append(dns.rrset.from_text(name, 300, "IN", "A", "192.0.2.1"))
        wire = response.to_wire()
        if self.spoof_first:
            bad = struct.pack("!H", (query.id + 1) & 0xFFFF) + wire[2:]
            bad_response = dns.message.from_wire(bad)
            bad_response.answer[0] = dns.rrset.from_text(name, 300, "IN", "A", "203.0.113.66")
            self.transport.sendto(bad_response.to_wire(), addr)
        self.transport.sendto(wire, addr)


async def start_upstream(**kwargs: bool) -> tuple[Upstream, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: Upstream(**kwargs), local_addr=("127.0.0.1", 0)
    )
    return proto, transport.get_extra_info("sockname")[:2]


def unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Hook:
    """The agent's lookup hook: records when it was called, answers after ``delay``."""

    def __init__(self, delay: float = 0.0, error: Exception | None = None) -> None:
        self.delay = delay
        self.error = error
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, fqdn: str) -> PeerAddresses | None:
        self.calls.append((fqdn, time.monotonic()))
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return BOB if fqdn == "bob.cyphonic.internal" else None


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, tuple[str, int]]]:
    proto, addr = await start_upstream()
    yield proto, addr
    assert proto.transport is not None
    proto.transport.close()


async def query(stub: DnsStub, name: str, rdtype: str = "A") -> dns.message.Message:
    host, port = stub.address
    q = dns.message.make_query(name, rdtype)
    return await dns.asyncquery.udp(q, host, port=port, timeout=5.0)


async def test_overlay_answer_and_hook(upstream: tuple[Upstream, tuple[str, int]]) -> None:
    hook = Hook(delay=0.05)
    stub = await DnsStub.start(
        listen=("127.0.0.1", 0), domain=DOMAIN, lookup=hook, upstreams=[upstream[1]]
    )
    try:
        before = time.monotonic()
        response = await query(stub, "bob.cyphonic.internal")
        assert response.rcode() == dns.rcode.NOERROR
        assert [rd.to_text() for rd in response.answer[0]] == ["100.64.0.7"]
        assert [c[0] for c in hook.calls] == ["bob.cyphonic.internal"]
        assert hook.calls[0][1] >= before  # the hook ran while the query waited
        nx = await query(stub, "carol.cyphonic.internal")
        assert nx.rcode() == dns.rcode.NXDOMAIN
        assert upstream[0].received == []  # nothing in the overlay domain leaks upstream
    finally:
        await stub.close()


async def test_forwarding_unchanged(upstream: tuple[Upstream, tuple[str, int]]) -> None:
    stub = await DnsStub.start(
        listen=("127.0.0.1", 0), domain=DOMAIN, lookup=Hook(), upstreams=[upstream[1]]
    )
    try:
        q = dns.message.make_query("www.example.com", "A")
        host, port = stub.address
        response = await dns.asyncquery.udp(q, host, port=port, timeout=5)
        assert [rd.to_text() for rd in response.answer[0]] == ["192.0.2.1"]
        assert upstream[0].received == [q.to_wire()]
        assert stub.stats["forwarded"] == 1
    finally:
        await stub.close()


async def test_spoofed_upstream_reply_ignored() -> None:
    proto, addr = await start_upstream(spoof_first=True)
    stub = await DnsStub.start(
        listen=("127.0.0.1", 0), domain=DOMAIN, lookup=Hook(), upstreams=[addr]
    )
    try:
        response = await query(stub, "www.example.com")
        assert [rd.to_text() for rd in response.answer[0]] == ["192.0.2.1"]
    finally:
        await stub.close()
        assert proto.transport is not None
        proto.transport.close()


async def test_dead_upstream_then_working_one(upstream: tuple[Upstream, tuple[str, int]]) -> None:
    dead = ("127.0.0.1", unused_udp_port())
    stub = await DnsStub.start(
        listen=("127.0.0.1", 0),
        domain=DOMAIN,
        lookup=Hook(),
        upstreams=[dead, upstream[1]],
        upstream_timeout=3.0,
    )
    try:
        start = time.monotonic()
        response = await query(stub, "www.example.com")
        assert [rd.to_text() for rd in response.answer[0]] == ["192.0.2.1"]
        # port unreachable fails over at once instead of waiting the 3 s timeout
        assert time.monotonic() - start < 2.0
    finally:
        await stub.close()


async def test_silent_upstream_gives_servfail() -> None:
    proto, addr = await start_upstream(silent=True)
    stub = await DnsStub.start(
        listen=("127.0.0.1", 0),
        domain=DOMAIN,
        lookup=Hook(),
        upstreams=[addr],
        upstream_timeout=0.3,
    )
    try:
        response = await query(stub, "www.example.com")
        assert response.rcode() == dns.rcode.SERVFAIL
        assert len(proto.received) == 1
    finally:
        await stub.close()
        assert proto.transport is not None
        proto.transport.close()


@pytest.mark.parametrize("hook", [Hook(delay=10.0), Hook(error=Unavailable("nms down"))])
async def test_lookup_failure_gives_servfail(hook: Hook) -> None:
    stub = await DnsStub.start(
        listen=("127.0.0.1", 0), domain=DOMAIN, lookup=hook, upstreams=[], lookup_timeout=0.3
    )
    try:
        start = time.monotonic()
        response = await query(stub, "bob.cyphonic.internal")
        assert response.rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - start < 3.0
        assert stub.stats["servfail"] == 1
    finally:
        await stub.close()


async def test_slow_lookup_does_not_block_others() -> None:
    class PerName(Hook):
        async def __call__(self, fqdn: str) -> PeerAddresses | None:
            self.calls.append((fqdn, time.monotonic()))
            await asyncio.sleep(1.0 if fqdn.startswith("slow") else 0)
            return BOB

    stub = await DnsStub.start(
        listen=("127.0.0.1", 0), domain=DOMAIN, lookup=PerName(), upstreams=[]
    )
    try:
        slow = asyncio.create_task(query(stub, "slow.cyphonic.internal"))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        fast = await query(stub, "fast.cyphonic.internal")
        assert time.monotonic() - start < 0.5
        assert fast.rcode() == dns.rcode.NOERROR
        assert (await slow).rcode() == dns.rcode.NOERROR
    finally:
        await stub.close()


async def test_garbage_over_udp_gets_formerr_and_stub_survives() -> None:
    stub = await DnsStub.start(listen=("127.0.0.1", 0), domain=DOMAIN, lookup=Hook(), upstreams=[])
    try:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect(stub.address)
            s.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0")
            reply = await asyncio.wait_for(loop.sock_recv(s, 512), 5)
            assert reply[:2] == b"\x12\x34" and reply[3] & 0xF == dns.rcode.FORMERR
            s.send(b"\x00")  # too short to answer: dropped, stub keeps running
        assert (await query(stub, "bob.cyphonic.internal")).rcode() == dns.rcode.NOERROR
        assert stub.stats["formerr"] == 1
    finally:
        await stub.close()


async def test_a_name_the_policy_forbids_is_nxdomain(
    upstream: tuple[Upstream, tuple[str, int]],
) -> None:
    """The NMS refuses the route with PolicyDenied: the stub answers NXDOMAIN (with the
    short-lived SOA), not SERVFAIL (which resolvers retry elsewhere) nor an address whose
    packets would vanish."""

    async def forbidden(fqdn: str) -> PeerAddresses | None:
        raise PolicyDenied(f"no rule lets this node reach {fqdn}")

    stub = await DnsStub.start(
        listen=("127.0.0.1", 0), domain=DOMAIN, lookup=forbidden, upstreams=[upstream[1]]
    )
    try:
        response = await query(stub, "secret.cyphonic.internal")
        assert response.rcode() == dns.rcode.NXDOMAIN
        assert response.authority and response.authority[0].rdtype == dns.rdatatype.SOA
        assert stub.stats["denied"] == 1 and stub.stats["servfail"] == 0
        assert upstream[0].received == []
    finally:
        await stub.close()
