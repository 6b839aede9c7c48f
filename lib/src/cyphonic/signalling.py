"""Signalling over a QUIC connection, sans-I/O: the way aioquic's H3Connection sits on QUIC.

Protocol flow (one bidirectional stream per exchange, one frame per direction)::

    request (client opens)                      push (server opens)
    client                     server           server                     client
      |-- stream N: request, FIN -->|              |-- stream M: notice, FIN -->|
      |<-- stream N: answer, FIN ---|              |<-- stream M: FIN ----------|
         answer: the body TRANSITIONS names,          no answer: the receiver only ends
         or an Error                                  its half, so both can free the stream

``TRANSITIONS`` below is the whole rule book. Anything it does not allow (an answer on a
stream with no request, a second message on a stream, bytes after the one frame, an
answer of the wrong type, a client sending a push, an Error opening a stream, a stream
that ends before its message) is a protocol error detected here: this side answers the
peer on that stream with a typed ``Error`` frame and ends its half when its half is still
open; when it is not, it sends STOP_SENDING with the ``ErrorCode`` as the application
error code. Then it forgets the stream and reports ``ProtocolErrorDetected``. The same
happens for bytes that do not decode (``cyphonic.wire.framing``) and for a stream opened
beyond ``max_incoming_streams`` (``Exhausted``). The connection itself stays up.

Stream state lives only while the stream does: it is deleted once both halves have ended
(FIN or reset). Peer streams this side asked to stop are remembered by ID alone until the
peer's half ends, so that their late bytes are not taken for a new request.

Usage, with the QUIC connection's owner doing the I/O::

    signalling = SignallingConnection(quic)
    for quic_event in ...:                        # every event of this QuicConnection
        for event in signalling.handle_event(quic_event):
            ...                                   # RequestReceived, ResponseReceived, ...
    stream_id = signalling.send_request(wrap(pb.LoginRequest(agent_version="1")))
    signalling.send_response(request.stream_id, wrap(pb.LoginResponse(...)))
    # then transmit: quic.datagrams_to_send(now)
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from aioquic.quic.connection import (
    QuicConnection,
    stream_is_client_initiated,
    stream_is_unidirectional,
)
from aioquic.quic.events import (
    ConnectionTerminated,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from google.protobuf.message import Message

from cyphonic.errors import (
    CyphonicError,
    Exhausted,
    ProtocolError,
    RemoteError,
    UnexpectedMessage,
    from_wire,
)
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.framing import MAX_MESSAGE_SIZE, FrameDecoder, check_envelope, encode_frame
from cyphonic.wire.messages import BODY_FIELDS, wrap

__all__ = [
    "ERROR_BODY",
    "MAX_INCOMING_STREAMS",
    "ONE_WAY",
    "TRANSITIONS",
    "ErrorReceived",
    "Opener",
    "ProtocolErrorDetected",
    "RequestReceived",
    "ResponseReceived",
    "SignallingConnection",
    "SignallingEvent",
]

MAX_INCOMING_STREAMS: Final = 64
"""Default bound on peer-opened streams with state at once (requests not yet answered)."""


class Opener(enum.Enum):
    """Which role opened a stream: a client sends requests, a server pushes notices."""

    CLIENT = "client"
    SERVER = "server"


ONE_WAY: Final[frozenset[str]] = frozenset()
"""Answer set of a push: nothing answers it, the opener ends the stream with the frame."""

ERROR_BODY: Final = "error"
"""The body that may answer any request instead of its response; it never opens a stream."""

TRANSITIONS: Final[Mapping[tuple[Opener, str], frozenset[str]]] = MappingProxyType(
    {
        # (who opens the stream, body of its frame) -> bodies that may answer it (or an Error)
        (Opener.CLIENT, "login_request"): frozenset({"login_response"}),
        (Opener.CLIENT, "renew_request"): frozenset({"renew_response"}),
        (Opener.CLIENT, "crl_request"): frozenset({"crl_response"}),
        (Opener.CLIENT, "register_request"): frozenset({"register_response"}),
        (Opener.CLIENT, "keepalive"): frozenset({"keepalive_ack"}),
        (Opener.CLIENT, "route_request"): frozenset({"route_response"}),
        (Opener.CLIENT, "tunnel_request"): frozenset({"tunnel_response"}),
        (Opener.CLIENT, "relay_allocation_request"): frozenset({"relay_allocation"}),
        # a node hands its relay CIDs to the NMS; the echo acknowledges that the NMS took them
        (Opener.CLIENT, "relay_cids"): frozenset({"relay_cids"}),
        # pushes: one frame, then the server ends the stream and expects nothing back
        (Opener.SERVER, "route_direction"): ONE_WAY,
        (Opener.SERVER, "peer_offline"): ONE_WAY,
        (Opener.SERVER, "revocation_notice"): ONE_WAY,
        (Opener.SERVER, "relay_cids"): ONE_WAY,
        # the compiled access-policy filter for this node (docs/policy.md)
        (Opener.SERVER, "policy_filter"): ONE_WAY,
    }
)

# A misspelt body name in the table would silently forbid a message: refuse it at import.
assert all(
    name in BODY_FIELDS.values() and answers <= set(BODY_FIELDS.values())
    for (_, name), answers in TRANSITIONS.items()
), "TRANSITIONS names a body that Envelope does not have"


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignallingEvent:
    """Base class of what ``SignallingConnection.handle_event`` reports."""

    stream_id: int


@dataclass(frozen=True)
class RequestReceived(SignallingEvent):
    """The peer opened a stream with ``message``.

    ``pushed`` is True for a one-way notice from the server: nothing may answer it and this
    side has already ended its half. Otherwise answer with ``send_response``/``send_error``.
    """

    message: pb.Envelope
    pushed: bool


@dataclass(frozen=True)
class ResponseReceived(SignallingEvent):
    """The answer to this side's request on ``stream_id``."""

    message: pb.Envelope


