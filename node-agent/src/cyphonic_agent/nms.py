"""The agent's signalling with the AS and the NMS, asyncio glue: login, register, keepalive,
and the loop that does it again after a loss.

    Login at the AS (agent.json's endpoints)     -> NMS endpoints, NMS name
    Register at the NMS (the socket's addresses) -> virtual IPv4/IPv6, keepalive interval
    QUIC PING at the NMS's interval (an older NMS: a Keepalive request); connection lost ->
    back off, reconnect, register again

The NMS takes the connection's liveness as the node's presence. A PING is one small packet
and an ACK, no stream and no message: the NAT binding stays open and the NMS does no work
above QUIC. A PING not acknowledged within ``PING_ACK_TIMEOUT_S`` means the NMS is gone: a
vanished NMS is noticed within one PING interval (25 s by default; with Keepalive requests,
10 + 5 s), at worst by the connection's idle timeout (45 s).

When to log in, how long to pause and when to give up is ``control.Reconnect``'s decision;
what a registration means for the node (bring-up, a move's re-registration) is the agent's,
through ``on_registered``.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import (
    AuthError,
    CyphonicError,
    Overloaded,
    PermissionDenied,
    Timeout,
    Unavailable,
    UnexpectedMessage,
)
from cyphonic.hostport import format_host_port, parse_host_port
from cyphonic.log import get_logger
from cyphonic.quic import QuicEndpoint
from cyphonic.quic.tcp_transport import StreamPaths
from cyphonic.session import SignallingSession
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import expect, wrap

from cyphonic_agent.config import AgentSettings
from cyphonic_agent.control import GiveUp, Reconnect
from cyphonic_agent.enroll import AgentState
from cyphonic_agent.peers import REQUEST_TIMEOUT_S, routable
from cyphonic_agent.routes import Candidate

AGENT_VERSION = "0.1.0"

PING_UID = 0x4E4D_5350_494E_47  # "NMSPING": the uid of the NMS connection's PINGs
PING_ACK_TIMEOUT_S = 10.0
"""How long a PING to the NMS may go unacknowledged (QUIC retransmits a lost one); taken
out of the interval, so it does not lengthen the detection of a vanished NMS."""
NMS_IDLE_TIMEOUT_S = 60.0
"""The QUIC idle timeout offered on the NMS connection (the NMS's offline timeout, 45 s by
default, is what both sides use): PINGs every 25 s leave 20 s for one to be late or lost
and retransmitted, where the agent's peer timeout (30 s) would leave 5."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AgentFailed(Exception):
    """The agent cannot go on (bad state directory, refused by the AS, gave up)."""

    def __init__(self, error: CyphonicError) -> None:
        super().__init__(f"{error.code_name}: {error.message}")
        self.error = error


@dataclass
class NmsLink:
    """The open signalling connection to one NMS endpoint."""

    session: SignallingSession
    endpoint: Candidate
    keepalive_s: float
    sequence: int = 0
    ping: bool = False
    """Keep alive with QUIC PINGs (the NMS asked for them) rather than Keepalive requests."""


@dataclass
class NmsCounters:
    logins: int = 0
    registrations: int = 0
    nms_losses: int = 0


