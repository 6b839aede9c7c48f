"""Asyncio signalling session: ``SignallingConnection`` (sans-I/O) on an endpoint connection.

    session = SignallingSession(conn, handler=handle)     # or SignallingSession.factory(...)
    answer = await session.request(envelope, timeout=5)  # one bidi stream per request
    await session.push(envelope)                         # a notice on a stream we open

    async def handle(message, session) -> Envelope | None  # incoming requests and pushes

A handler's ``CyphonicError`` becomes a typed Error answer; any other exception becomes
INTERNAL (and is logged). For a push (``RequestReceived.pushed``) the handler's result is
ignored: nothing answers a push. A request the handler answers with ``None`` gets INTERNAL.
The session is the connection's ``ConnectionHandler``: the endpoint feeds it QUIC events
only after the peer was verified, so ``session.peer`` is always set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aioquic.quic.events import QuicEvent
from google.protobuf.message import Message

from cyphonic.errors import (
    CyphonicError,
    InternalError,
    Timeout,
    Unavailable,
    UnexpectedMessage,
)
from cyphonic.pki import PeerIdentity
from cyphonic.quic import Connection
from cyphonic.signalling import (
    ErrorReceived,
    ProtocolErrorDetected,
    RequestReceived,
    ResponseReceived,
    SignallingConnection,
)
from cyphonic.v1 import signalling_pb2 as pb

__all__ = ["RequestHandler", "SignallingSession"]

RequestHandler = Callable[
    [pb.Envelope, "SignallingSession"], Awaitable[pb.Envelope | Message | None]
]
"""Answers one request (an envelope or a body message); for a push the result is ignored."""

DEFAULT_TIMEOUT = 10.0


class SignallingSession:
    """Requests, answers and pushes over one verified QUIC connection."""

    def __init__(
        self,
        connection: Connection,
        *,
        handler: RequestHandler | None = None,
        on_lost: Callable[[SignallingSession, CyphonicError | None], None] | None = None,
    ) -> None:
        self.connection = connection
        self.signalling = SignallingConnection(connection.quic)
        self.handler = handler
        self.on_lost = on_lost
        self._pending: dict[int, asyncio.Future[pb.Envelope]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lost: asyncio.Future[CyphonicError | None] = (
            asyncio.get_running_loop().create_future()
        )
        self.log = connection.log.bind(component="session")

    @classmethod
    def factory(
        cls,
        handler: RequestHandler | None = None,
        *,
        on_open: Callable[[SignallingSession], None] | None = None,
        on_lost: Callable[[SignallingSession, CyphonicError | None], None] | None = None,
    ) -> Callable[[Connection], SignallingSession]:
        """A handler factory for ``QuicEndpoint`` (``accept=`` or ``connect()``)."""

        def make(connection: Connection) -> SignallingSession:
            session = cls(connection, handler=handler, on_lost=on_lost)
            if on_open is not None:
                on_open(session)
            return session

        return make

    # -- public API

    @property
    def peer(self) -> PeerIdentity:
        """The verified peer."""
        peer = self.connection.peer
        assert peer is not None, "sessions exist only on verified connections"
        return peer

    @property
    def is_open(self) -> bool:
        """False once the connection has begun to close."""
        return not self.connection.is_closed

    async def request(
        self,
        body: pb.Envelope | Message,
        *,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - part of the API
    ) -> pb.Envelope:
        """Send a request (an envelope or a body message) on a new stream; return the answer.

        Raises the peer's Error as its ``CyphonicError`` class, a protocol error this side
        detected in the answer, ``Timeout`` when no answer comes in time (the stream is
        then cancelled), or why the connection ended.
        """
        self._check_open()
        stream_id = self.signalling.send_request(body)
        future: asyncio.Future[pb.Envelope] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        self.connection.transmit()
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError as exc:
            error = Timeout(f"no answer from {self.peer.name} within {timeout}s")
            if self.signalling.cancel_request(stream_id, error):
                self.connection.transmit()
            raise error from exc
        finally:
            self._pending.pop(stream_id, None)

    async def push(self, body: pb.Envelope | Message) -> None:
        """Send a one-way notice on a new stream (server side); nothing answers it."""
        self._check_open()
        self.signalling.send_request(body)
        self.connection.transmit()

    def close(self, error: CyphonicError | None = None) -> None:
        """Close the connection; ``error`` (if any) is sent to the peer as the reason."""
        if error is None:
            self.connection.close("closed")
        else:
            self.connection.close(f"{error.code_name}: {error.message}", error_code=int(error.code))

    async def wait_closed(self) -> CyphonicError | None:
        """Wait until the connection has ended; returns why (None: closed by this side)."""
        return await asyncio.shield(self._lost)

    # -- ConnectionHandler

    def quic_event_received(self, event: QuicEvent) -> None:
        """Feed one QUIC event through the signalling state machine."""
        for sig_event in self.signalling.handle_event(event):
            if isinstance(sig_event, ResponseReceived):
                future = self._pending.get(sig_event.stream_id)
                if future is not None and not future.done():
                    future.set_result(sig_event.message)
            elif isinstance(sig_event, ErrorReceived | ProtocolErrorDetected):
                future = self._pending.get(sig_event.stream_id)
                if future is not None and not future.done():
                    future.set_exception(sig_event.error)
                if isinstance(sig_event, ProtocolErrorDetected):
                    self.log.warning(
                        "signalling_protocol_error",
                        stream_id=sig_event.stream_id,
                        error=str(sig_event.error),
                    )
            elif isinstance(sig_event, RequestReceived):
                self._spawn(self._answer(sig_event))
        self.connection.transmit()

    def connection_lost(self, error: CyphonicError | None) -> None:
        """Fail every pending request and stop the handler tasks."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error or Unavailable("connection closed"))
        self._pending.clear()
        for task in self._tasks:
            task.cancel()
        if not self._lost.done():
            self._lost.set_result(error)
        if self.on_lost is not None:
            try:
                self.on_lost(self, error)
            except Exception as exc:
                self.log.exception("on_lost_failed", error=repr(exc))

    # -- internals

    def _check_open(self) -> None:
        if self.connection.is_closed:
            raise self.connection.error or Unavailable("connection is closed")

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, event: RequestReceived) -> None:
        body = event.message.WhichOneof("body")
        if self.handler is None:
            if not event.pushed:
                self._send_error(event.stream_id, UnexpectedMessage(f"{body} is not served here"))
            return
        try:
            answer = await self.handler(event.message, self)
        except asyncio.CancelledError:
            raise
        except CyphonicError as exc:
            if event.pushed:
                self.log.info("push_refused", body=body, error=str(exc))
            self._send_error(event.stream_id, exc)
            return
        except Exception as exc:
            self.log.exception("request_handler_failed", error=repr(exc), body=body)
            self._send_error(event.stream_id, InternalError("internal error"))
            return
        if answer is None or event.pushed:
            if not event.pushed:
                self.log.warning("request_unanswered", body=body)
                self._send_error(event.stream_id, InternalError("no answer"))
            return
        if self.connection.is_closed:
            return
        try:
            self.signalling.send_response(event.stream_id, answer)
        except CyphonicError as exc:  # e.g. a response of the wrong type: a bug here
            self.log.error("bad_response", body=body, error=str(exc))
            self.signalling.send_error(event.stream_id, InternalError("internal error"))
        self.connection.transmit()

    def _send_error(self, stream_id: int, exc: CyphonicError) -> None:
        # send_error sends nothing for pushes and streams the peer gave up on.
        if not self.connection.is_closed and self.signalling.send_error(stream_id, exc):
            self.connection.transmit()
