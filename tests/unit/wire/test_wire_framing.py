"""cyphonic.wire.framing: frame layout, limits, and which envelopes are refused."""

from __future__ import annotations

import pytest
from cyphonic.errors import (
    MalformedMessage,
    OversizedMessage,
    ProtocolError,
    UnknownMessage,
    UnsupportedVersion,
)
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire import framing
from cyphonic.wire.framing import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    FrameDecoder,
    decode_envelope,
    encode_frame,
)
from cyphonic.wire.messages import wrap


def _login(version: str = "1.0") -> pb.Envelope:
    return wrap(pb.LoginRequest(agent_version=version))


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, value: bytes) -> bytes:
    """Hand-encoded protobuf field (wire type 0: value is the varint, 2: length-prefixed)."""
    key = _varint(number << 3 | wire_type)
    return key + (value if wire_type == 0 else _varint(len(value)) + value)


VERSION_1 = _field(1, 0, _varint(pb.PROTOCOL_VERSION_1))


def test_frame_layout_is_length_prefix_then_envelope() -> None:
    envelope = _login("x" * 300)
    frame = encode_frame(envelope)
    payload = envelope.SerializeToString()
    assert frame[: framing.OFF_ENVELOPE] == len(payload).to_bytes(4, "big")
    assert frame[framing.OFF_ENVELOPE :] == payload


def test_round_trip_every_body_type() -> None:
    """Each body the Envelope can carry survives encode -> decode unchanged."""
    oneof = pb.Envelope.DESCRIPTOR.oneofs_by_name["body"]
    stream = b""
    sent = []
    for field in oneof.fields:
        envelope = pb.Envelope(version=pb.PROTOCOL_VERSION_1)
        getattr(envelope, field.name).SetInParent()
        sent.append(envelope)
        stream += encode_frame(envelope)
    decoder = FrameDecoder()
    assert decoder.feed(stream) == sent
    assert [e.WhichOneof("body") for e in sent] == [f.name for f in oneof.fields]
    decoder.end_of_stream()


def test_round_trip_byte_by_byte() -> None:
    frames = [_login("a"), wrap(pb.Keepalive(sequence=2**64 - 1)), _login("b" * 1000)]
    stream = b"".join(encode_frame(e) for e in frames)
    decoder = FrameDecoder()
    got: list[pb.Envelope] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
        assert decoder.buffered <= HEADER_SIZE + MAX_MESSAGE_SIZE
    assert got == frames
    assert decoder.at_boundary
    decoder.end_of_stream()


def test_full_size_message_passes() -> None:
    envelope = _login("")
    while envelope.ByteSize() != MAX_MESSAGE_SIZE:  # length varints grow with the string
        grow = MAX_MESSAGE_SIZE - envelope.ByteSize()
        envelope = _login("v" * (len(envelope.login_request.agent_version) + grow))
    assert envelope.ByteSize() == MAX_MESSAGE_SIZE
    assert FrameDecoder().feed(encode_frame(envelope)) == [envelope]


def test_oversized_envelope_is_not_encoded() -> None:
    with pytest.raises(OversizedMessage):
        encode_frame(_login("v" * MAX_MESSAGE_SIZE))


def test_oversize_detected_from_prefix_alone() -> None:
    decoder = FrameDecoder()
    with pytest.raises(OversizedMessage):
        decoder.feed((MAX_MESSAGE_SIZE + 1).to_bytes(4, "big"))
    assert decoder.buffered == 0


def test_oversize_detected_before_body_is_buffered() -> None:
    """A huge body right behind the prefix is never copied into the decoder."""
    decoder = FrameDecoder()
    with pytest.raises(OversizedMessage):
        decoder.feed((2**32 - 1).to_bytes(4, "big") + b"\0" * (4 * MAX_MESSAGE_SIZE))
    assert decoder.buffered == 0


def test_prefix_split_across_feeds_still_checked() -> None:
    decoder = FrameDecoder()
    prefix = (MAX_MESSAGE_SIZE + 1).to_bytes(4, "big")
    assert decoder.feed(prefix[:3]) == []
    with pytest.raises(OversizedMessage):
        decoder.feed(prefix[3:])


