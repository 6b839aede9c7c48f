"""The QUIC endpoint: one UDP socket, many mutual-TLS connections, both roles at once.

    socket readable ──> drain until EAGAIN ──> route each datagram by Destination CID
                                               (unknown CID + Initial + accepted ALPN
                                                = new server connection)
                    ──> process every touched connection's events
                    ──> ONE transmit pass over connections with something to send
                    ──> re-arm the single timer (a heap of per-connection deadlines;
                        a timerfd, so deadlines under a millisecond cost no spinning)

No asyncio datagram transport: its one callback and one send per packet cost more than
the whole QUIC stack at tunnel rates. Applications queue stream data or datagrams on
``Connection.quic`` and call ``Connection.transmit()``; the send happens once per loop
iteration for all of them (``QuicEndpoint.flush()`` does it at once).

A connection is handed to the application (its handler created, ``connect()`` returning)
only after the peer's certificate chain was verified with ``cyphonic.pki.verify_peer``
inside the TLS handshake; a refused peer never reaches any handler.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import errno
import heapq
import ipaddress
import itertools
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, Protocol, cast

from aioquic.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    PingAcknowledged,
    QuicEvent,
)
from cryptography import x509

from cyphonic.errors import (
    CyphonicError,
    InvalidArgument,
    Overloaded,
    PermissionDenied,
    Timeout,
    Unauthenticated,
    Unavailable,
)
from cyphonic.log import get_logger
from cyphonic.pki import (
    CertifiedKey,
    PeerIdentity,
    PeerKind,
    TrustStore,
    certificate_dns_names,
    verify_peer,
    verify_resumed,
)
from cyphonic.quic import engine, refusal
from cyphonic.quic.deadline import open_deadline_timer
from cyphonic.quic.engine import ConnectionIdFactory, CyphonicQuicConnection
from cyphonic.quic.refusal import RefusalGate
from cyphonic.quic.retry import Drop, RetryGate, RetryTokens, SendRetry
from cyphonic.quic.tickets import TicketKeys, TicketState

_aioquic = engine  # for code where a parameter named ``engine`` hides the module

__all__ = [
    "Acceptor",
    "Address",
    "Connection",
    "ConnectionHandler",
    "EndpointStats",
    "HandlerFactory",
    "QuicEndpoint",
    "bind_udp",
]

Address = tuple[Any, ...]
"""A socket address as the endpoint's socket uses it ((host, port[, flow, scope]))."""

# aioquic logs every negotiated version and ALPN at INFO; our own key/value logs say more.
if logging.getLogger("quic").level == logging.NOTSET:
    logging.getLogger("quic").setLevel(logging.WARNING)

ENGINES = ("aioquic", "qh3")
"""QUIC engines an endpoint can run (``CYPHONIC_QUIC_ENGINE``); they interoperate."""
DEFAULT_ENGINE = "qh3"
"""The engine when ``CYPHONIC_QUIC_ENGINE`` is unset (native packet core)."""

SOCKET_BUFFER = 4 * 1024 * 1024
# UDP generic segmentation offload (Linux 4.18+): one sendmsg, many datagrams.
_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_SEGMENT_SIZE = struct.Struct("=H")
_GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS on older kernels
_GSO_MAX_BYTES = 65000  # under the 64 KB a single UDP send may carry
_RECV_SIZE = 65535
_MAX_DRAIN = 512  # receive calls per wake-up, so one busy socket cannot starve the loop
_PASS_BUDGET_S = 0.01
"""A receive pass starts new server handshakes (1-2 ms each) for this long; the Initials of
new clients read after it wait in the endpoint (``_INITIAL_WAIT_S``) for the next pass.
Without it a reconnect storm's pass of hundreds of Initials held the loop for 0.5 s and
more, and everything else waiting on it (the registry's database replies, with their pooled
connections held meanwhile) stalled with it."""
_PASS_MAX_S = 3 * _PASS_BUDGET_S
"""A receive pass stops reading after this long (what is left is read in the next loop
iteration). Datagrams of open connections take microseconds: this binds a pass of handshake
continuations (a client's certificate to verify) and very large bursts."""
_INITIAL_WAIT_S = 0.25
"""How long a new client's Initial may wait in the endpoint for its handshake to start;
older, it is refused (``quic.refusal``) with a retry-after. Initials are read at once and
wait here, not in the socket: left there, a storm's Initials filled the receive buffer
(seconds of queue), the open connections' datagrams behind them (PINGs, the handshakes
under way) waited as long or were dropped with the overflow, and every client sent its
Initial again at each PTO."""
_MAX_WAITING_INITIALS = 1024
"""Initials waiting at once (~1.3 MB); more are refused at once."""
# UDP generic receive offload (Linux 5.0+): one recvmsg returns a train of equal-size
# datagrams from one sender, with their size in a cmsg.
_UDP_GRO = getattr(socket, "UDP_GRO", 104)
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
_GRO_SIZE = struct.Struct("=i")
_GSO_PAUSE_MIN = 1.0  # seconds without GSO to a destination after its first refusal
_GSO_PAUSE_MAX = 64.0  # the pause doubles at each refusal up to this
# Errors that mean the socket cannot do GSO at all (not one destination's path).
_GSO_UNSUPPORTED = frozenset({errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.ENOTSUP})
_LAZY_REARM_S = 1.0
"""An armed deadline further away than this is left armed when the earliest deadline moves
later: it fires early (one wake-up that re-arms) instead of a re-arm per event. On a
signalling service the earliest deadline is the idle timeout of the node that PINGed
longest ago, i.e. the next to PING: otherwise every PING re-armed the timer."""
_ERROR_LOG_INTERVAL = 10.0  # seconds between two logs of internal errors (the rest counted)
_MAX_CLIENT_TICKETS = 1024  # session tickets a client keeps (one per server name and ALPN)
_MAX_REFUSED_CIDS = 4096  # Destination CIDs of refused Initials remembered (~80 KiB)
HANDSHAKE_TIMEOUT_S = 10.0
"""A server handshake not complete after this long frees its slot when ``max_handshakes`` is
reached (the agents' connect timeout is 5 s; an Initial flood's half-open ones go too)."""


class ConnectionHandler(Protocol):
    """What an application attaches to a verified connection."""

    def quic_event_received(self, event: QuicEvent) -> None:
        """A QUIC event (stream data, stream reset, datagram without a datagram handler)."""

    def connection_lost(self, error: CyphonicError | None) -> None:
        """The connection ended; ``error`` is None for an orderly local close."""


HandlerFactory = Callable[["Connection"], ConnectionHandler]


@dataclass(frozen=True)
class Acceptor:
    """How the server side treats connections for one ALPN.

    ``expect`` is the peer role required (``node``, ``service`` or ``any``); ``authorize``
    may refuse a verified peer (raise a CyphonicError, e.g. PermissionDenied) inside the
    handshake, before any of its data is read.
    """

    handler_factory: HandlerFactory
    expect: PeerKind | Literal["any"] = "any"
    authorize: Callable[[PeerIdentity], None] | None = None


@dataclass(frozen=True, slots=True)
class _WaitingInitial:
    """A new client's Initial waiting for its handshake to start (the Retry gate passed)."""

    at: float
    data: bytes
    addr: Address
    header: engine.DatagramHeader
    odcid: bytes
    retry_scid: bytes | None