@dataclass(frozen=True)
class ErrorReceived(SignallingEvent):
    """The peer answered this side's request with an Error (or reset the stream with a code)."""

    error: CyphonicError


@dataclass(frozen=True)
class ProtocolErrorDetected(SignallingEvent):
    """This side refused what the peer sent on ``stream_id``.

    The peer has already been told (an Error frame, or STOP_SENDING with the code) and the
    stream is forgotten; a request on it, if one was pending, will get no answer.
    """

    error: CyphonicError


# -- per-stream state ---------------------------------------------------------------------


class _Phase(enum.Enum):
    AWAIT_REQUEST = enum.auto()  # peer-opened stream, its frame not complete yet
    AWAIT_LOCAL_ANSWER = enum.auto()  # request delivered; the application owes the answer
    AWAIT_REMOTE_ANSWER = enum.auto()  # this side's request sent; the peer owes the answer
    EXCHANGED = enum.auto()  # the one exchange is over; only the halves' ends remain


@dataclass(slots=True)
class _Stream:
    incoming: bool
    phase: _Phase
    decoder: FrameDecoder
    request: str = ""
    answers: frozenset[str] = ONE_WAY
    local_done: bool = False  # this side sent FIN or reset (or the peer made it reset)
    remote_done: bool = False  # the peer's FIN or reset arrived


# -- the connection -----------------------------------------------------------------------


