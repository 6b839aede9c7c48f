"""The TCP 443 transport, asyncio glue: QUIC datagrams framed over TLS 1.3 streams.

docs/tcp-transport.md is the protocol page; ``stream_framing`` the framing core and
``path_choice`` the UDP-or-TCP decisions. Here only I/O:

* ``TcpListener`` (every service): TLS 1.3 on the TCP port of the same number as the UDP
  one. Each accepted stream gets a *stream address* (``100::<serial>``, the discard prefix
  of RFC 6666, never a real peer) that stands for it in the service's one QUIC endpoint:
  datagrams read from the stream enter the endpoint as if from that address; datagrams the
  endpoint sends there (the endpoint's ``send_hook``) are framed onto the stream. The TRS's
  relay forwards to and from stream addresses unchanged (``send``).
* ``StreamPaths`` (the agent): the client side. Its endpoint keeps using the service's
  real address; while a stream carries that address, datagrams to it are framed onto the
  stream and datagrams read from it enter the endpoint as from that address. So QUIC on
  the node never sees a path change, and moving back to UDP is a path change on the
  service's side only (validated there, no new handshake).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization

from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import CyphonicError, InvalidArgument, Timeout, Unavailable
from cyphonic.log import get_logger
from cyphonic.pki import CertifiedKey, TrustStore
from cyphonic.quic.endpoint import Address, Connection, QuicEndpoint
from cyphonic.quic.path_choice import PathChoice
from cyphonic.quic.stream_framing import (
    PREFACE_SIZE,
    VERSION,
    FrameDecoder,
    VersionMismatch,
    encode_frames,
    encode_preface,
    parse_preface,
)
from cyphonic.stream_address import is_stream_host, stream_address

__all__ = [
    "STREAM_ALPN",
    "HttpsProxy",
    "StreamPaths",
    "TcpListener",
    "is_stream_host",
    "open_stream",
    "start_tcp_listener",
]

STREAM_ALPN = "cyphonic-tcp/1"
"""ALPN of the outer TLS connection."""
PROBE_ALPN = "cyphonic-probe/1"
"""ALPN of a UDP probe: no service accepts it, so any answer (the refusal) proves UDP."""
_READ_SIZE = 256 * 1024
_WRITE_BUFFER_LIMIT = 2 * 1024 * 1024
"""Bytes queued on a stream beyond which datagrams are dropped (as a full UDP socket
buffer drops them; QUIC's loss recovery and congestion control take it from there)."""
_PREFACE_TIMEOUT_S = 10.0
_RECORD_MAX = 32
"""Datagrams of a racing connection kept for replay on the stream (its first flights)."""


def _log() -> Any:
    return get_logger("tcp443")


class _Outbox:
    """Frames queued for one stream, written once per loop iteration."""

    __slots__ = ("_loop", "_pending", "_scheduled", "dropped", "sent", "transport")

    def __init__(self, transport: asyncio.BaseTransport, loop: asyncio.AbstractEventLoop):
        self.transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False
        self.dropped = 0
        self.sent = 0

    def send(self, datagram: bytes) -> None:
        self._pending.append(datagram)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        transport = self.transport
        if not pending or transport.is_closing():
            return
        assert isinstance(transport, asyncio.WriteTransport)
        if transport.get_write_buffer_size() > _WRITE_BUFFER_LIMIT:
            self.dropped += len(pending)
            return
        try:
            transport.write(encode_frames(pending))
            self.sent += len(pending)
        except ValueError:  # a datagram too large for a frame: count, never raise
            self.dropped += len(pending)


# ---------------------------------------------------------------------------------- server


def server_tls_context(identity: CertifiedKey) -> ssl.SSLContext:
    """TLS 1.3 only, the service's own certificate chain, ALPN ``cyphonic-tcp/1``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([STREAM_ALPN])
    pem_chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in identity.full_chain)
    pem_key = identity.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # ssl loads a chain only from files: a private directory, removed at once.
    with tempfile.TemporaryDirectory(prefix="cyphonic-tls-") as tmp:
        cert_path, key_path = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem_key)
        with open(cert_path, "wb") as f:
            f.write(pem_chain)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


@dataclass
class ListenerStats:
    streams_accepted: int = 0
    streams_refused: int = 0
    """Closed for a bad preface, another version, a malformed frame, or too many."""
    datagrams_in: int = 0
    datagrams_out: int = 0
    datagrams_dropped: int = 0


class TcpListener:
    """TLS 1.3 on TCP for one service endpoint (see the module docstring)."""

    def __init__(
        self,
        endpoint: QuicEndpoint,
        identity: CertifiedKey,
        *,
        max_streams: int = 4096,
        idle_timeout: float = 120.0,
    ) -> None:
        self.endpoint = endpoint
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self._ctx = server_tls_context(identity)
        self._ipv6 = ":" in endpoint.local_address[0]
        self._serial = itertools.count(1)
        self.streams: dict[Any, _Outbox] = {}
        """Stream address -> its outbox (what ``send`` and the endpoint hook write to)."""
        self.stats = ListenerStats()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        endpoint.send_hook = self.divert

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host``:``port`` (``::`` dual-stack)."""
        self._server = await asyncio.start_server(
            self._serve,
            host=None if host in ("::", "0.0.0.0", "") else host,
            port=port,
            ssl=self._ctx,
            reuse_address=True,
            ssl_handshake_timeout=_PREFACE_TIMEOUT_S,
            limit=_READ_SIZE,
        )
        _log().info("tcp_listening", port=self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        self.streams.clear()

    def divert(
        self, conn: Connection | None, datagrams: list[tuple[bytes, Address]]
    ) -> list[tuple[bytes, Address]]:
        """The endpoint's ``send_hook``: datagrams to a stream address go onto it."""
        streams = self.streams
        if not streams:
            return datagrams
        rest: list[tuple[bytes, Address]] = []
        for data, addr in datagrams:
            box = streams.get(addr)
            if box is None:
                rest.append((data, addr))
            else:
                box.send(data)
                self.stats.datagrams_out += 1
        return rest

    def send(self, data: bytes, addr: Any) -> bool:
        """For the relay: frame ``data`` onto the stream of ``addr``; False if ``addr`` is
        no stream address (send it on the UDP socket)."""
        box = self.streams.get(addr) if self.streams else None
        if box is None:
            return False
        box.send(data)
        self.stats.datagrams_out += 1
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        addr: Any = None
        try:
            if len(self.streams) >= self.max_streams:
                self.stats.streams_refused += 1
                return
            decoder = FrameDecoder()
            first = await asyncio.wait_for(reader.readexactly(PREFACE_SIZE), _PREFACE_TIMEOUT_S)
            try:
                decoder.feed(first)
            except VersionMismatch:
                writer.write(encode_preface(VERSION))  # what this side speaks; then close
                await writer.drain()
                raise
            writer.write(encode_preface(VERSION))
            addr = stream_address(next(self._serial), int(peer[1]), ipv6=self._ipv6)
            self.streams[addr] = _Outbox(writer.transport, asyncio.get_running_loop())
            self.stats.streams_accepted += 1
            _log().info("tcp_stream_open", peer=f"{peer[0]}:{peer[1]}", stream=addr[0])
            receive = self.endpoint.receive_datagrams
            while True:
                data = await asyncio.wait_for(reader.read(_READ_SIZE), self.idle_timeout)
                if not data:
                    break
                datagrams = decoder.feed(data)
                if datagrams:
                    self.stats.datagrams_in += len(datagrams)
                    receive(datagrams, addr)
        except CyphonicError as exc:
            self.stats.streams_refused += 1
            _log().info("tcp_stream_refused", peer=str(peer), error=exc.message)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            if addr is not None:
                box = self.streams.pop(addr, None)
                if box is not None:
                    self.stats.datagrams_dropped += box.dropped
                _log().info("tcp_stream_closed", stream=addr[0])
            writer.close()
            self._tasks.discard(task)


async def start_tcp_listener(
    endpoint: QuicEndpoint, identity: CertifiedKey, *, host: str
) -> TcpListener | None:
    """A ``TcpListener`` for ``endpoint`` on TCP at the number of its UDP port, or None
    (logged) if that port cannot be bound: UDP service goes on without it."""
    port = int(endpoint.local_address[1])
    listener = TcpListener(endpoint, identity)
    try:
        await listener.start(host, port)
    except OSError as exc:
        endpoint.send_hook = None
        _log().warning("tcp_listen_failed", port=port, error=str(exc))
        return None
    return listener


# ---------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class HttpsProxy:
    """An HTTPS proxy reached with HTTP CONNECT (``http://[user:pass@]host:port``)."""

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)
    """``Basic ...`` from the URL's user:password; never logged (not in repr or str)."""

    @classmethod
    def parse(cls, url: str) -> HttpsProxy:
        """``http://proxy:3128``, ``proxy:3128``; ``InvalidArgument`` otherwise."""
        text = url if "://" in url else f"http://{url}"
        parts = urllib.parse.urlsplit(text)
        if parts.scheme != "http" or not parts.hostname:
            raise InvalidArgument(f"HTTPS proxy must be http://host:port, not {url!r}")
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise InvalidArgument(f"HTTPS proxy port invalid in {url!r}") from exc
        auth = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            raw = f"{user}:{urllib.parse.unquote(parts.password or '')}"
            auth = "Basic " + base64.b64encode(raw.encode()).decode()
        return cls(host=parts.hostname, port=port, authorization=auth)

    def __str__(self) -> str:  # never the credentials
        return f"{self.host}:{self.port}"


def client_tls_context(trust: TrustStore, *, check_hostname: bool) -> ssl.SSLContext:
    """TLS 1.3 only, the deployment's root as the only trust anchor."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([STREAM_ALPN])
    ctx.load_verify_locations(cadata=trust.root.public_bytes(serialization.Encoding.PEM).decode())
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def _proxy_connect(
    proxy: HttpsProxy, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port, limit=_READ_SIZE)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.close()
        raise Unavailable(f"HTTPS proxy {proxy} closed during CONNECT") from exc
    status = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    parts = status.split(" ", 2)
    if len(parts) < 2 or parts[1] != "200":
        writer.close()
        raise Unavailable(f"HTTPS proxy {proxy} refused CONNECT {target}: {status}")
    return reader, writer


async def open_stream(
    host: str,
    port: int,
    *,
    trust: TrustStore,
    server_name: str | None,
    proxy: HttpsProxy | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - a dial deadline
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS 1.3 stream to ``host``:``port`` (through ``proxy`` if given), prefaces
    exchanged. Raises ``Timeout``, ``Unavailable`` or the framing's typed errors."""
    ctx = client_tls_context(trust, check_hostname=server_name is not None)
    try:
        async with asyncio.timeout(timeout):
            if proxy is not None:
                reader, writer = await _proxy_connect(proxy, host, port)
                await writer.start_tls(ctx, server_hostname=server_name or host)
            else:
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname=server_name or host, limit=_READ_SIZE
                )
            writer.write(encode_preface(VERSION))
            version = parse_preface(await reader.readexactly(PREFACE_SIZE))
    except TimeoutError as exc:
        raise Timeout(f"no TLS stream to {host}:{port} within {timeout:g} s") from exc
    except (ssl.SSLError, ssl.CertificateError) as exc:
        raise Unavailable(f"TLS to {host}:{port} failed: {exc}") from exc
    except asyncio.IncompleteReadError as exc:
        raise Unavailable(f"{host}:{port} closed the stream before its preface") from exc
    except OSError as exc:
        raise Unavailable(f"cannot open TCP to {host}:{port}: {exc}") from exc
    if version != VERSION:
        writer.close()
        raise VersionMismatch(
            f"{host}:{port} speaks framing version {version}, this side {VERSION}",
            version=version,
        )
    return reader, writer