@dataclass
class EndpointStats:
    """Counters of one endpoint (cheap enough for the data path)."""

    datagrams_received: int = 0
    datagrams_sent: int = 0
    send_dropped: int = 0
    unroutable: int = 0
    filtered: int = 0
    connections_accepted: int = 0
    connections_refused: int = 0
    wakeups: int = 0
    gso_sends: int = 0
    """System calls that sent several datagrams at once (UDP GSO)."""
    gso_paused: int = 0
    """GSO sends a destination's path refused (EMSGSIZE, EINVAL, EIO: e.g. a link MTU under
    the segment size); GSO to that destination pauses, doubling from 1 s to 64 s."""
    gro_batches: int = 0
    """Receive calls that returned several datagrams at once (UDP GRO)."""
    internal_errors: int = 0
    """Received datagrams, event or timer passes, transmit passes whose handling raised
    (logged, rate-limited): the datagram or the pass's output was dropped, or (events,
    timers) the connection abandoned."""
    handshakes_refused: int = 0
    """Initial datagrams not accepted because ``max_handshakes`` server handshakes were
    under way (answered by a refusal, ``refusals_sent``, or dropped beyond its rate)."""
    refusals_sent: int = 0
    """Stateless refusals sent (``quic.refusal``: CONNECTION_REFUSED with a retry-after)."""
    retries_sent: int = 0
    """Initials answered with a stateless Retry (handshakes under way at the threshold)."""
    passes_cut: int = 0
    """Receive passes whose time budget left new clients' Initials waiting for the next."""
    initials_expired: int = 0
    """Initials refused because they waited ``_INITIAL_WAIT_S`` for their handshake to start
    (counted in ``handshakes_refused`` too)."""
    retry_tokens_refused: int = 0
    """Initials dropped for a Retry token that was forged, expired or another address's."""


class Connection:
    """One verified (or verifying) QUIC connection on an endpoint.

    ``quic`` is the engine connection: queue stream data or datagrams on it, then call
    ``transmit()``. ``peer`` is the verified identity (set before any handler runs).
    """

    def __init__(
        self,
        *,
        endpoint: QuicEndpoint,
        quic: CyphonicQuicConnection,
        is_client: bool,
        address: Address,
        handler_factory: HandlerFactory | None,
    ) -> None:
        self.endpoint = endpoint
        self.quic = quic
        self.is_client = is_client
        self.handler: ConnectionHandler | None = None
        self.datagram_handler: Callable[[bytes], None] | None = None
        """Fast path for DATAGRAM frames (the tunnel); bypasses ``handler``."""
        self.datagrams_done: Callable[[], None] | None = None
        """Called once per endpoint wake-up that gave ``datagram_handler`` datagrams of this
        connection, after all of them and before that wake-up's transmit pass: a data path
        writes what it gathered here, and what it queues then (a reply the write produced)
        goes out in the same pass, with the acknowledgement."""
        self.alpn: str | None = None
        self._handler_factory = handler_factory
        self._initial_address = address
        self._cids: set[bytes] = set()
        self._ready: asyncio.Future[None] = endpoint._loop.create_future()
        self._closed: asyncio.Future[None] = endpoint._loop.create_future()
        self._local_close = False
        self._ended = False
        self._abandoned = False
        """Its engine raised: the endpoint no longer calls into it."""
        self.error: CyphonicError | None = None
        """Why the connection ended, once it has (None after an orderly local close)."""
        self.ping_acked_at: float | None = None
        """Loop time of the last PING acknowledgement (liveness of the current path)."""
        self._timer_at: float | None = None
        self.log = get_logger(
            "quic", role="client" if is_client else "server", cid=quic.host_cid.hex()
        )

    # -- public API

    @property
    def peer(self) -> PeerIdentity | None:
        """The verified peer identity, once the peer's certificate has been checked."""
        return self.quic.peer_identity

    @property
    def resumed(self) -> bool:
        """Whether the handshake resumed a TLS session (a ticket; no certificates sent)."""
        return bool(getattr(getattr(self.quic, "tls", None), "session_resumed", False))

    @property
    def peer_address(self) -> tuple[str, int]:
        """Current peer address as (host, port), IPv4-mapped addresses unmapped."""
        addr = self.quic.get_peer_address() or self._initial_address
        return _plain_address(addr)

    @property
    def is_ready(self) -> bool:
        """True once both sides have accepted each other and no close has begun."""
        return self._ready.done() and not self._ready.exception() and not self._ended

    @property
    def is_closed(self) -> bool:
        """True once a close has begun (locally or by the peer)."""
        return self._ended

    @property
    def engine(self) -> str:
        """The QUIC engine carrying this connection (``aioquic`` or ``qh3``)."""
        return str(self.quic.engine_name)

    @property
    def handshake_complete(self) -> bool:
        """True once this side's TLS handshake has completed (peer verified)."""
        return self.quic.handshake_complete

    @property
    def close_event(self) -> ConnectionTerminated | None:
        """The QUIC close under way or done (local or remote), if any."""
        return self.quic.close_event

    @property
    def smoothed_rtt(self) -> float | None:
        """Smoothed RTT of the connection in seconds, None before the first sample."""
        return self.quic.smoothed_rtt

    @property
    def peer_max_datagram_frame_size(self) -> int | None:
        """The peer's max_datagram_frame_size (None before its transport parameters)."""
        return self.quic.remote_max_datagram_frame_size

    @property
    def validated_peer_address(self) -> tuple[str, int] | None:
        """The peer address if QUIC has validated the current path, else None.

        A packet replayed from elsewhere can make QUIC probe a new path, but only a
        validated one is reported here (what the relay may act on).
        """
        if not self.quic.peer_address_validated:
            return None
        return self.peer_address

    def transmit(self, *, now: bool = False) -> None:
        """Ask for a transmit pass (coalesced: once per loop iteration for the endpoint).

        Needed after queueing on ``quic`` directly (stream data, ``send_datagram_frame``).
        ``now``: the pass runs at once instead (the end of a batch; saves the loop iteration
        the coalesced pass waits for); inside the endpoint's own receive or timer pass
        (from a handler) it is that pass's transmit, at its end, either way.
        """
        endpoint = self.endpoint
        if now and not endpoint._in_pass:
            # Straight into this pass: no ``call_soon`` for a flush that would find
            # nothing left (one loop iteration, an ``epoll_wait(0)``, per TUN read).
            if not self._abandoned:
                endpoint._dirty.add(self)
            endpoint.flush()
            return
        endpoint._mark_dirty(self)

    def send_datagram(self, data: bytes) -> bool:
        """Queue one DATAGRAM frame; False (dropped) if too large or the queue is full.

        The frames go out in the endpoint's next transmit pass (at the end of this loop
        iteration, or at once with ``endpoint.flush()`` after a batch).
        """
        if self._ended or len(data) > self.quic.max_datagram_payload():
            return False
        if self.quic.datagrams_pending() >= self.endpoint.max_pending_datagrams:
            return False
        self.quic.send_datagram_frame(data)
        self.endpoint._mark_dirty(self)
        return True

    def max_datagram_payload(self) -> int:
        """Largest DATAGRAM payload accepted by ``send_datagram``."""
        return self.quic.max_datagram_payload()

    def close(self, reason: str = "", *, error_code: int = 0) -> None:
        """Close with an application CONNECTION_CLOSE (code and reason go to the peer).

        A connection the peer is already closing keeps the peer's reason: a handler that
        fails on it (qh3 refuses writes once the peer's close is in) must not turn the
        peer's close into a local one without an error."""
        if not self._ended and self.quic.close_event is None:
            self._local_close = True
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self.transmit()
            self.endpoint._connection_ended(self)

    async def wait_ready(self) -> None:
        """Wait until the handshake is done both ways; raises why it failed."""
        await asyncio.shield(self._ready)

    async def wait_closed(self) -> None:
        """Wait until the connection has ended (close begun and handlers told)."""
        await asyncio.shield(self._closed)

    # -- endpoint internals

    def _deliver(self, event: QuicEvent) -> None:
        if self.handler is None:
            return
        try:
            self.handler.quic_event_received(event)
        except Exception as exc:
            if self.quic.close_event is not None:  # closing already: writes are refused
                self.log.debug("handler_failed_while_closing", error=repr(exc))
                return
            self.log.exception("handler_failed", error=repr(exc))
            self.close("internal error", error_code=1)

    def _attach_handler(self) -> bool:
        """Create the handler once the peer is verified; False if it must not go on."""
        peer = self.peer
        if peer is None:  # never hand out an unverified connection, whatever happened
            self.quic.close(
                error_code=engine.CRYPTO_BAD_CERTIFICATE,
                frame_type=0,
                reason_phrase="peer not authenticated",
            )
            self.transmit()
            return False
        self.log = self.log.bind(peer=peer.name, peer_kind=peer.kind)
        if self._handler_factory is not None and self.handler is None:
            try:
                self.handler = self._handler_factory(self)
            except Exception as exc:
                self.log.exception("handler_factory_failed", error=repr(exc))
                self.close("internal error", error_code=1)
                return False
        return True

    def _set_ready(self) -> None:
        if not self._ready.done():
            self._ready.set_result(None)
            self.log.info(
                "connection_ready", alpn=self.alpn, address=self.peer_address, resumed=self.resumed
            )

    def _end(self, error: CyphonicError | None) -> None:
        if self._ended:
            return
        self._ended = True
        self.error = error
        if not self._ready.done():
            self._ready.set_exception(error or Unavailable("connection closed"))
            self._ready.exception()  # mark retrieved: nobody may be waiting
        if self.handler is not None:
            try:
                self.handler.connection_lost(error)
            except Exception as exc:
                self.log.exception("handler_failed", error=repr(exc))
        if not self._closed.done():
            self._closed.set_result(None)


