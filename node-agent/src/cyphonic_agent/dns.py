"""DNS stub for the overlay domain: a sans-I/O core and its asyncio UDP glue.

Protocol flow::

    application --query--> host resolver --(overlay domain only)--> DnsStub
        name.<domain> A/AAAA : lookup hook (asks the NMS, starts route establishment)
                               -> the peer's virtual addresses, NXDOMAIN if unknown
                                  or if the access policy forbids it (docs/policy.md)
        other names          : forwarded unchanged to the upstream resolver(s)
        malformed            : FORMERR (never a crash); fewer than 12 bytes: dropped

The core (``classify``, ``overlay_response``, ``answer``) does no I/O and uses dnspython
only for the wire format. The lookup hook is async because it is where the agent triggers
route establishment: the tunnel is being built while the application gets its answer.
Answers for the overlay domain are authoritative (AA) and negative ones carry a synthetic
SOA so resolvers cache them only briefly (RFC 2308).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from cyphonic.errors import CyphonicError, PolicyDenied
from cyphonic.log import get_logger

DNS_HEADER_LEN = 12
DEFAULT_TTL = 60
"""Seconds resolvers may cache an overlay answer (virtual addresses do not change)."""
NEGATIVE_TTL = 5
"""Seconds resolvers may cache NXDOMAIN: short, so a newly enrolled node resolves soon."""
MAX_UDP_RESPONSE = 4096


@dataclass(frozen=True, slots=True)
class PeerAddresses:
    """A peer's virtual addresses, as the NMS gave them."""

    ipv4: ipaddress.IPv4Address | None = None
    ipv6: ipaddress.IPv6Address | None = None


Lookup = Callable[[str], PeerAddresses | None]
"""Synchronous lookup for the pure core: FQDN (lower case, no trailing dot) -> addresses."""
AsyncLookup = Callable[[str], Awaitable[PeerAddresses | None]]
"""The agent's hook: resolves the FQDN at the NMS and starts route establishment."""


@dataclass(frozen=True, slots=True)
class Forward:
    """Decision: send ``query`` unchanged to the upstream resolver."""

    query: bytes
    query_id: int


@dataclass(frozen=True, slots=True)
class OverlayQuestion:
    """Decision: a question about a name in the overlay domain that needs the lookup."""

    message: dns.message.Message
    fqdn: str
    """Lower case, without the trailing dot."""
    rdtype: int


Decision = bytes | Forward | OverlayQuestion | None
"""``bytes``: the response to send now; ``None``: send nothing."""


def classify(data: bytes, *, domain: str) -> Decision:
    """Decide what to do with one query datagram; never raises."""
    if len(data) < DNS_HEADER_LEN:
        return None  # not even a header to answer with
    flags = struct.unpack_from("!H", data, 2)[0]
    if flags & dns.flags.QR:
        return None  # a response sent to us; answering it could start a loop
    if dns.opcode.from_flags(flags) != dns.opcode.QUERY:
        return header_only_response(data, rcode=dns.rcode.NOTIMP)
    try:
        query = dns.message.from_wire(data)
    except Exception:  # any dnspython parse failure (FormError, BadEDNS, UnknownTSIGKey...)
        return header_only_response(data, rcode=dns.rcode.FORMERR)
    if len(query.question) != 1:
        return header_only_response(data, rcode=dns.rcode.FORMERR)
    question = query.question[0]
    zone = _zone_name(domain)
    if not question.name.is_subdomain(zone):
        return Forward(query=data, query_id=query.id)
    if question.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
        return _finish(_response(query), rcode=dns.rcode.REFUSED)
    if question.name == zone:
        return _apex_response(query, zone=zone, rdtype=question.rdtype)
    fqdn = question.name.to_text(omit_final_dot=True).lower()
    return OverlayQuestion(message=query, fqdn=fqdn, rdtype=question.rdtype)


