"""Length-delimited frames, one ``pb.Envelope`` each, as carried on a signalling stream.

Frame layout (all integers big-endian)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +---------------------------------------------------------------+
    |                     Length (32 bits, unsigned)                |  OFF_LENGTH
    +---------------------------------------------------------------+
    |            Envelope (protobuf, exactly Length bytes)         ...  OFF_ENVELOPE
    +---------------------------------------------------------------+

``Length`` counts the envelope bytes only (not the prefix) and may be at most
``MAX_MESSAGE_SIZE``; a larger value is refused as soon as the four prefix bytes are in,
before any byte of the body is buffered. A stream carries whole frames back to back; the
end of the stream must fall on a frame boundary.

Which envelopes are accepted (checked in this order, first failure wins):

1. the bytes parse as an ``Envelope``                    else ``MalformedMessage``
2. no known field arrives with a foreign wire type       else ``MalformedMessage``
3. ``version`` is ``PROTOCOL_VERSION_1``                 else ``UnsupportedVersion``
4. no unknown field at the envelope's top level          else ``UnknownMessage``
   (a newer peer's body type: the ``body`` oneof is the only place the envelope grows)
5. the ``body`` oneof is set                             else ``UnknownMessage``

Unknown fields *inside* a known body are discarded, not refused: adding a field to a
message is the compatible kind of change that does not bump the protocol version (see the
evolution rules in the .proto). Discarding them also means a message relayed onwards never
carries bytes this side did not understand. Field contents (address lengths, ports, ...)
are checked by the code that uses them, with the helpers in ``cyphonic.wire.messages``.
"""

from __future__ import annotations

from typing import Final

from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from cyphonic.errors import (
    MalformedMessage,
    OversizedMessage,
    ProtocolError,
    UnknownMessage,
    UnsupportedVersion,
)
from cyphonic.v1 import signalling_pb2 as pb

__all__ = [
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "FrameDecoder",
    "check_envelope",
    "decode_envelope",
    "encode_frame",
]

OFF_LENGTH: Final = 0
OFF_ENVELOPE: Final = 4
HEADER_SIZE: Final = OFF_ENVELOPE
"""Bytes before the envelope: the 32-bit length."""

MAX_MESSAGE_SIZE: Final = 64 * 1024
"""Hard limit on one envelope's encoded size, in bytes (the prefix not counted)."""

PROTOCOL_VERSION: Final = pb.PROTOCOL_VERSION_1
"""The only version this code speaks; every envelope sent or accepted carries it."""

_FIELD_TYPES: Final[dict[int, int]] = {
    # field number -> protobuf wire type it must use (0 varint, 2 length-delimited)
    field.number: 0 if field.type == field.TYPE_ENUM else 2
    for field in pb.Envelope.DESCRIPTOR.fields
}


def check_envelope(envelope: pb.Envelope) -> str:
    """Check version and body of an envelope; return the name of its body field.

    Raises ``UnsupportedVersion`` or ``UnknownMessage`` (no body).
    """
    _check_version(envelope)
    body = envelope.WhichOneof("body")
    if body is None:
        raise UnknownMessage("envelope without a body")
    return body


def _check_version(envelope: pb.Envelope) -> None:
    if envelope.version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {int(envelope.version)} is not supported "
            f"(this side speaks {int(PROTOCOL_VERSION)})"
        )


def decode_envelope(data: bytes | bytearray | memoryview) -> pb.Envelope:
    """Parse and check one envelope (the bytes of a frame, prefix removed).

    Raises a ``ProtocolError`` subclass and nothing else; see the module docstring.
    """
    envelope = pb.Envelope()
    try:
        envelope.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise MalformedMessage("envelope does not parse") from exc
    except Exception as exc:  # untrusted bytes: whatever else the parser raises is ours too
        raise MalformedMessage("envelope does not parse") from exc
    fields = UnknownFieldSet(envelope)
    unknown = [(fields[i].field_number, fields[i].wire_type) for i in range(len(fields))]
    for number, wire_type in unknown:
        expected = _FIELD_TYPES.get(number)
        if expected is not None and expected != wire_type:
            raise MalformedMessage(f"envelope field {number} has wire type {wire_type}")
    _check_version(envelope)
    if unknown:
        raise UnknownMessage(f"unknown envelope field {unknown[0][0]}")
    check_envelope(envelope)
    envelope.DiscardUnknownFields()
    return envelope


def encode_frame(envelope: pb.Envelope, *, max_message_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """One frame for ``envelope``: length prefix, then the envelope.

    The envelope must pass the checks a receiver applies (version, body), so that this side
    never sends what it would refuse; raises ``UnsupportedVersion``, ``UnknownMessage`` or
    ``OversizedMessage``.
    """
    check_envelope(envelope)
    payload = envelope.SerializeToString()
    if len(payload) > max_message_size:
        raise OversizedMessage(
            f"envelope of {len(payload)} bytes is above the limit of {max_message_size}"
        )
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


class FrameDecoder:
    """Turns the bytes of one stream into envelopes; sans-I/O, one instance per stream.

    Never holds more than ``HEADER_SIZE + max_message_size`` bytes. After it has raised
    once, the stream is beyond repair and every later call raises ``MalformedMessage``.
    """

    def __init__(self, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._need: int | None = None  # envelope length once the prefix is in
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buffer)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is held (the stream may end here)."""
        return self._need is None and not self._buffer

    def feed(self, data: bytes | bytearray | memoryview) -> list[pb.Envelope]:
        """Add stream bytes; return the envelopes completed by them, in order.

        Raises a ``ProtocolError`` subclass for an oversized length prefix or an envelope
        that fails the checks; envelopes completed earlier in the same call are dropped
        with the stream.
        """
        if self._failed:
            raise MalformedMessage("the stream already failed to decode")
        try:
            return self._feed(memoryview(data).cast("B"))
        except ProtocolError:
            self._fail()
            raise

    def end_of_stream(self) -> None:
        """The stream ended; raises ``MalformedMessage`` when a frame was cut short."""
        if self._failed:
            raise MalformedMessage("the stream already failed to decode")
        if not self.at_boundary:
            held = len(self._buffer)
            self._fail()
            raise MalformedMessage(f"stream ended inside a frame ({held} bytes held)")

    def _feed(self, view: memoryview) -> list[pb.Envelope]:
        out: list[pb.Envelope] = []
        buffer = self._buffer
        while True:
            if self._need is None:
                take = min(HEADER_SIZE - len(buffer), len(view))
                buffer += view[:take]
                view = view[take:]
                if len(buffer) < HEADER_SIZE:
                    return out
                length = int.from_bytes(buffer[OFF_LENGTH:OFF_ENVELOPE], "big")
                buffer.clear()
                if length > self.max_message_size:
                    raise OversizedMessage(
                        f"frame of {length} bytes announced, the limit is {self.max_message_size}"
                    )
                self._need = length
            need = self._need
            if not buffer and len(view) >= need:
                # whole envelope in this chunk: parse it without copying it into the buffer
                out.append(decode_envelope(view[:need]))
                view = view[need:]
            else:
                take = min(need - len(buffer), len(view))
                buffer += view[:take]
                view = view[take:]
                if len(buffer) < need:
                    return out
                out.append(decode_envelope(buffer))
                buffer.clear()
            self._need = None
            if not view:
                return out

    def _fail(self) -> None:
        self._failed = True
        self._need = None
        self._buffer.clear()