class QuicEndpoint:
    """One UDP socket carrying many QUIC connections, client and server roles at once."""

    def __init__(
        self,
        *,
        sock: socket.socket,
        identity: CertifiedKey,
        trust: TrustStore,
        accept: Mapping[str, Acceptor | HandlerFactory] | None,
        idle_timeout: float,
        max_datagram_size: int,
        max_pending_datagrams: int,
        congestion_control: str,
        engine: str | None = None,
        max_handshakes: int = 1024,
        max_udp_payload_size: int | None = None,
        retry_threshold: int | None = None,
        retry_key: bytes | None = None,
        server_names: Iterable[str] | None = None,
        ticket_keys: TicketKeys | None = None,
        ack_at_once: bool = False,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        engine = engine or default_engine()
        self.engine = engine
        """``qh3`` (the default) or ``aioquic``, for every connection of this endpoint."""
        self._qh3 = _load_engine(engine)
        self._sock = sock
        self._family = sock.family
        self.identity = identity
        self.trust = trust
        self.server_names: frozenset[str] = frozenset(
            n.lower() for n in (server_names or certificate_dns_names(identity.cert))
        )
        """Names a client must ask for (TLS SNI) to be served: by default those of our own
        certificate (a service's name; a node's FQDN for tunnels). No SNI is refused too."""
        self.retry: RetryGate | None = (
            None
            if retry_threshold is None
            else RetryGate(threshold=retry_threshold, tokens=RetryTokens(key=retry_key))
        )
        """Stateless Retry (``quic.retry``) once ``retry_threshold`` handshakes are under
        way; None: never (agents, whose peers come through the NMS)."""
        self._acceptors: dict[str, Acceptor] = {
            alpn: a if isinstance(a, Acceptor) else Acceptor(handler_factory=a)
            for alpn, a in (accept or {}).items()
        }
        self.idle_timeout = idle_timeout
        self.max_datagram_size = max_datagram_size
        self.max_udp_payload_size = max_udp_payload_size
        """Sent to every peer as the transport parameter (the largest UDP payload our link
        receives), None: not sent; every peer's is honoured either way."""
        self.max_pending_datagrams = max_pending_datagrams
        """Bound on queued DATAGRAM frames per connection (aioquic's queue is unbounded)."""
        self.max_handshakes = max_handshakes
        """Bound on server connections whose handshake is under way; Initials beyond it are
        refused statelessly (``quic.refusal``): a flood of Initials cannot make the endpoint
        hold unbounded state, a crowd of clients is told when to come back."""
        self._handshaking: dict[Connection, float] = {}
        """Server connections in their handshake -> when it began (oldest first)."""
        self.backlog: Callable[[], int] | None = None
        """Work the service still owes connections whose handshake is done (the NMS: the
        registrations in progress), counted with the handshakes under way against
        ``max_handshakes``: new clients are refused before their handshake, not after it
        when the registration behind it cannot keep up."""
        self._waiting: collections.deque[_WaitingInitial] = collections.deque()
        """New clients' Initials read after a pass's budget, oldest first."""
        self._pass_until: float | None = None
        """Inside a socket receive pass: until when it starts new handshakes."""
        self._waiting_scheduled = False
        self.refusals = RefusalGate()
        """Over ``max_handshakes``: the refusals' rate and the retry-after they name."""
        self._refused: dict[bytes, None] = {}
        """Destination CIDs of the Initials refused lately (bounded, oldest out)."""
        self.handshake_timeout_s = HANDSHAKE_TIMEOUT_S
        """A server handshake not done by then gives its slot up when one is needed."""
        self.ticket_keys = ticket_keys
        """Server side: issue session tickets sealed under these keys, and resume the
        sessions of tickets any endpoint with the same keys issued (``quic.tickets``; the
        qh3 engine only). None: every handshake is a full one."""
        self.ack_at_once = ack_at_once
        """Server connections acknowledge in the pass that received (qh3): signalling, where
        an idle node's PING otherwise costs a second wake-up for its ACK 1 ms later."""
        self._client_tickets: dict[
            tuple[str | None, str, str], tuple[Any, list[x509.Certificate]]
        ] = {}
        """Client side: the last session ticket of each (server name, ALPN, role), with the
        server chain verified when it was issued; offered (once) by the next connect."""
        self._error_log_at = 0.0
        self._errors_unlogged = 0
        self._congestion_control = congestion_control
        self._make_server_configs(identity)
        self._versions = set(_aioquic.supported_versions())
        self._by_cid: dict[bytes, Connection] = {}
        self._connections: set[Connection] = set()
        self._dirty: set[Connection] = set()
        self._flush_scheduled = False
        self._in_pass = False
        """Inside a receive or timer pass: connections marked dirty go out at its end."""
        self._heap: list[tuple[float, int, Connection]] = []
        self._seq = itertools.count()
        self._timer = open_deadline_timer(self._loop, self._on_timer)
        self._timer_at: float | None = None
        self._closing = False
        self.stats = EndpointStats()
        self.gso = sys.platform == "linux"
        """Send runs of equal-size datagrams with UDP GSO (off only if the socket cannot; a
        destination whose path refuses it is paused alone, see ``EndpointStats``)."""
        self._gso_pause: dict[Address, tuple[float, float]] = {}
        """Destination -> (GSO paused until, current pause length)."""
        self.gro = _enable_gro(sock)
        """Whether the socket hands over UDP GRO trains (read with recvmsg)."""
        self.server_connection_id_factory: (
            Callable[[Address, bytes], ConnectionIdFactory | None] | None
        ) = None
        """Seam for the relay: called with (peer address, client's first DCID) for each new
        server connection; a returned factory chooses that connection's host CIDs."""
        self.datagram_filter: Callable[[bytes, Address], bool] | None = None
        """Offered every received datagram first; returning True consumes it (the TRS
        relays foreign traffic there, on the same socket and drain loop). If it has a
        ``train(data, segment_size, addr) -> bool`` method, a UDP GRO train whose
        datagrams all carry one short-header Destination CID is offered whole to that
        instead (False: the datagrams are then offered one by one)."""
        self.send_hook: (
            Callable[[Connection | None, list[tuple[bytes, Address]]], list[tuple[bytes, Address]]]
            | None
        ) = None
        """Offered each connection's outgoing datagrams before the socket (connection None:
        a stateless Retry or refusal); returns those still to send on it (the TCP 443
        transport, ``cyphonic.quic.tcp_transport``, takes the ones whose address is a
        stream's)."""
        self.connect_hook: Callable[[Connection, Address, str | None], None] | None = None
        """Called by ``connect`` with (connection, address, expected name) before its first
        datagram is built (the TCP 443 transport starts its race there)."""
        self.log = get_logger("quic", local=self.local_address)
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _make_server_configs(self, identity: CertifiedKey) -> None:
        self._server_config = (
            _aioquic.make_configuration(
                is_client=False,
                identity=identity,
                alpn_protocols=list(self._acceptors),
                idle_timeout=self.idle_timeout,
                max_datagram_size=self.max_datagram_size,
                congestion_control=self._congestion_control,
                max_udp_payload_size=self.max_udp_payload_size,
            )
            if self._acceptors
            else None
        )
        self._qh3_server_config = (
            self._qh3.make_configuration(
                is_client=False,
                identity=identity,
                alpn_protocols=list(self._acceptors),
                idle_timeout=self.idle_timeout,
                max_datagram_size=self.max_datagram_size,
                max_udp_payload_size=self.max_udp_payload_size,
            )
            if self._acceptors and self._qh3 is not None
            else None
        )

    def set_identity(self, identity: CertifiedKey) -> None:
        """Present ``identity`` (a renewed key and certificate) in every handshake from now
        on; connections already open keep the one they were made with. Session tickets
        bound to the old certificate are dropped (the next connects are full handshakes)."""
        self.identity = identity
        self._make_server_configs(identity)
        self._client_tickets.clear()

    # -- creation and teardown

    @classmethod
    async def open(
        cls,
        *,
        host: str = "::",
        port: int = 0,
        identity: CertifiedKey,
        trust: TrustStore,
        accept: Mapping[str, Acceptor | HandlerFactory] | None = None,
        idle_timeout: float = 60.0,
        max_datagram_size: int = engine.DEFAULT_MAX_DATAGRAM_SIZE,
        max_pending_datagrams: int = 1024,
        congestion_control: str = "reno",
        engine: str | None = None,
        max_handshakes: int = 1024,
        dont_fragment: bool = False,
        max_udp_payload_size: int | None = None,
        retry_threshold: int | None = None,
        retry_key: bytes | None = None,
        server_names: Iterable[str] | None = None,
        ticket_keys: TicketKeys | None = None,
        ack_at_once: bool = False,
    ) -> QuicEndpoint:
        """Bind the UDP socket and start serving.

        ``host`` ``::`` binds dual-stack where the kernel allows it, else ``0.0.0.0``.
        ``accept`` maps ALPN to an ``Acceptor`` (or a bare handler factory, peer role
        ``any``); without it the endpoint only makes client connections.
        ``engine``: ``qh3`` or ``aioquic`` (default: ``CYPHONIC_QUIC_ENGINE``, else
        qh3); ``congestion_control`` applies to aioquic only. ``max_handshakes``
        bounds the server handshakes under way at once (more Initials are refused);
        from ``retry_threshold`` under way (None: never) a token-less Initial is answered
        with a stateless Retry, so only clients that receive at our address take a slot.
        ``server_names``: the SNI a client must send (default: our certificate's names).
        ``dont_fragment``: set DF on every datagram (``set_dont_fragment``); then keep
        ``max_datagram_size`` within the path, nothing larger leaves.
        ``max_udp_payload_size``: sent to peers as that transport parameter (our link's
        limit; None: not sent).
        ``ticket_keys``: issue and accept TLS session tickets (shared by the replicas of a
        service, so a client resumes at any of them); None: full handshakes only.
        ``ack_at_once``: server connections acknowledge in the pass that received (qh3).
        """
        engine = engine or default_engine()
        _load_engine(engine)  # refuse an unknown or missing engine before binding
        sock = bind_udp(host, port)
        if dont_fragment:
            set_dont_fragment(sock)
        return cls(
            sock=sock,
            identity=identity,
            trust=trust,
            accept=accept,
            idle_timeout=idle_timeout,
            max_datagram_size=max_datagram_size,
            max_pending_datagrams=max_pending_datagrams,
            congestion_control=congestion_control,
            engine=engine,
            max_handshakes=max_handshakes,
            max_udp_payload_size=max_udp_payload_size,
            retry_threshold=retry_threshold,
            retry_key=retry_key,
            server_names=server_names,
            ticket_keys=ticket_keys,
            ack_at_once=ack_at_once,
        )

    @property
    def local_address(self) -> tuple[str, int]:
        """(host, port) the socket is bound to."""
        name = self._sock.getsockname()
        return (name[0], name[1])

    def send_raw(self, data: bytes, address: tuple[str, int]) -> bool:
        """Send one datagram from this endpoint's socket to an IP literal ``address``: a
        reachability probe, or a copy of a connection's packet towards a path it may move
        to (hole punching). False if it could not go (never raises)."""
        try:
            ip = ipaddress.ip_address(address[0])
            if self._family == socket.AF_INET6:
                host = f"::ffff:{ip}" if ip.version == 4 else str(ip)
                self._sock.sendto(data, (host, int(address[1]), 0, 0))
            elif ip.version == 4:
                self._sock.sendto(data, (str(ip), int(address[1])))
            else:
                return False
        except (OSError, ValueError):
            return False
        self.stats.datagrams_sent += 1
        return True

    @property
    def connections(self) -> list[Connection]:
        """Live connections (handshaking, ready or closing)."""
        return list(self._connections)

    async def close(self, reason: str = "endpoint closing") -> None:
        """Close every connection (telling peers), then the socket."""
        if self._closing:
            return
        self._closing = True
        for conn in list(self._connections):
            conn.close(reason)
        self.flush()
        self._loop.remove_reader(self._sock.fileno())
        self._timer.close()
        self._timer_at = None
        for conn in list(self._connections):
            conn._end(conn.error)
        self._connections.clear()
        self._by_cid.clear()
        self._waiting.clear()
        self._sock.close()
        await asyncio.sleep(0)

    # -- client role

    async def connect(
        self,
        address: tuple[str, int],
        *,
        alpn: str,
        expect: PeerKind | Literal["any"] = "service",
        expected_name: str | None,
        handler_factory: HandlerFactory | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 - a handshake deadline, part of the API
        connection_id_factory: ConnectionIdFactory | None = None,
        initial_destination_cid: bytes | None = None,
        idle_timeout: float | None = None,
    ) -> Connection:
        """Open a client connection and wait until both sides have verified each other.

        ``expected_name`` is the service name (``nms.svc.<domain>``) or the peer node's
        FQDN; the server's chain must lead to ``expect``'s CA. Raises the mapped error when
        either side refuses (``Unauthenticated``, ``Expired``, ``Revoked``,
        ``PermissionDenied``), ``Timeout`` when nothing comes back in time.
        ``connection_id_factory`` and ``initial_destination_cid`` are for relayed paths;
        ``idle_timeout`` replaces the endpoint's for this connection.
        """
        if self._closing:
            raise Unavailable("endpoint is closed")
        addr = await self._resolve(address)
        idle = self.idle_timeout if idle_timeout is None else idle_timeout

        def verifier(chain: list[x509.Certificate], _alpn: str | None) -> PeerIdentity:
            return verify_peer(
                chain, trust=self.trust, expect=expect, expected_name=expected_name, now=_utcnow()
            )

        quic: CyphonicQuicConnection
        ticket_slot = (expected_name, alpn, expect)
        ticket, resume_chain = self._client_tickets.pop(ticket_slot, (None, None))
        if self._qh3 is not None:

            def keep_ticket(ticket: Any, chain: list[x509.Certificate]) -> None:
                self._client_tickets.pop(ticket_slot, None)
                while len(self._client_tickets) >= _MAX_CLIENT_TICKETS:
                    del self._client_tickets[next(iter(self._client_tickets))]
                self._client_tickets[ticket_slot] = (ticket, chain)

            quic = cast(
                CyphonicQuicConnection,
                self._qh3.Qh3QuicConnection(
                    configuration=self._qh3.make_configuration(
                        is_client=True,
                        identity=self.identity,
                        alpn_protocols=[alpn],
                        idle_timeout=idle,
                        max_datagram_size=self.max_datagram_size,
                        server_name=expected_name,
                        max_udp_payload_size=self.max_udp_payload_size,
                        session_ticket=ticket,
                    ),
                    peer_verifier=verifier,
                    connection_id_factory=connection_id_factory,
                    initial_destination_cid=initial_destination_cid,
                    ticket_handler=keep_ticket,
                    resume_chain=resume_chain,
                ),
            )
        else:
            config = engine.make_configuration(
                is_client=True,
                identity=self.identity,
                alpn_protocols=[alpn],
                idle_timeout=idle,
                max_datagram_size=self.max_datagram_size,
                server_name=expected_name,
                congestion_control=self._congestion_control,
                max_udp_payload_size=self.max_udp_payload_size,
            )
            quic = CyphonicQuicConnection(
                configuration=config,
                peer_verifier=verifier,
                connection_id_factory=connection_id_factory,
                initial_destination_cid=initial_destination_cid,
            )
        conn = Connection(
            endpoint=self, quic=quic, is_client=True, address=addr, handler_factory=handler_factory
        )
        conn.alpn = alpn
        conn.log = conn.log.bind(expected=expected_name)
        self._connections.add(conn)
        self._register(conn, quic.host_cid)
        if self.connect_hook is not None:
            self.connect_hook(conn, addr, expected_name)
        quic.connect(addr, now=self._loop.time())
        self._mark_dirty(conn)
        try:
            async with asyncio.timeout(timeout):
                await conn.wait_ready()
        except TimeoutError as exc:
            conn.close("handshake timeout")
            raise Timeout(
                f"no QUIC handshake with {address[0]}:{address[1]} within {timeout}s"
            ) from exc
        except Overloaded:
            # Refused before the server read the hello (``quic.refusal``): the ticket
            # offered was not used, the next connect offers it again.
            if ticket is not None and resume_chain is not None:
                self._client_tickets.setdefault(ticket_slot, (ticket, resume_chain))
            raise
        except asyncio.CancelledError:
            conn.close("cancelled")
            raise
        return conn

    async def _resolve(self, address: tuple[str, int]) -> Address:
        host, port = address[0], int(address[1])
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            if not infos:
                raise Unavailable(f"cannot resolve {host}") from None
            ip = ipaddress.ip_address(infos[0][4][0])
        if self._family == socket.AF_INET6:
            if ip.version == 4:
                return (f"::ffff:{ip}", port, 0, 0)
            return (str(ip), port, 0, 0)
        if ip.version == 6:
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            if mapped is None:
                raise InvalidArgument(f"{host}: IPv6 peer on an IPv4-only endpoint")
            ip = mapped
        return (str(ip), port)

    # -- server role

    def _accept(
        self, dcid: bytes, addr: Address, *, odcid: bytes, retry_scid: bytes | None
    ) -> Connection | None:
        assert self._server_config is not None
        factory = None
        if self.server_connection_id_factory is not None:
            factory = self.server_connection_id_factory(addr, dcid)
        holder: list[Connection] = []

        def checked(alpn: str | None, check: Callable[[Acceptor], PeerIdentity]) -> PeerIdentity:
            acceptor = self._acceptors.get(alpn or "")
            if acceptor is None:
                raise Unauthenticated(f"no service for ALPN {alpn!r}")
            asked = holder[0].quic.client_server_name if holder else None
            if asked not in self.server_names:
                # A node certificate is valid at every service: the name says which one
                # the client meant (and a tunnel's peer node checks it is the one asked).
                raise PermissionDenied(
                    f"server name {asked!r} is not this endpoint's"
                    if asked
                    else "no server name (SNI) in the client's hello"
                )
            peer = check(acceptor)
            if acceptor.authorize is not None:
                acceptor.authorize(peer)
            if holder:
                holder[0].alpn = alpn
                holder[0]._handler_factory = acceptor.handler_factory
            return peer

        def verifier(chain: list[x509.Certificate], alpn: str | None) -> PeerIdentity:
            return checked(alpn, lambda a: verify_peer(chain, **trusted(a)))

        def resume_verifier(state: TicketState, alpn: str | None) -> PeerIdentity:
            if state.alpn != (alpn or "") or state.server_name not in self.server_names:
                raise Unauthenticated("session ticket of another service")
            try:
                leaf = x509.load_der_x509_certificate(state.certificate)
            except ValueError as exc:
                raise Unauthenticated("session ticket with a malformed certificate") from exc
            return checked(alpn, lambda a: verify_resumed(leaf, kind=state.kind, **trusted(a)))

        def trusted(acceptor: Acceptor) -> dict[str, Any]:
            # What both checks take from the acceptor and the trust store.
            return {
                "trust": self.trust,
                "expect": acceptor.expect,
                "expected_name": None,
                "now": _utcnow(),
            }

        quic: CyphonicQuicConnection
        if self._qh3 is not None:
            quic = cast(
                CyphonicQuicConnection,
                self._qh3.Qh3QuicConnection(
                    configuration=self._qh3_server_config,
                    peer_verifier=verifier,
                    original_destination_connection_id=odcid,
                    retry_source_connection_id=retry_scid,
                    connection_id_factory=factory,
                    ticket_keys=self.ticket_keys,
                    resume_verifier=resume_verifier,
                    ack_at_once=self.ack_at_once,
                ),
            )
        else:
            quic = CyphonicQuicConnection(
                configuration=self._server_config,
                peer_verifier=verifier,
                original_destination_connection_id=odcid,
                retry_source_connection_id=retry_scid,
                connection_id_factory=factory,
            )
        conn = Connection(
            endpoint=self, quic=quic, is_client=False, address=addr, handler_factory=None
        )
        holder.append(conn)
        self._connections.add(conn)
        self._handshaking[conn] = self._loop.time()
        self._register(conn, dcid)
        self._register(conn, quic.host_cid)
        return conn

    # -- the loop

    def _on_readable(self) -> None:
        now = self._loop.time()
        touched: dict[Connection, None] = {}
        stats = self.stats
        stats.wakeups += 1
        gro = self.gro
        recvmsg = self._sock.recvmsg
        recvfrom = self._sock.recvfrom
        self._in_pass = True
        clock = time.monotonic
        until = clock() + _PASS_BUDGET_S
        self._pass_until = until
        stop = until - _PASS_BUDGET_S + _PASS_MAX_S
        try:
            if self._waiting:
                self._start_waiting(now, until, touched)
            for _ in range(_MAX_DRAIN):
                if clock() > stop:
                    break
                try:
                    if gro:
                        data, ancillary, _flags, addr = recvmsg(_RECV_SIZE, _GRO_CMSG_SPACE)
                        segment = _gro_segment(ancillary) if ancillary else 0
                    else:
                        data, addr = recvfrom(_RECV_SIZE)
                        segment = 0
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
                    self.log.debug("recv_error", error=str(exc))
                    continue
                if 0 < segment < len(data):
                    stats.gro_batches += 1
                    self._receive_train(data, segment, addr, now, touched)
                else:
                    self._receive_one(data, addr, now, touched)
            self._process_touched(touched)
        except BaseException:
            self._pass_failed()
            raise
        finally:
            self._in_pass = False
            self._pass_until = None
        self._transmit(self._with_dirty(touched))
        if self._waiting and not self._waiting_scheduled and not self._closing:
            stats.passes_cut += 1
            self._waiting_scheduled = True
            self._loop.call_soon(self._next_pass)

    def _next_pass(self) -> None:
        """A pass for the Initials left waiting (the socket may have nothing new)."""
        self._waiting_scheduled = False
        if not self._closing:
            self._on_readable()

    def _start_waiting(self, now: float, until: float, touched: dict[Connection, None]) -> None:
        """The waiting Initials, oldest first, while the pass's budget lasts: a retransmitted
        or second half of a hello whose handshake began goes to it; one that waited too long
        is refused (the client comes back after the retry-after instead of sending it again
        at its PTO)."""
        waiting = self._waiting
        clock = time.monotonic
        while waiting:
            item = waiting[0]
            conn = self._by_cid.get(item.header.destination_cid)
            if conn is None:
                if now - item.at > _INITIAL_WAIT_S:
                    waiting.popleft()
                    self.stats.initials_expired += 1
                    self._refuse(item.header, len(item.data), item.addr)
                    continue
                if clock() > until:
                    return
                conn = self._admit(
                    item.header, len(item.data), item.addr, item.odcid, item.retry_scid
                )
            waiting.popleft()
            if conn is not None:
                self._deliver(conn, item.data, item.addr, now, touched)

    def _process_touched(self, touched: dict[Connection, None]) -> None:
        """The pass's connections to their handlers, then each ``datagrams_done`` once (the
        agent's data path writes what it gathered to the TUN there)."""
        done: list[Callable[[], None]] = []
        for conn in touched:
            callback = conn.datagrams_done if self._process(conn) else None
            if callback is not None and callback not in done:
                done.append(callback)
        for callback in done:
            try:
                callback()
            except Exception as exc:
                self._internal_error(exc, None, "datagrams_done")

    def _pass_failed(self) -> None:
        """A pass ends on an exception before its transmit: what was marked in it goes
        out in the next loop iteration, as outside a pass."""
        self._in_pass = False
        if self._dirty and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def _with_dirty(self, conns: dict[Connection, None]) -> dict[Connection, None]:
        """``conns`` and the connections marked dirty during a pass (their work goes out in
        the pass's transmit, not in a later loop iteration)."""
        dirty = self._dirty
        if dirty:
            self._dirty = set()
            for conn in dirty:
                if conn not in conns:
                    self._process(conn)
                    conns[conn] = None
        return conns

    def receive_datagrams(self, datagrams: list[bytes], addr: Address) -> None:
        """Datagrams that came from ``addr`` by another way than the socket (a TCP 443
        stream): handled exactly as if read from it (``datagrams_done`` included), then one
        transmit pass."""
        if self._closing:
            return
        now = self._loop.time()
        touched: dict[Connection, None] = {}
        self._in_pass = True
        try:
            for data in datagrams:
                self._receive_one(data, addr, now, touched)
            self._process_touched(touched)
        except BaseException:
            self._pass_failed()
            raise
        finally:
            self._in_pass = False
        self._transmit(self._with_dirty(touched))

    def _receive_one(
        self, data: bytes, addr: Address, now: float, touched: dict[Connection, None]
    ) -> None:
        stats = self.stats
        stats.datagrams_received += 1
        conn = None
        try:
            datagram_filter = self.datagram_filter
            if datagram_filter is not None and datagram_filter(data, addr):
                stats.filtered += 1
                return
            conn = self._route(data, addr)
        except Exception as exc:
            self._internal_error(exc, None, "receive")
            return
        if conn is None:
            stats.unroutable += 1
            return
        self._deliver(conn, data, addr, now, touched)

    def _deliver(
        self,
        conn: Connection,
        data: bytes,
        addr: Address,
        now: float,
        touched: dict[Connection, None],
    ) -> None:
        try:
            conn.quic.receive_datagram(data, addr, now)
        except Exception as exc:
            # One datagram must not end the loop, nor a connection it was sent to (whoever
            # knows a CID could send it): dropped. A server connection still in its
            # handshake is dropped with it (no state kept for a bad Initial).
            self._internal_error(exc, conn, "receive")
            if conn in self._handshaking:
                self._abandon(conn)
            return
        touched[conn] = None

    def _receive_train(
        self,
        data: bytes,
        segment: int,
        addr: Address,
        now: float,
        touched: dict[Connection, None],
    ) -> None:
        """A GRO train: to the engine in one call when every datagram is a short-header
        packet for the same connection (a tunnel's burst), else one datagram at a time."""
        size = len(data)
        conn = None
        end = 1 + _aioquic.CID_LENGTH
        dcid = data[1:end]
        uniform = not data[0] & 0x80 and all(
            not data[o] & 0x80 and data[o + 1 : o + end] == dcid
            for o in range(segment, size, segment)
        )
        datagram_filter = self.datagram_filter
        if datagram_filter is not None:
            train = getattr(datagram_filter, "train", None)
            if not uniform or train is None:
                uniform = False  # the filter sees each datagram
            else:
                try:
                    taken = train(data, segment, addr)
                except Exception as exc:
                    self.stats.datagrams_received += -(-size // segment)
                    self._internal_error(exc, None, "receive")
                    return
                if taken:
                    count = -(-size // segment)
                    self.stats.datagrams_received += count
                    self.stats.filtered += count
                    return
                # Not the filter's: one of this endpoint's connections, as a whole.
        if uniform:
            conn = self._by_cid.get(dcid)
        if conn is None or conn in self._handshaking:
            for offset in range(0, size, segment):
                self._receive_one(data[offset : offset + segment], addr, now, touched)
            return
        self.stats.datagrams_received += -(-size // segment)
        try:
            conn.quic.receive_gro(data, segment, addr, now)
        except Exception as exc:
            self._internal_error(exc, conn, "receive")
            return
        touched[conn] = None

    def _route(self, data: bytes, addr: Address) -> Connection | None:
        header = engine.parse_datagram_header(data)
        if header is None:
            return None
        conn = self._by_cid.get(header.destination_cid)
        if conn is not None:
            return conn
        if (
            header.is_initial
            and self._server_config is not None
            and not self._closing
            and header.version in self._versions
            and len(data) >= 1200
        ):
            odcid, retry_scid = header.destination_cid, None
            if self.retry is not None:
                decision = self.retry.on_initial(
                    addr=addr,
                    dcid=header.destination_cid,
                    token=header.token,
                    handshaking=len(self._handshaking),
                    now=time.time(),  # wall clock: replicas sharing a key agree on it
                )
                if isinstance(decision, SendRetry):
                    self._send_retry(header, decision, addr)
                    return None
                if isinstance(decision, Drop):
                    self.stats.retry_tokens_refused += 1
                    return None
                odcid, retry_scid = decision.odcid, decision.retry_scid
            until = self._pass_until
            if until is not None and (self._waiting or time.monotonic() > until):
                if header.destination_cid in self._refused or (
                    len(self._waiting) >= _MAX_WAITING_INITIALS
                ):
                    self._refuse(header, len(data), addr)
                else:
                    self._waiting.append(
                        _WaitingInitial(
                            at=self._loop.time(),
                            data=data,
                            addr=addr,
                            header=header,
                            odcid=odcid,
                            retry_scid=retry_scid,
                        )
                    )
                return None
            return self._admit(header, len(data), addr, odcid, retry_scid)
        return None

    def _admit(
        self,
        header: engine.DatagramHeader,
        size: int,
        addr: Address,
        odcid: bytes,
        retry_scid: bytes | None,
    ) -> Connection | None:
        """A new server connection for a client's Initial, or None: refused (a slot is not
        free, or the rest of this hello was refused already)."""
        if header.destination_cid in self._refused or (
            self._under_way() >= self.max_handshakes and not self._expire_handshakes()
        ):
            self._refuse(header, size, addr)
            return None
        return self._accept(header.destination_cid, addr, odcid=odcid, retry_scid=retry_scid)

    def _under_way(self) -> int:
        """Handshakes under way and the service's ``backlog``."""
        return len(self._handshaking) + (0 if self.backlog is None else self.backlog())

    def _expire_handshakes(self) -> bool:
        """Give up server handshakes older than ``handshake_timeout_s`` (their client gave up,
        or sent half a hello); True if that freed a slot."""
        deadline = self._loop.time() - self.handshake_timeout_s
        freed = False
        while self._handshaking:
            conn, began = next(iter(self._handshaking.items()))
            if began > deadline:
                break
            del self._handshaking[conn]
            conn.close("handshake timeout")
            freed = True
        return freed

    def _refuse(self, header: engine.DatagramHeader, size: int, addr: Address) -> None:
        """An Initial over ``max_handshakes``: a stateless refusal naming a retry-after
        (``quic.refusal``), or dropped silently beyond the refusals' rate. The rest of that
        client's hello (qh3's can take two datagrams) is refused too, also if a slot frees
        meanwhile: a server connection from the second half alone would wait for the first
        that never comes."""
        self.stats.handshakes_refused += 1
        now = self._loop.time()
        refused = self._refused
        refused[header.destination_cid] = None
        while len(refused) > _MAX_REFUSED_CIDS:
            del refused[next(iter(refused))]
        gate = self.refusals
        if not gate.take(now=now):
            return
        assert header.version is not None
        packet = refusal.encode_refusal(
            version=header.version,
            client_dcid=header.destination_cid,
            client_scid=header.source_cid,
            retry_after_s=gate.retry_after(self._under_way() + len(self._waiting), now=now),
        )
        if len(packet) <= size and self._send_stateless(packet, addr):  # never amplify
            self.stats.refusals_sent += 1

    def _send_retry(self, header: engine.DatagramHeader, retry: SendRetry, addr: Address) -> None:
        assert header.version is not None
        packet = engine.encode_retry(
            version=header.version,
            scid=retry.scid,
            dcid=header.source_cid,
            odcid=header.destination_cid,
            token=retry.token,
        )
        if self._send_stateless(packet, addr):
            self.stats.retries_sent += 1

    def _send_stateless(self, packet: bytes, addr: Address) -> bool:
        """A packet of no connection (a Retry, a refusal): onto the TCP 443 stream it came
        from (``send_hook``), else to the socket."""
        if self.send_hook is not None and not self.send_hook(None, [(packet, addr)]):
            return True
        try:
            self._sock.sendto(packet, addr)
        except OSError as exc:  # e.g. no route to a spoofed source
            self.log.debug("stateless_send_failed", error=str(exc))
            return False
        return True

    def _process(self, conn: Connection) -> bool:
        """The connection's events to their handlers; True if ``datagram_handler`` got any."""
        if conn._abandoned:
            return False
        try:
            return self._process_events(conn)
        except Exception as exc:
            self._internal_error(exc, conn, "events")
            self._abandon(conn)
            return False

    def _process_events(self, conn: Connection) -> bool:
        quic = conn.quic
        datagrams = False
        while (event := quic.next_event()) is not None:
            if isinstance(event, DatagramFrameReceived) and conn.datagram_handler is not None:
                if not conn._ended:
                    datagrams = True
                    try:
                        conn.datagram_handler(event.data)
                    except Exception as exc:
                        conn.log.exception("datagram_handler_failed", error=repr(exc))
            elif isinstance(event, ConnectionIdIssued):
                self._register(conn, event.connection_id)
            elif isinstance(event, ConnectionIdRetired):
                self._unregister(event.connection_id)
            elif isinstance(event, HandshakeCompleted):
                self._handshaking.pop(conn, None)
                if not conn.is_client:
                    self.refusals.completed(now=self._loop.time())
                # Server: the client's chain was verified inside the handshake. Client:
                # the server's was; its handler exists from now on so that nothing the
                # server sends is lost, but connect() waits for HANDSHAKE_DONE, the sign
                # that the server accepted this side's certificate too.
                if conn._attach_handler() and not conn.is_client:
                    self.stats.connections_accepted += 1
                    conn._set_ready()
            elif isinstance(event, ConnectionTerminated):
                self._connection_ended(conn)
                self._forget(conn)
            elif isinstance(event, PingAcknowledged):
                conn.ping_acked_at = self._loop.time()
            elif not conn._ended:
                conn._deliver(event)
        if (
            conn.is_client
            and not conn._ready.done()
            and quic.handshake_confirmed
            and conn.peer is not None
            and not conn._ended
        ):
            conn._set_ready()
        if not conn._ended and quic.close_event is not None:
            self._connection_ended(conn)
        return datagrams

    def _connection_ended(self, conn: Connection) -> None:
        self._handshaking.pop(conn, None)
        if conn._ended:
            return
        event = conn.quic.close_event
        error: CyphonicError | None = None
        if not conn._local_close or conn.quic.verification_error is not None:
            host, port = conn.peer_address
            label = conn.peer.name if conn.peer else f"{host}:{port}"
            if event is None:
                error = Unavailable(f"{label}: connection closed")
            else:
                error = engine.error_from_close(
                    event, local_error=conn.quic.verification_error, peer_label=label
                )
        if conn.quic.verification_error is not None:
            self.stats.connections_refused += 1
            conn.log.warning("peer_refused", address=conn.peer_address, reason=str(error))
        elif error is not None:
            conn.log.info("connection_closed", reason=str(error))
        conn._end(error)

    def _transmit(self, conns: Iterable[Connection]) -> None:
        now = self._loop.time()
        for conn in conns:
            if conn._abandoned:
                continue
            try:
                datagrams = conn.quic.datagrams_to_send(now=now)
            except Exception as exc:
                # Kept: qh3 raises "packet builder capacity exhausted" for a server flight
                # the anti-amplification budget cannot hold (an aioquic client's first
                # Initial), and recovers at the client's next datagram. What this pass
                # would have sent is lost; loss recovery sends it again.
                self._internal_error(exc, conn, "transmit")
                datagrams = []
            if datagrams and self.send_hook is not None:
                datagrams = self.send_hook(conn, datagrams)
            if len(datagrams) > 1 and self.gso:
                self._send_gso(conn, datagrams)
            elif datagrams:
                self._send_each(conn, datagrams)
            self._arm(conn)
        self._rearm_timer()

    def _send_each(self, conn: Connection, datagrams: list[tuple[bytes, Address]]) -> None:
        sendto = self._sock.sendto
        stats = self.stats
        for data, addr in datagrams:
            try:
                sendto(data, addr)
                stats.datagrams_sent += 1
            except (BlockingIOError, InterruptedError):
                stats.send_dropped += 1  # socket buffer full: QUIC recovers the loss
            except OSError as exc:
                stats.send_dropped += 1
                conn.log.debug("send_error", error=str(exc))

    def _send_gso(self, conn: Connection, datagrams: list[tuple[bytes, Address]]) -> None:
        """Runs of equal-size datagrams to one address go out as one UDP GSO send.

        The kernel splits the buffer into ``size``-byte datagrams (the last may be
        shorter), so a full-MTU burst costs one system call instead of one per packet.
        A destination whose path refuses a GSO send (a link MTU under the segment size
        gives EMSGSIZE or EINVAL) gets plain sends for a pause that doubles from 1 s to
        64 s, then GSO is tried again; other destinations keep GSO throughout.
        """
        sendmsg = self._sock.sendmsg
        stats = self.stats
        paused = self._gso_pause
        i, n = 0, len(datagrams)
        while i < n:
            data, addr = datagrams[i]
            size = len(data)
            j = i + 1
            total = size
            while (
                j < n
                and j - i < _GSO_MAX_SEGMENTS
                and total + size <= _GSO_MAX_BYTES
                and datagrams[j][1] == addr
                and len(datagrams[j][0]) <= size
            ):
                total += len(datagrams[j][0])
                j += 1
                if len(datagrams[j - 1][0]) < size:
                    break  # a shorter datagram can only end a run
            pause = paused.get(addr) if paused else None
            if j - i == 1 or (pause is not None and self._loop.time() < pause[0]):
                self._send_each(conn, datagrams[i:j])
                i = j
                continue
            run = datagrams[i:j]
            try:
                sendmsg(
                    [b"".join(d for d, _ in run)],
                    [(_SOL_UDP, _UDP_SEGMENT, _SEGMENT_SIZE.pack(size))],
                    0,
                    addr,
                )
                stats.datagrams_sent += j - i
                stats.gso_sends += 1
                if pause is not None:
                    del paused[addr]
                    conn.log.info("gso_resumed", destination=_plain_address(addr))
            except (BlockingIOError, InterruptedError):
                stats.send_dropped += j - i
            except OSError as exc:
                if exc.errno in _GSO_UNSUPPORTED:
                    # The socket cannot do GSO at all: plain sends from now on.
                    self.gso = False
                    conn.log.info("gso_disabled", error=str(exc))
                    self._send_each(conn, datagrams[i:])
                    return
                length = _GSO_PAUSE_MIN if pause is None else min(pause[1] * 2, _GSO_PAUSE_MAX)
                paused[addr] = (self._loop.time() + length, length)
                stats.gso_paused += 1
                conn.log.info(
                    "gso_paused",
                    destination=_plain_address(addr),
                    seconds=length,
                    segment=size,
                    error=str(exc),
                )
                self._send_each(conn, run)
            i = j

    def _mark_dirty(self, conn: Connection) -> None:
        if conn._abandoned:
            return
        self._dirty.add(conn)
        if not self._flush_scheduled and not self._in_pass:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Run the transmit pass now for every connection with queued work."""
        self._flush_scheduled = False
        if self._in_pass:
            return  # the pass under way transmits them at its end
        if not self._dirty or self._sock.fileno() < 0:
            self._dirty.clear()
            return
        dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            self._process(conn)
        self._transmit(dirty)

    # -- timers: one heap, one asyncio timer

    def _arm(self, conn: Connection) -> None:
        when = conn.quic.get_timer()
        if when == conn._timer_at:
            return
        conn._timer_at = when
        if when is not None:
            heapq.heappush(self._heap, (when, next(self._seq), conn))

    def _rearm_timer(self) -> None:
        heap = self._heap
        while heap and heap[0][2]._timer_at != heap[0][0]:
            heapq.heappop(heap)  # stale entry
        when = heap[0][0] if heap else None
        armed = self._timer_at
        if when == armed:
            return
        if (
            armed is not None
            and (when is None or when > armed)
            and armed - self._loop.time() > _LAZY_REARM_S
        ):
            return  # moved later and far off: the armed timer fires early, once
        self._timer_at = when
        self._timer.arm(when)

    def _on_timer(self) -> None:
        self._timer_at = None
        now = self._loop.time()
        due: dict[Connection, None] = {}
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, conn = heapq.heappop(heap)
            if conn._timer_at == when:
                conn._timer_at = None
                due[conn] = None
        self._in_pass = True
        try:
            for conn in due:
                try:
                    conn.quic.handle_timer(now=now)
                except Exception as exc:
                    self._internal_error(exc, conn, "timer")
                    self._abandon(conn)  # skipped by the transmit pass from now on
                    continue
                self._process(conn)
        except BaseException:
            self._pass_failed()
            raise
        finally:
            self._in_pass = False
        self._transmit(self._with_dirty(due))

    # -- connection ID table

    def _register(self, conn: Connection, cid: bytes) -> None:
        self._by_cid[cid] = conn
        conn._cids.add(cid)

    def _unregister(self, cid: bytes) -> None:
        conn = self._by_cid.pop(cid, None)
        if conn is not None:
            conn._cids.discard(cid)

    # -- internal errors: counted, logged at a bounded rate, contained to one connection

    def _internal_error(self, exc: Exception, conn: Connection | None, where: str) -> None:
        self.stats.internal_errors += 1
        now = self._loop.time()
        if now < self._error_log_at:
            self._errors_unlogged += 1
            return
        self._error_log_at = now + _ERROR_LOG_INTERVAL
        log = conn.log if conn is not None else self.log
        log.exception(
            "internal_error", where=where, error=repr(exc), not_logged_before=self._errors_unlogged
        )
        self._errors_unlogged = 0

    def _abandon(self, conn: Connection) -> None:
        """Drop a connection whose engine raised, without calling into the engine again
        (its peer sees an idle timeout); its handler is told."""
        conn._abandoned = True
        self._forget(conn)
        conn._end(Unavailable("connection abandoned after an internal error"))

    def _forget(self, conn: Connection) -> None:
        for cid in list(conn._cids):
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        conn._cids.clear()
        conn._timer_at = None
        self._connections.discard(conn)
        self._dirty.discard(conn)
        self._handshaking.pop(conn, None)


def default_engine() -> str:
    """The engine named by ``CYPHONIC_QUIC_ENGINE`` (``qh3`` when unset)."""
    return os.environ.get("CYPHONIC_QUIC_ENGINE", "").strip().lower() or DEFAULT_ENGINE


def _load_engine(name: str) -> ModuleType | None:
    """The qh3 engine module for ``qh3``, None for aioquic; refuses anything else."""
    if name == "aioquic":
        return None
    if name != "qh3":
        raise InvalidArgument(f"unknown QUIC engine {name!r} (one of {', '.join(ENGINES)})")
    try:
        from cyphonic.quic import engine_qh3
    except ImportError as exc:
        raise Unavailable("QUIC engine qh3 is not installed (install cyphonic[qh3])") from exc
    return engine_qh3


def _enable_gro(sock: socket.socket) -> bool:
    """Ask for UDP GRO trains on ``sock``; False where the kernel has no UDP_GRO."""
    if sys.platform != "linux" or not _GRO_CMSG_SPACE:
        return False
    try:
        sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)
    except OSError:
        return False
    return True


def _gro_segment(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The GRO segment size in a recvmsg's ancillary data (0 if none)."""
    for level, kind, value in ancillary:
        if level == _SOL_UDP and kind == _UDP_GRO and len(value) >= _GRO_SIZE.size:
            return int(_GRO_SIZE.unpack_from(value)[0])
    return 0


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _plain_address(addr: Address) -> tuple[str, int]:
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host.removeprefix("::ffff:")
    return (host, int(addr[1]))


_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
_PMTUDISC_PROBE = 3
"""IP_PMTUDISC_PROBE / IPV6_PMTUDISC_PROBE (linux/in.h, linux/in6.h)."""


def set_dont_fragment(sock: socket.socket) -> None:
    """Never fragment this socket's datagrams: DF set, sizes above the interface MTU
    refused with EMSGSIZE (a lost packet to QUIC), and the kernel's ICMP-fed path MTU cache
    ignored (``PMTUDISC_PROBE``: an unauthenticated "too big" cannot shrink our packets;
    the sizes come from the links and the peer's ``max_udp_payload_size``). Both levels
    on a dual-stack socket (IPv4-mapped peers follow the IPv4 option); an option the
    kernel lacks is skipped."""
    if sock.family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _PMTUDISC_PROBE)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _PMTUDISC_PROBE)


def bind_udp(host: str, port: int, *, buffer_bytes: int = SOCKET_BUFFER) -> socket.socket:
    """A non-blocking UDP socket with ``buffer_bytes`` send and receive buffers (past
    ``net.core.*mem_max`` when privileged); ``::`` is dual-stack where the kernel allows it,
    else ``0.0.0.0``. A host that is not an IP literal is ``InvalidArgument``."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError as exc:
        raise InvalidArgument(f"bind address must be an IP literal, not {host!r}") from exc
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError:
        if host != "::":
            raise
        family, host = socket.AF_INET, "0.0.0.0"
        sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        for opt, force in (
            (socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", 33)),
            (socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", 32)),
        ):
            try:  # SO_RCVBUFFORCE/SO_SNDBUFFORCE pass net.core.*mem_max when privileged
                sock.setsockopt(socket.SOL_SOCKET, force, buffer_bytes)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