def overlay_response(
    question: OverlayQuestion,
    addresses: PeerAddresses | None,
    *,
    domain: str,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """The authoritative answer for ``question`` given the lookup's result."""
    query = question.message
    response = _response(query)
    response.flags |= dns.flags.AA
    zone = _zone_name(domain)
    name = query.question[0].name
    if addresses is None:
        response.authority.append(_soa(zone))
        return _finish(response, rcode=dns.rcode.NXDOMAIN)
    rdtype = question.rdtype
    if rdtype in (dns.rdatatype.A, dns.rdatatype.ANY) and addresses.ipv4 is not None:
        response.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", str(addresses.ipv4)))
    if rdtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY) and addresses.ipv6 is not None:
        response.answer.append(dns.rrset.from_text(name, ttl, "IN", "AAAA", str(addresses.ipv6)))
    if not response.answer:
        response.authority.append(_soa(zone))  # NODATA: the name exists, not this type
    return _finish(response, rcode=dns.rcode.NOERROR)


def failure_response(question: OverlayQuestion) -> bytes:
    """SERVFAIL for a question whose lookup failed or timed out."""
    return _finish(_response(question.message), rcode=dns.rcode.SERVFAIL)


def answer(
    data: bytes, *, domain: str, lookup: Lookup, ttl: int = DEFAULT_TTL
) -> bytes | Forward | None:
    """Answer one query with a synchronous lookup (the pure core, for tests and tools)."""
    decision = classify(data, domain=domain)
    if isinstance(decision, OverlayQuestion):
        return overlay_response(decision, lookup(decision.fqdn), domain=domain, ttl=ttl)
    return decision


def header_only_response(query: bytes, *, rcode: int) -> bytes:
    """A response made of the query's header alone (ID, opcode, RD kept; no sections).

    Built by hand so it works for queries dnspython cannot parse.
    """
    (query_id, flags) = struct.unpack_from("!HH", query, 0)
    keep = flags & (0x7800 | dns.flags.RD)  # opcode bits and RD
    out_flags = dns.flags.QR | keep | dns.flags.RA | (rcode & 0xF)
    return struct.pack("!HHHHHH", query_id, out_flags, 0, 0, 0, 0)


def _zone_name(domain: str) -> dns.name.Name:
    return dns.name.from_text(domain.strip(".") + ".")


def _response(query: dns.message.Message) -> dns.message.Message:
    return dns.message.make_response(query, recursion_available=True)


def _finish(response: dns.message.Message, *, rcode: int) -> bytes:
    response.set_rcode(dns.rcode.Rcode(rcode))
    wire: bytes = response.to_wire(max_size=MAX_UDP_RESPONSE)
    return wire


def _soa(zone: dns.name.Name) -> dns.rrset.RRset:
    text = f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {NEGATIVE_TTL}"
    return dns.rrset.from_text(zone, NEGATIVE_TTL, "IN", "SOA", text)


def _apex_response(query: dns.message.Message, *, zone: dns.name.Name, rdtype: int) -> bytes:
    response = _response(query)
    response.flags |= dns.flags.AA
    if rdtype in (dns.rdatatype.SOA, dns.rdatatype.ANY):
        response.answer.append(_soa(zone))
    else:
        response.authority.append(_soa(zone))
    return _finish(response, rcode=dns.rcode.NOERROR)


# --- upstream configuration -------------------------------------------------------------


