"""Property tests: whatever bytes arrive, the decoder returns envelopes or raises a
ProtocolError, and never holds more than one frame's worth of bytes."""

from __future__ import annotations

import contextlib

from cyphonic.errors import ProtocolError
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.framing import HEADER_SIZE, FrameDecoder, decode_envelope, encode_frame
from cyphonic.wire.messages import wrap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

LIMIT = 512  # a small limit so that random prefixes often land on both sides of it

text = st.text(max_size=40)
blob = st.binary(max_size=40)
endpoints = st.builds(
    pb.Endpoint, ip=st.sampled_from([b"\1\2\3\4", b"\xfd" * 16]), port=st.integers(0, 65535)
)

bodies = st.one_of(
    st.builds(pb.LoginRequest, agent_version=text),
    st.builds(pb.Keepalive, sequence=st.integers(0, 2**64 - 1)),
    st.builds(pb.RegisterRequest, local_addresses=st.lists(endpoints, max_size=3)),
    st.builds(pb.RouteRequest, fqdn=text),
    st.builds(pb.RelayCids, route_id=text, connection_ids=st.lists(blob, max_size=3)),
    st.builds(pb.Error, code=st.integers(0, 18), message=text),
    st.builds(
        pb.RouteDirection,
        route_id=text,
        pattern=st.integers(0, 3),
        peer_fqdn=text,
        peer_candidates=st.lists(endpoints, max_size=2),
    ),
)
envelopes = bodies.map(wrap)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


def _drive(data: bytes, cuts: list[int], *, end: bool) -> list[pb.Envelope]:
    """Feed ``data`` in pieces; only envelopes or a ProtocolError may come out."""
    decoder = FrameDecoder(max_message_size=LIMIT)
    out: list[pb.Envelope] = []
    try:
        for piece in _chunks(data, cuts):
            out += decoder.feed(piece)
            assert decoder.buffered <= HEADER_SIZE + LIMIT
        if end:
            decoder.end_of_stream()
    except ProtocolError:
        assert decoder.buffered == 0
    for envelope in out:
        assert isinstance(envelope, pb.Envelope)
        assert envelope.version == pb.PROTOCOL_VERSION_1
        assert envelope.WhichOneof("body") is not None
    return out


@settings(max_examples=400, deadline=None)
@given(
    data=st.binary(max_size=2048),
    cuts=st.lists(st.integers(0, 4096), max_size=8),
    end=st.booleans(),
)
def test_random_bytes(data: bytes, cuts: list[int], end: bool) -> None:
    _drive(data, cuts, end=end)


@settings(max_examples=400, deadline=None)
@given(payload=st.binary(max_size=600))
def test_random_payload_behind_a_valid_prefix(payload: bytes) -> None:
    """Random envelope bytes under a correct length: the parser itself is exercised."""
    frame = len(payload).to_bytes(HEADER_SIZE, "big") + payload
    _drive(frame, [], end=True)
    with contextlib.suppress(ProtocolError):
        decode_envelope(payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(envelopes, min_size=1, max_size=4),
    mutations=st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete", "truncate"]),
            st.integers(0, 10_000),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(0, 4096), max_size=6),
)
def test_mutated_valid_frames(
    messages: list[pb.Envelope],
    mutations: list[tuple[str, int, int]],
    cuts: list[int],
) -> None:
    data = bytearray(b"".join(encode_frame(m) for m in messages))
    for kind, where, value in mutations:
        at = where % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= value or 1
        elif kind == "insert":
            data[at:at] = bytes([value])
        elif kind == "delete" and at < len(data):
            del data[at]
        elif kind == "truncate":
            del data[at:]
    _drive(bytes(data), cuts, end=True)


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(envelopes, max_size=5), cuts=st.lists(st.integers(0, 4096), max_size=8))
def test_round_trip_any_split(messages: list[pb.Envelope], cuts: list[int]) -> None:
    data = b"".join(encode_frame(m, max_message_size=LIMIT * 8) for m in messages)
    decoder = FrameDecoder(max_message_size=LIMIT * 8)
    out: list[pb.Envelope] = []
    for piece in _chunks(data, cuts):
        out += decoder.feed(piece)
    decoder.end_of_stream()
    assert out == messages