class NmsClient:
    """Login, register, keep alive; on loss back off and do it again, forever."""

    def __init__(
        self,
        *,
        settings: AgentSettings,
        state: AgentState,
        fqdn: str,
        domain: str,
        endpoint: Callable[[], QuicEndpoint],
        on_push: Callable[[pb.Envelope], None],
        on_registered: Callable[[pb.RegisterResponse, NmsLink], Awaitable[None]],
        local_endpoints: Callable[[Candidate], Awaitable[list[tuple[IPAddress, int]]]],
    ) -> None:
        self.settings = settings
        self.state = state
        self.fqdn = fqdn
        self.endpoint = endpoint
        self.on_push = on_push
        self.on_registered = on_registered
        self.local_endpoints = local_endpoints
        self.log = get_logger("agent", fqdn=fqdn)
        self.policy = Reconnect(
            max_delay_s=settings.reconnect_max_s, give_up_after_s=settings.give_up_after_s
        )
        self.counters = NmsCounters()
        self.server_name = f"nms.svc.{domain}"
        self.link: NmsLink | None = None
        self.status = "connecting"
        self.detail = ""
        self.registration: pb.RegisterResponse | None = None
        self.transport: StreamPaths | None = None
        self._silent: dict[Candidate, tuple[int, float]] = {}
        """Endpoints that did not answer a dial: how many times in a row, the last when."""
        """The TCP 443 fallback, if on (set by the agent; named in dial errors)."""

    def session(self) -> SignallingSession | None:
        """The open NMS session, if any (route requests, the relay's CID exchange)."""
        return self.link.session if self.link is not None else None

    async def run(self) -> None:
        """The control loop; raises ``AgentFailed`` when retrying cannot help."""
        loop = asyncio.get_running_loop()
        self.policy.started(now=loop.time())
        while True:
            link: NmsLink | None = None
            try:
                if self.policy.needs_login():
                    await self._login()
                link = await self._connect()
                await self.register(link)
                self.policy.registered()
                await self._keep_alive(link)
            except AuthError as exc:
                # Refused by the AS or the NMS for who we are: retrying will not help.
                self.status, self.detail = "disconnected", exc.message
                raise AgentFailed(exc) from exc
            except CyphonicError as exc:
                self.status, self.detail = "disconnected", exc.message
                self.log.warning("nms_unreachable", error=exc.message)
                decision = self.policy.lost(exc, now=loop.time())
                if isinstance(decision, GiveUp):
                    raise AgentFailed(exc) from exc
            else:  # pragma: no cover - _keep_alive only returns by raising
                decision = 0.0
            finally:
                self.link = None
                if link is not None:
                    # A refused registration (say, an overloaded NMS) must not leave its
                    # connection open there until the idle timeout.
                    link.session.close()
            self.status = "connecting"
            await asyncio.sleep(decision)

    def reconnect_now(self, link: NmsLink, why: CyphonicError) -> None:
        """Close ``link`` after a move; the loop dials again without a pause."""
        self.policy.reconnect_now = True
        link.session.close(why)

    async def dial(
        self,
        endpoints: list[Candidate],
        *,
        server_name: str,
        what: str,
        handler: Callable[..., Awaitable[Any]] | None = None,
        idle_timeout: float | None = None,
    ) -> tuple[SignallingSession, Candidate]:
        """A signalling session with the first of ``endpoints`` that answers (those that did
        not answer lately are tried later, ``answering_first``: a dead replica first in the
        list would cost every attempt of a reconnect storm its connect timeout). An endpoint
        that refuses as overloaded (``cyphonic.quic.refusal``) passes to the next, unless
        that one did not answer lately (a dead replica would cost the attempt its connect
        timeout, and the session ticket it offered); if none took us and one refused so,
        ``Overloaded`` with the shortest retry-after."""
        timeout = self.settings.connect_timeout_s
        tried: list[str] = []
        silent: list[str] = []
        overloaded: list[Overloaded] = []
        now = asyncio.get_running_loop().time()
        for ep in answering_first(endpoints, self._silent, now):
            if overloaded and is_silent(ep, self._silent, now):
                break
            if not routable(ep.host, ep.port):
                tried.append(f"{ep}: no route")
                continue
            try:
                conn = await self.endpoint().connect(
                    (ep.host, ep.port),
                    alpn=ALPN_SIGNALLING,
                    expect="service",
                    expected_name=server_name,
                    timeout=timeout,
                    handler_factory=SignallingSession.factory(handler),
                    idle_timeout=idle_timeout,
                )
            except Timeout:
                silent.append(str(ep))
                self._went_silent(ep)
                continue
            except AuthError:
                raise
            except CyphonicError as exc:
                tried.append(f"{ep}: {exc.message}")
                if isinstance(exc, Overloaded):
                    overloaded.append(exc)
                continue
            assert isinstance(conn.handler, SignallingSession)
            self._silent.pop(ep, None)
            return conn.handler, ep
        if not endpoints:
            raise Unavailable(f"no {what} endpoint is known")
        if overloaded:
            raise Overloaded(
                "; ".join(tried), retry_after_s=min(e.retry_after_s for e in overloaded)
            )
        reasons = list(tried)
        if silent:
            ports = sorted({parse_host_port(s)[1] for s in silent})
            port_text = "/".join(str(p) for p in ports)
            over = "UDP"
            if self.transport is not None:
                over = "UDP or TLS on TCP"
                if self.transport.last_error:
                    tried.append(f"TCP: {self.transport.last_error}")
            reasons.insert(
                0,
                f"cannot reach the {what} at {', '.join(silent)} over {over}: "
                f"no answer in {timeout:g} s; a firewall may be blocking "
                f"UDP {port_text}",
            )
            reasons[1:] = tried
        else:
            reasons.insert(0, f"cannot reach the {what}")
        raise Unavailable("; ".join(reasons))

    def _went_silent(self, ep: Candidate) -> None:
        """``ep`` did not answer (a dial, or PINGs on an open connection): dialled last."""
        times, _ = self._silent.get(ep, (0, 0.0))
        self._silent[ep] = (times + 1, asyncio.get_running_loop().time())

    async def _login(self) -> None:
        """Log in at the AS: learn the NMS endpoints and name."""
        raw = self.settings.as_endpoints or self.state.as_endpoints
        endpoints = [Candidate(*parse_host_port(e, default_port=443)) for e in raw]
        self.status, self.detail = "connecting", "logging in at the AS"
        session, where = await self.dial(
            endpoints, server_name=self.state.as_server_name, what="AS"
        )
        try:
            answer = await session.request(
                wrap(pb.LoginRequest(agent_version=AGENT_VERSION)), timeout=REQUEST_TIMEOUT_S
            )
            login = expect(answer, pb.LoginResponse)
        finally:
            session.close()
        if login.fqdn and login.fqdn.lower() != self.fqdn:
            raise PermissionDenied(
                f"the AS knows this certificate as {login.fqdn}, not {self.fqdn}"
            )
        if login.nms_server_name:
            self.server_name = login.nms_server_name
        self.counters.logins += 1
        nms = [Candidate.from_pb(e) for e in login.nms]
        self.log.info(
            "logged_in",
            as_endpoint=str(where),
            nms=[str(e) for e in nms],
            certificate_not_after_ms=login.certificate_not_after_ms,
        )
        self.policy.logged_in(nms)

    async def _connect(self) -> NmsLink:
        self.status, self.detail = "connecting", "connecting to the NMS"
        try:
            session, where = await self.dial(
                self.policy.nms_endpoints,
                server_name=self.server_name,
                what="NMS",
                handler=self._on_message,
                idle_timeout=max(NMS_IDLE_TIMEOUT_S, self.settings.peer_timeout_s),
            )
        except Overloaded:
            raise  # an NMS answered, busy: no reason to ask the AS again
        except CyphonicError:
            self.policy.dial_failed()
            raise
        self.policy.dialled()
        return NmsLink(session=session, endpoint=where, keepalive_s=15.0)

    async def register(self, link: NmsLink) -> None:
        """Register on ``link`` (first time, after a reconnection, or after a move)."""
        local = await self.local_endpoints(link.endpoint)
        request = pb.RegisterRequest(
            local_addresses=[pb.Endpoint(ip=ip.packed, port=port) for ip, port in local],
            reach_probes=True,
        )
        answer = await link.session.request(wrap(request), timeout=REQUEST_TIMEOUT_S)
        reg = expect(answer, pb.RegisterResponse)
        self.counters.registrations += 1
        # The idle timeout bounds the NMS connection: stay inside it (the NMS tells a PING
        # interval inside its own; a Keepalive request is not retried: a third of ours).
        link.ping = reg.ping_interval_ms > 0
        if link.ping:
            interval = reg.ping_interval_ms / 1000
            bound = max(NMS_IDLE_TIMEOUT_S, self.settings.peer_timeout_s) * 0.6
        else:
            interval = (reg.keepalive_interval_ms or 15000) / 1000
            bound = self.settings.peer_timeout_s / 3
        link.keepalive_s = max(0.5, min(interval, bound))
        self.link = link
        await self.on_registered(reg, link)  # bring-up, or the lease check; may raise
        self.registration = reg
        self.status = "connected"
        self.detail = str(link.endpoint)
        net = reg.network
        self.log.info(
            "registered",
            nms=str(link.endpoint),
            virtual_ipv4=_text(reg.virtual_ipv4),
            virtual_ipv6=_text(reg.virtual_ipv6),
            behind_nat=net.behind_nat,
            has_ipv4=net.has_ipv4,
            has_ipv6=net.has_ipv6,
            reported=[format_host_port(str(ip), port) for ip, port in local],
            keepalive_s=link.keepalive_s,
            ping=link.ping,
        )

    async def reregister(self, link: NmsLink) -> None:
        """After a move: register again on the open connection, or have the loop reconnect."""
        try:
            await self.register(link)
        except CyphonicError as exc:
            self.log.warning("reregister_failed", error=exc.message)
            self.reconnect_now(link, exc)
        except AgentFailed as exc:
            # Another deployment answered; the control loop meets it again and stops.
            self.log.error("reregister_refused", error=str(exc))
            link.session.close(exc.error)

    async def _keep_alive(self, link: NmsLink) -> None:
        """Keep alive at the NMS's interval until the connection is lost (raises why)."""
        lost = asyncio.ensure_future(link.session.wait_closed())

        async def wait(seconds: float) -> None:
            done, _ = await asyncio.wait({lost}, timeout=seconds)
            if done:
                self.counters.nms_losses += 1
                raise lost.result() or Unavailable("the NMS connection closed")

        try:
            while True:
                if link.ping:
                    ack_wait = min(PING_ACK_TIMEOUT_S, link.keepalive_s / 2)
                    await wait(link.keepalive_s - ack_wait)
                    await self._ping(link, wait, ack_wait)
                    continue
                await wait(link.keepalive_s)
                link.sequence += 1
                try:
                    answer = await link.session.request(
                        wrap(pb.Keepalive(sequence=link.sequence)),
                        timeout=min(REQUEST_TIMEOUT_S, link.keepalive_s * 2),
                    )
                    expect(answer, pb.KeepaliveAck)
                except Timeout as exc:
                    self.counters.nms_losses += 1
                    self._went_silent(link.endpoint)
                    link.session.close(exc)
                    raise Unavailable(f"the NMS at {link.endpoint} stopped answering") from exc
        finally:
            lost.cancel()

    async def _ping(
        self, link: NmsLink, wait: Callable[[float], Awaitable[None]], ack_wait: float
    ) -> None:
        """One QUIC PING on the NMS connection; ``Unavailable`` if not acknowledged in time."""
        conn = link.session.connection
        sent = asyncio.get_running_loop().time()
        conn.quic.send_ping(PING_UID)
        conn.transmit()
        await wait(ack_wait)
        if (conn.ping_acked_at or 0.0) < sent:
            self.counters.nms_losses += 1
            # Dial another endpoint first: a dead replica would cost the next dial its
            # connect timeout (and the session ticket it offered).
            self._went_silent(link.endpoint)
            error = Unavailable(f"the NMS at {link.endpoint} stopped answering")
            link.session.close(error)
            raise error

    async def _on_message(
        self, message: pb.Envelope, _session: SignallingSession
    ) -> pb.Envelope | None:
        """Pushes from the NMS, handed to the agent."""
        body = message.WhichOneof("body")
        if body not in (
            "route_direction",
            "peer_offline",
            "relay_cids",
            "revocation_notice",
            "policy_filter",
        ):
            raise UnexpectedMessage(f"the agent does not take {body} from the NMS")
        self.on_push(message)
        return None


SILENT_FOR_S = 60.0
"""How long an endpoint that did not answer a dial is tried after the others."""


def answering_first(
    endpoints: list[Candidate], silent: dict[Candidate, tuple[int, float]], now: float
) -> list[Candidate]:
    """``endpoints`` by how many dials in a row each left unanswered (``silent``: count, last
    time; forgotten ``SILENT_FOR_S`` after the last), then in their order. A dead replica
    goes on counting; a live one that was only too busy to answer once answers again and
    its count is dropped."""

    return sorted(endpoints, key=lambda ep: _silent_count(ep, silent, now))


def is_silent(ep: Candidate, silent: dict[Candidate, tuple[int, float]], now: float) -> bool:
    """Whether ``ep`` left a dial or its PINGs unanswered within ``SILENT_FOR_S``."""
    return _silent_count(ep, silent, now) > 0


def _silent_count(ep: Candidate, silent: dict[Candidate, tuple[int, float]], now: float) -> int:
    count, at = silent.get(ep, (0, 0.0))
    return count if now - at < SILENT_FOR_S else 0


def _text(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw)) if raw else ""