@dataclass
class _Stream:
    """One client stream (to one service address)."""

    addr: Any
    host: str
    port: int
    outbox: _Outbox | None = None
    task: asyncio.Task[None] | None = None
    opened_at: float = 0.0


@dataclass
class _Race:
    conn: Connection
    addr: Any
    recorded: list[bytes] = field(default_factory=list)
    udp_seen: bool = False


class StreamPaths:
    """The agent's side of the TCP 443 transport (see the module docstring)."""

    def __init__(
        self,
        endpoint: QuicEndpoint,
        *,
        trust: TrustStore,
        choice: PathChoice,
        proxy: HttpsProxy | None = None,
        dial_timeout: float = 10.0,
        probe_timeout: float = 3.0,
    ) -> None:
        self.endpoint = endpoint
        self.trust = trust
        self.choice = choice
        self.proxy = proxy
        self.dial_timeout = dial_timeout
        self.probe_timeout = probe_timeout
        self._loop = asyncio.get_running_loop()
        self._active: dict[Any, _Stream] = {}
        """Address -> the open stream carrying it."""
        self._recording: dict[Any, _Race] = {}
        """Address -> the race (connection under way) whose datagrams are kept for replay."""
        self._names: dict[Any, str] = {}
        """Service address -> its name (outer TLS name, UDP probes)."""
        self._probes: set[Connection] = set()
        self._probe_next = False
        self._feeding = False
        self._previous_filter: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.udp_blocked_at: float | None = None
        """Wall-clock time UDP was found blocked (for people)."""
        self.on_udp_back: Callable[[], None] | None = None
        """Called once connections have been moved back to UDP (the agent registers again,
        so that the NMS sees its real address)."""
        self.last_error = ""
        endpoint.connect_hook = self._connecting
        endpoint.send_hook = self._divert
        self._spawn(self._probe_loop())

    # -- what status shows

    def carrier_of(self, addr: Any) -> str:
        """What carries packets to ``addr`` now: ``tcp``, ``proxy`` or ``udp``. ``addr`` in
        either form (a connection's ``peer_address`` is unmapped; streams are keyed by the
        socket's form, IPv4-mapped on a dual-stack socket)."""
        plain = _plain(addr)
        if not any(_plain(key) == plain for key in self._active):
            return "udp"
        return "proxy" if self.proxy is not None else "tcp"

    def snapshot(self) -> dict[str, Any]:
        """``transport`` in ``cyphonic-agent status``."""
        choice = self.choice
        return {
            "carrier": choice.carrier.value,
            "udp_blocked_since": (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.udp_blocked_at))
                if self.udp_blocked_at is not None and choice.udp_blocked_since is not None
                else None
            ),
            "proxy": str(self.proxy) if self.proxy is not None else None,
            "streams": sorted(f"{s.host}:{s.port}" for s in self._active.values() if s.outbox),
            "udp_probes": choice.probes,
            "moves_to_udp": choice.switches_to_udp,
            "last_error": self.last_error,
        }

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for stream in list(self._active.values()):
            if stream.outbox is not None:
                stream.outbox.transport.close()
        self._active.clear()
        self._recording.clear()
        self._watch_udp()

    # -- endpoint hooks

    def _connecting(self, conn: Connection, addr: Any, expected_name: str | None) -> None:
        if self._probe_next:
            self._probe_next = False
            self._probes.add(conn)
            return
        service = conn.alpn == ALPN_SIGNALLING
        if service and expected_name:
            self._names[addr] = expected_name
        if addr in self._active or addr in self._recording:
            return  # a stream (or a race) carries that address already
        if not service:
            return  # tunnels ride on a service's stream (the TRS's) or go over UDP
        start = self.choice.connecting()
        if start.stream_after is None:
            return
        race = _Race(conn=conn, addr=addr)
        self._recording[addr] = race
        if start.udp:
            self._watch_udp()
        self._spawn(self._race(race, start.stream_after, send_udp=start.udp))

    def _divert(
        self, conn: Connection | None, datagrams: list[tuple[bytes, Address]]
    ) -> list[tuple[bytes, Address]]:
        active, recording = self._active, self._recording
        if (not active and not recording) or conn in self._probes:
            return datagrams
        rest: list[tuple[bytes, Address]] = []
        for data, addr in datagrams:
            stream = active.get(addr)
            if stream is not None and stream.outbox is not None:
                stream.outbox.send(data)
                continue
            race = recording.get(addr)
            if race is not None:
                if len(race.recorded) < _RECORD_MAX:
                    race.recorded.append(data)
                if self.choice.udp_blocked_since is not None:
                    continue  # UDP known blocked: wait for the stream
            rest.append((data, addr))
        return rest

    # -- the race

    def _watch_udp(self) -> None:
        """Offer socket datagrams to ``_udp_seen`` while a race waits for UDP."""
        endpoint = self.endpoint
        watching = endpoint.datagram_filter == self._udp_seen  # bound methods: equal, not same
        want = bool(self._recording) and not self._closed
        if want and not watching:
            self._previous_filter = endpoint.datagram_filter
            endpoint.datagram_filter = self._udp_seen
        elif watching and not want:
            endpoint.datagram_filter = self._previous_filter
            self._previous_filter = None

    def _udp_seen(self, data: bytes, addr: Any) -> bool:
        if not self._feeding:
            race = self._recording.get(addr)
            if race is not None and not race.udp_seen:
                race.udp_seen = True
                self._loop.call_soon(self._udp_won, race)
        previous = self._previous_filter
        return bool(previous(data, addr)) if previous is not None else False

    def _udp_won(self, race: _Race) -> None:
        """A UDP answer came while racing: UDP it is; any stream for it is closed."""
        if self._recording.get(race.addr) is not race:
            return
        del self._recording[race.addr]
        self._watch_udp()
        self.choice.udp_answered()
        stream = self._active.pop(race.addr, None)
        if stream is not None:
            self._close_stream(stream, why="udp answered")

    async def _race(self, race: _Race, delay: float, *, send_udp: bool) -> None:
        conn = race.conn
        try:
            if delay > 0:
                with contextlib.suppress(TimeoutError, CyphonicError):
                    await asyncio.wait_for(conn.wait_ready(), delay)
                if race.udp_seen or conn.is_ready or conn.is_closed:
                    return
            host, port = conn.peer_address
            stream = _Stream(addr=race.addr, host=host, port=port)
            self._active[race.addr] = stream
            try:
                await self._open(stream, self._names.get(race.addr))
            except CyphonicError as exc:
                self.last_error = exc.message
                _log().info("tcp_stream_failed", to=f"{host}:{port}", error=exc.message)
                self._active.pop(race.addr, None)
                return
            if race.udp_seen:
                return
            assert stream.outbox is not None
            for data in race.recorded:  # the flight so far, again, on the stream
                stream.outbox.send(data)
            race.recorded.clear()
            with contextlib.suppress(CyphonicError, asyncio.CancelledError):
                await conn.wait_ready()
            if (
                conn.is_ready
                and not race.udp_seen
                and self.choice.carried_by_stream(self._loop.time())
            ):
                self.udp_blocked_at = time.time()
                _log().warning(
                    "udp_blocked",
                    to=f"{host}:{port}",
                    carrier=self.choice.carrier.value,
                    proxy=str(self.proxy) if self.proxy else None,
                )
        finally:
            if self._recording.get(race.addr) is race:
                del self._recording[race.addr]
                self._watch_udp()

    async def _open(self, stream: _Stream, name: str | None) -> None:
        reader, writer = await open_stream(
            stream.host,
            stream.port,
            trust=self.trust,
            server_name=name,
            proxy=self.proxy,
            timeout=self.dial_timeout,
        )
        stream.outbox = _Outbox(writer.transport, self._loop)
        stream.opened_at = self._loop.time()
        stream.task = self._spawn(self._read(stream, reader, writer))
        _log().info(
            "tcp_stream_open",
            to=f"{stream.host}:{stream.port}",
            proxy=str(self.proxy) if self.proxy else None,
        )

    async def _read(
        self, stream: _Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        decoder = FrameDecoder()
        decoder.peer_version = VERSION  # the preface was read by ``open_stream``
        receive = self.endpoint.receive_datagrams
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    break
                datagrams = decoder.feed(data)
                if datagrams:
                    self._feeding = True
                    try:
                        receive(datagrams, stream.addr)
                    finally:
                        self._feeding = False
        except CyphonicError as exc:
            self.last_error = exc.message
            _log().warning(
                "tcp_stream_refused", to=f"{stream.host}:{stream.port}", error=exc.message
            )
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()
            if self._active.get(stream.addr) is stream:
                del self._active[stream.addr]
                _log().info("tcp_stream_closed", to=f"{stream.host}:{stream.port}")
                if self.choice.udp_blocked_since is not None and not self._closed:
                    # Still no UDP: open it again for what that address carries.
                    self._spawn(self._reopen(stream.addr, stream.host, stream.port))

    async def _reopen(self, addr: Any, host: str, port: int) -> None:
        delay = 0.2
        while not self._closed and self.choice.udp_blocked_since is not None:
            if addr in self._active or not any(
                _plain(c.peer_address) == (host, port) for c in self.endpoint.connections
            ):
                return  # someone else opened it, or nothing uses that address any more
            stream = _Stream(addr=addr, host=host, port=port)
            self._active[addr] = stream
            try:
                await self._open(stream, self._names.get(addr))
                return
            except CyphonicError as exc:
                self.last_error = exc.message
                self._active.pop(addr, None)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _close_stream(self, stream: _Stream, *, why: str, after: float = 0.0) -> None:
        outbox = stream.outbox
        if outbox is None:
            return
        _log().info("tcp_stream_closing", to=f"{stream.host}:{stream.port}", why=why)
        if after > 0:
            self._loop.call_later(after, outbox.transport.close)
        else:
            outbox.transport.close()

    # -- probing UDP while on streams

    async def _probe_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(min(1.0, self.choice.probe_interval_s / 2))
            now = self._loop.time()
            if not self.choice.probe_due(now) or not self._names:
                continue
            self.choice.probe_started(now)
            addr, name = next(iter(self._names.items()))
            if await self._probe_udp(addr, name):
                self._move_to_udp()
            else:
                self.choice.probe_failed(self._loop.time())

    async def _probe_udp(self, addr: Any, name: str) -> bool:
        """A throwaway handshake over UDP with an ALPN no service accepts: any answer
        (the refusal) shows UDP gets through both ways; silence, that it does not."""
        host, port = _plain(addr)
        self._probe_next = True
        try:
            conn = await self.endpoint.connect(
                (host, port),
                alpn=PROBE_ALPN,
                expect="service",
                expected_name=name,
                timeout=self.probe_timeout,
            )
        except Timeout:
            return False
        except CyphonicError:
            return True  # refused: the service answered over UDP
        finally:
            self._probe_next = False
            self._probes = {c for c in self._probes if not c.is_closed}
        conn.close("probe")
        return True

    def _move_to_udp(self) -> None:
        """UDP is back: every address goes over UDP again; streams linger a little for
        what the services still send on the old path, then close."""
        if not self.choice.udp_answered():
            return
        self.udp_blocked_at = None
        moved = list(self._active.values())
        self._active.clear()
        _log().info("udp_returned", streams=[f"{s.host}:{s.port}" for s in moved])
        for stream in moved:
            self._close_stream(stream, why="udp returned", after=10.0)
        # Something to send on every connection, so each service sees the new path now.
        for conn in self.endpoint.connections:
            if conn.is_ready and conn not in self._probes:
                _ping(conn)
        if self.on_udp_back is not None:
            try:
                self.on_udp_back()
            except Exception as exc:  # a callback's failure must not stop the probe loop
                _log().warning("on_udp_back_failed", error=repr(exc))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _plain(addr: Any) -> tuple[str, int]:
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host.removeprefix("::ffff:")
    return (host, int(addr[1]))


def _ping(conn: Connection) -> None:
    quic: Any = conn.quic
    with contextlib.suppress(Exception):
        core = getattr(quic, "_core", None)
        if core is not None:
            core.send_ping(0x4359_5443_5055_4450)  # qh3's native core
        else:
            quic.send_ping(0x4359_5443_5055_4450)  # aioquic
        conn.transmit()