def test_smaller_limit_applies() -> None:
    decoder = FrameDecoder(max_message_size=16)
    with pytest.raises(OversizedMessage):
        decoder.feed(encode_frame(_login("x" * 20)))
    with pytest.raises(OversizedMessage):
        encode_frame(_login("x" * 20), max_message_size=16)


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 8])
def test_truncated_frame_at_end_of_stream(cut: int) -> None:
    frame = encode_frame(_login("hello"))
    decoder = FrameDecoder()
    assert decoder.feed(frame[:cut]) == []
    assert not decoder.at_boundary
    with pytest.raises(MalformedMessage, match="inside a frame"):
        decoder.end_of_stream()


def test_clean_end_after_whole_frames() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(_login()))
    decoder.end_of_stream()  # no exception: the stream ended on a boundary


def test_decoder_stays_failed() -> None:
    decoder = FrameDecoder()
    with pytest.raises(MalformedMessage):
        decoder.feed(_frame(b"\xff\xff\xff"))
    with pytest.raises(MalformedMessage, match="already failed"):
        decoder.feed(encode_frame(_login()))
    with pytest.raises(MalformedMessage, match="already failed"):
        decoder.end_of_stream()


def test_unparseable_bytes_are_malformed() -> None:
    with pytest.raises(MalformedMessage):
        decode_envelope(b"\x0a\x05ab")  # length 5, only 2 bytes follow


def test_invalid_utf8_string_is_malformed() -> None:
    body = _field(1, 2, b"\xff\xfe")  # LoginRequest.agent_version, not UTF-8
    with pytest.raises(MalformedMessage):
        decode_envelope(VERSION_1 + _field(10, 2, body))


def test_known_field_with_wrong_wire_type_is_malformed() -> None:
    # login_request (10) must be length-delimited; here it is a varint
    with pytest.raises(MalformedMessage, match="wire type"):
        decode_envelope(VERSION_1 + _field(10, 0, _varint(1)))


def test_empty_envelope_has_no_version() -> None:
    with pytest.raises(UnsupportedVersion):
        FrameDecoder().feed(_frame(b""))


@pytest.mark.parametrize("version", [0, 2, 99])
def test_wrong_version(version: int) -> None:
    payload = _field(1, 0, _varint(version)) + _field(10, 2, b"")
    with pytest.raises(UnsupportedVersion):
        decode_envelope(payload)
    envelope = pb.Envelope(login_request=pb.LoginRequest())
    envelope.version = version  # type: ignore[assignment]
    with pytest.raises(UnsupportedVersion):
        encode_frame(envelope)


def test_unknown_body_type_is_unknown_message() -> None:
    # field 99: a body type some later version might add
    with pytest.raises(UnknownMessage, match="field 99"):
        decode_envelope(VERSION_1 + _field(99, 2, b""))


def test_missing_body_is_unknown_message() -> None:
    with pytest.raises(UnknownMessage, match="without a body"):
        decode_envelope(VERSION_1)
    with pytest.raises(UnknownMessage):
        encode_frame(pb.Envelope(version=pb.PROTOCOL_VERSION_1))


def test_unknown_field_inside_a_body_is_discarded() -> None:
    """Forward compatibility within version 1: a newer peer's extra body field is dropped."""
    body = _field(1, 2, b"1.2") + _field(15, 2, b"new")
    envelope = decode_envelope(VERSION_1 + _field(10, 2, body))
    assert envelope.login_request.agent_version == "1.2"
    # discarded, so relaying the message does not pass on bytes nobody checked
    assert envelope.SerializeToString() == _login("1.2").SerializeToString()


def test_every_refusal_is_a_protocol_error() -> None:
    for payload in (b"\xff", VERSION_1, VERSION_1 + _field(99, 2, b""), _field(1, 0, b"\x05")):
        with pytest.raises(ProtocolError):
            decode_envelope(payload)


def test_later_frames_after_a_bad_one_are_not_returned() -> None:
    decoder = FrameDecoder()
    with pytest.raises(UnknownMessage):
        decoder.feed(encode_frame(_login()) + _frame(VERSION_1) + encode_frame(_login()))