class SignallingConnection:
    """Signalling requests, answers and pushes on one ``QuicConnection``; no I/O here.

    Feed every event of the QUIC connection to ``handle_event``; after any call, the owner
    transmits what the QUIC connection has queued. The role (client or server) is the
    QUIC connection's.
    """

    def __init__(
        self,
        quic: QuicConnection,
        *,
        max_incoming_streams: int = MAX_INCOMING_STREAMS,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        self._quic = quic
        self._is_client = bool(quic.configuration.is_client)
        self._local = Opener.CLIENT if self._is_client else Opener.SERVER
        self._peer = Opener.SERVER if self._is_client else Opener.CLIENT
        self.max_incoming_streams = max_incoming_streams
        self.max_message_size = max_message_size
        self._streams: dict[int, _Stream] = {}
        self._incoming = 0
        self._stopped: set[int] = set()  # peer streams told to stop, until their half ends

    # -- introspection

    @property
    def open_streams(self) -> int:
        """Streams with state, both directions (0 once every exchange has finished)."""
        return len(self._streams)

    @property
    def incoming_streams(self) -> int:
        """Peer-opened streams with state; bounded by ``max_incoming_streams``."""
        return self._incoming

    # -- sending

    def send_request(self, body: pb.Envelope | Message) -> int:
        """Open a stream with one frame and end this side's half; return the stream ID.

        ``body`` is an envelope or a body message (wrapped). A client sends requests, a
        server pushes notices; anything ``TRANSITIONS`` does not allow this role to open
        raises ``UnexpectedMessage`` and sends nothing. Also raises what ``encode_frame``
        raises.
        """
        envelope = body if isinstance(body, pb.Envelope) else wrap(body)
        name = check_envelope(envelope)
        answers = TRANSITIONS.get((self._local, name))
        if answers is None:
            raise UnexpectedMessage(f"a {self._local.value} cannot open a stream with {name}")
        frame = encode_frame(envelope, max_message_size=self.max_message_size)
        stream_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(stream_id, frame, end_stream=True)
        self._streams[stream_id] = _Stream(
            incoming=False,
            phase=_Phase.AWAIT_REMOTE_ANSWER if answers else _Phase.EXCHANGED,
            decoder=FrameDecoder(max_message_size=self.max_message_size),
            request=name,
            answers=answers,
            local_done=True,
        )
        return stream_id

    def send_response(self, stream_id: int, body: pb.Envelope | Message) -> bool:
        """Answer the request received on ``stream_id`` with one frame and end the stream.

        Returns False, sending nothing, when the stream no longer waits for an answer from
        this side (the peer reset or stopped it, it was a push, it was refused, or it was
        answered already). A body that does not answer the request (see ``TRANSITIONS``;
        an Error always does) raises ``UnexpectedMessage`` and changes nothing.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.phase is not _Phase.AWAIT_LOCAL_ANSWER:
            return False
        envelope = body if isinstance(body, pb.Envelope) else wrap(body)
        name = check_envelope(envelope)
        if name != ERROR_BODY and name not in stream.answers:
            raise UnexpectedMessage(f"{name} does not answer {stream.request}")
        frame = encode_frame(envelope, max_message_size=self.max_message_size)
        stream.phase = _Phase.EXCHANGED
        sent = self._end_half(stream_id, stream, frame)
        self._forget_if_done(stream_id, stream)
        return sent

    def send_error(self, stream_id: int, exc: CyphonicError) -> bool:
        """Answer the request on ``stream_id`` with ``exc`` as a typed Error; see
        ``send_response`` for the return value."""
        return self.send_response(stream_id, wrap(exc.to_wire()))

    def cancel_request(self, stream_id: int, exc: CyphonicError) -> bool:
        """Give up waiting for the answer to this side's request (e.g. after a timeout).

        Asks the peer to stop sending (STOP_SENDING with ``exc``'s code) and forgets the
        stream; returns False when no answer was pending on it.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.phase is not _Phase.AWAIT_REMOTE_ANSWER:
            return False
        if not stream.remote_done:
            self._stop(stream_id, _app_code(exc))
        self._forget(stream_id, stream)
        return True

    # -- receiving

    def handle_event(self, event: QuicEvent) -> list[SignallingEvent]:
        """Feed one QUIC event; return what it means for signalling (often nothing)."""
        if isinstance(event, StreamDataReceived):
            return self._on_data(event)
        if isinstance(event, StreamReset):
            return self._on_reset(event)
        if isinstance(event, StopSendingReceived):
            self._on_stop_sending(event)
        elif isinstance(event, ConnectionTerminated):
            self._streams.clear()
            self._stopped.clear()
            self._incoming = 0
        return []

    def _on_data(self, event: StreamDataReceived) -> list[SignallingEvent]:
        stream_id = event.stream_id
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._is_local(stream_id):
                return []  # a late byte of an exchange this side already closed
            if stream_id in self._stopped:
                if event.end_stream:
                    self._stopped.discard(stream_id)
                return []
            if stream_is_unidirectional(stream_id):
                # nothing can be answered on it: stop it, with the code
                if not event.end_stream:
                    self._stop(stream_id, pb.ERROR_CODE_UNEXPECTED_MESSAGE)
                return [
                    ProtocolErrorDetected(
                        stream_id, UnexpectedMessage("unidirectional streams are not used")
                    )
                ]
            stream = self._open_incoming(stream_id)
            if self._incoming > self.max_incoming_streams:
                stream.remote_done = event.end_stream
                return [
                    self._abort(
                        stream_id,
                        stream,
                        Exhausted(f"more than {self.max_incoming_streams} request streams open"),
                    )
                ]

        if event.end_stream:
            stream.remote_done = True
        events: list[SignallingEvent] = []
        try:
            for envelope in stream.decoder.feed(event.data):
                events.append(self._on_message(stream_id, stream, envelope))
            if event.end_stream:
                stream.decoder.end_of_stream()
                if stream.phase is _Phase.AWAIT_REQUEST:
                    raise UnexpectedMessage("stream ended before its request")
                if stream.phase is _Phase.AWAIT_REMOTE_ANSWER:
                    raise UnexpectedMessage(f"stream ended without an answer to {stream.request}")
        except ProtocolError as exc:
            events.append(self._abort(stream_id, stream, exc))
            return events
        self._forget_if_done(stream_id, stream)
        return events

    def _on_message(
        self, stream_id: int, stream: _Stream, envelope: pb.Envelope
    ) -> SignallingEvent:
        name = envelope.WhichOneof("body") or ""  # never empty: the decoder checked it
        if stream.phase is _Phase.AWAIT_REQUEST:
            if name == ERROR_BODY:
                raise UnexpectedMessage("an Error cannot open a stream")
            answers = TRANSITIONS.get((self._peer, name))
            if answers is None:
                if (self._local, name) in TRANSITIONS:
                    raise UnexpectedMessage(
                        f"a {self._peer.value} cannot open a stream with {name}"
                    )
                raise UnexpectedMessage(f"{name} cannot open a stream")
            stream.request = name
            stream.answers = answers
            if answers:
                stream.phase = _Phase.AWAIT_LOCAL_ANSWER
                return RequestReceived(stream_id, envelope, pushed=False)
            # a push: end this side's half now so that both sides can free the stream
            stream.phase = _Phase.EXCHANGED
            self._end_half(stream_id, stream, b"")
            return RequestReceived(stream_id, envelope, pushed=True)
        if stream.phase is _Phase.AWAIT_REMOTE_ANSWER:
            stream.phase = _Phase.EXCHANGED
            if name == ERROR_BODY:
                return ErrorReceived(stream_id, from_wire(envelope.error))
            if name in stream.answers:
                return ResponseReceived(stream_id, envelope)
            raise UnexpectedMessage(f"{name} does not answer {stream.request}")
        if not stream.incoming and not stream.answers:
            raise UnexpectedMessage(f"{name} sent back on the push {stream.request}")
        what = "request" if stream.incoming else "answer"
        raise UnexpectedMessage(f"{name} after the {what} on stream {stream_id}")

    def _on_reset(self, event: StreamReset) -> list[SignallingEvent]:
        stream_id = event.stream_id
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id in self._stopped:
                self._stopped.discard(stream_id)  # this side's half was ended when it stopped
            elif not self._is_local(stream_id) and not stream_is_unidirectional(stream_id):
                # opened and reset by the peer before any byte: end this side's half too
                self._quic.reset_stream(stream_id, pb.ERROR_CODE_UNSPECIFIED)
            return []
        stream.remote_done = True
        events: list[SignallingEvent] = []
        if stream.phase is _Phase.AWAIT_REMOTE_ANSWER:
            events.append(ErrorReceived(stream_id, _reset_error(event.error_code)))
        if not stream.local_done:
            # the peer withdrew its request: the answer would go nowhere
            self._quic.reset_stream(stream_id, pb.ERROR_CODE_UNSPECIFIED)
            stream.local_done = True
        self._forget(stream_id, stream)
        return events

    def _on_stop_sending(self, event: StopSendingReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        # aioquic has already reset this side's half; an answer would not be read
        stream.local_done = True
        if stream.phase is _Phase.AWAIT_LOCAL_ANSWER:
            stream.phase = _Phase.EXCHANGED
        self._forget_if_done(event.stream_id, stream)

    # -- helpers

    def _is_local(self, stream_id: int) -> bool:
        return stream_is_client_initiated(stream_id) == self._is_client

    def _open_incoming(self, stream_id: int) -> _Stream:
        stream = _Stream(
            incoming=True,
            phase=_Phase.AWAIT_REQUEST,
            decoder=FrameDecoder(max_message_size=self.max_message_size),
        )
        self._streams[stream_id] = stream
        self._incoming += 1
        return stream

    def _abort(self, stream_id: int, stream: _Stream, exc: CyphonicError) -> ProtocolErrorDetected:
        """Tell the peer why (Error frame or STOP_SENDING code), then forget the stream."""
        if not stream.local_done:
            frame = encode_frame(wrap(exc.to_wire()), max_message_size=self.max_message_size)
            self._end_half(stream_id, stream, frame)
        if not stream.remote_done:
            self._stop(stream_id, _app_code(exc))
        self._forget(stream_id, stream)
        return ProtocolErrorDetected(stream_id, exc)

    def _end_half(self, stream_id: int, stream: _Stream, data: bytes) -> bool:
        """Send ``data`` and FIN unless this side's half is over; True if it was sent."""
        if stream.local_done:
            return False
        stream.local_done = True
        try:
            self._quic.send_stream_data(stream_id, data, end_stream=True)
        except (RuntimeError, ValueError):
            # aioquic applies a peer's STOP_SENDING (resetting this half) while it parses
            # the packet, before StopSendingReceived reaches us, and may even have discarded
            # the finished stream by then: either way the half is already over
            return False
        return True

    def _stop(self, stream_id: int, code: int) -> None:
        # ValueError: aioquic already discarded the stream, so nothing is left to stop
        with contextlib.suppress(ValueError):
            self._quic.stop_stream(stream_id, code)
        if not self._is_local(stream_id):
            self._stopped.add(stream_id)

    def _forget_if_done(self, stream_id: int, stream: _Stream) -> None:
        if stream.local_done and stream.remote_done:
            self._forget(stream_id, stream)

    def _forget(self, stream_id: int, stream: _Stream) -> None:
        if self._streams.pop(stream_id, None) is not None and stream.incoming:
            self._incoming -= 1


def _app_code(exc: CyphonicError) -> int:
    """The QUIC application error code for ``exc``: its wire ``ErrorCode``."""
    return exc.remote_code if isinstance(exc, RemoteError) else int(exc.code)


def _reset_error(code: int) -> CyphonicError:
    """The error a peer's RESET_STREAM code stands for (codes are ``ErrorCode`` values)."""
    message = f"stream reset by the peer (code {code})"
    if 0 < code < 2**31:
        return from_wire(pb.Error(code=code, message=message))  # type: ignore[arg-type]
    return RemoteError(code, message)