def upstreams_from_resolv_conf(
    path: Path = Path("/etc/resolv.conf"), *, exclude: Sequence[tuple[str, int]] = ()
) -> list[tuple[str, int]]:
    """The ``nameserver`` entries of a resolv.conf as (address, 53), minus ``exclude``.

    ``exclude`` holds the stub's own listening address(es) so it never forwards to itself.
    A missing or unreadable file gives an empty list.
    """
    try:
        text = path.read_text()
    except OSError:
        return []
    servers: list[tuple[str, int]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                addr = str(ipaddress.ip_address(fields[1].split("%")[0]))
            except ValueError:
                continue
            if (addr, 53) not in exclude and (addr, 53) not in servers:
                servers.append((addr, 53))
    return servers


# --- asyncio glue ------------------------------------------------------------------------


class DnsStub(asyncio.DatagramProtocol):
    """The DNS stub on a UDP socket: answers the overlay domain, forwards the rest.

    Start with ``await DnsStub.start(...)``; ``close()`` releases the socket and cancels
    queries in flight.
    """

    def __init__(
        self,
        *,
        domain: str,
        lookup: AsyncLookup,
        upstreams: Sequence[tuple[str, int]],
        upstream_timeout: float = 2.0,
        lookup_timeout: float = 3.0,
        ttl: int = DEFAULT_TTL,
    ) -> None:
        self.domain = domain
        self.lookup = lookup
        self.upstreams = list(upstreams)
        self.upstream_timeout = upstream_timeout
        self.lookup_timeout = lookup_timeout
        self.ttl = ttl
        self.stats = {
            "queries": 0,
            "overlay": 0,
            "forwarded": 0,
            "formerr": 0,
            "servfail": 0,
            "denied": 0,
        }
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = get_logger("agent.dns", domain=domain)

    @classmethod
    async def start(
        cls,
        *,
        listen: tuple[str, int] = ("127.0.0.1", 53),
        domain: str,
        lookup: AsyncLookup,
        upstreams: Sequence[tuple[str, int]] | None = None,
        **kwargs: Any,
    ) -> DnsStub:
        """Bind ``listen`` and serve; upstreams default to /etc/resolv.conf's servers."""
        if upstreams is None:
            upstreams = upstreams_from_resolv_conf(exclude=[listen])
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(
            lambda: cls(domain=domain, lookup=lookup, upstreams=upstreams, **kwargs),
            local_addr=listen,
        )
        return protocol

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        assert self._transport is not None
        sockname = self._transport.get_extra_info("sockname")
        return (sockname[0], sockname[1])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        self._log.info("dns stub listening", address=self.address, upstreams=self.upstreams)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.stats["queries"] += 1
        decision = classify(data, domain=self.domain)
        if decision is None:
            return
        if isinstance(decision, bytes):
            if decision[3] & 0xF == dns.rcode.FORMERR:
                self.stats["formerr"] += 1
            self._send(decision, addr)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(decision, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, decision: Forward | OverlayQuestion, addr: tuple[str, int]) -> None:
        if isinstance(decision, Forward):
            self.stats["forwarded"] += 1
            reply = await self._forward(decision)
            if reply is None:
                self.stats["servfail"] += 1
                reply = header_only_response(decision.query, rcode=dns.rcode.SERVFAIL)
            self._send(reply, addr)
            return
        self.stats["overlay"] += 1
        try:
            async with asyncio.timeout(self.lookup_timeout):
                addresses = await self.lookup(decision.fqdn)
        except PolicyDenied:
            # A name the access policy hides answers as if it did not exist (NXDOMAIN, the
            # short negative TTL): the application fails at once with "unknown host", learns
            # nothing about the node, and the resolver does not try another server with it.
            self.stats["denied"] += 1
            self._send(overlay_response(decision, None, domain=self.domain), addr)
            return
        except (TimeoutError, CyphonicError) as exc:
            self.stats["servfail"] += 1
            self._log.warning("overlay lookup failed", fqdn=decision.fqdn, error=repr(exc))
            self._send(failure_response(decision), addr)
            return
        response = overlay_response(decision, addresses, domain=self.domain, ttl=self.ttl)
        self._send(response, addr)

    async def _forward(self, decision: Forward) -> bytes | None:
        loop = asyncio.get_running_loop()
        for upstream in self.upstreams:
            future: asyncio.Future[bytes] = loop.create_future()
            try:
                # A fresh socket (random source port) per query, connected to the upstream so
                # only its answers arrive; the ID is checked too (RFC 5452).
                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(_UpstreamReply, future, decision.query_id),
                    remote_addr=upstream,
                )
            except OSError as exc:
                self._log.warning("upstream unreachable", upstream=upstream, error=str(exc))
                continue
            try:
                transport.sendto(decision.query)
                async with asyncio.timeout(self.upstream_timeout):
                    return await future
            except TimeoutError:
                self._log.warning("upstream timed out", upstream=upstream)
            except OSError as exc:
                self._log.warning("upstream refused", upstream=upstream, error=str(exc))
            finally:
                transport.close()
        return None

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(data, addr)

    async def close(self) -> None:
        """Stop serving: close the socket and cancel queries in flight."""
        if self._transport is not None:
            self._transport.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _UpstreamReply(asyncio.DatagramProtocol):
    def __init__(self, future: asyncio.Future[bytes], query_id: int) -> None:
        self.future = future
        self.query_id = query_id

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if (
            len(data) >= DNS_HEADER_LEN
            and struct.unpack_from("!H", data)[0] == self.query_id
            and data[2] & 0x80  # QR: a response
            and not self.future.done()
        ):
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from the upstream: try the next one now, not after a timeout.
        if not self.future.done():
            self.future.set_exception(exc)
