"""The TCP 443 framing core (docs/tcp-transport.md): prefaces, frames, limits, typed errors."""

from __future__ import annotations

import pytest
from cyphonic.errors import MalformedMessage, OversizedMessage, UnsupportedVersion
from cyphonic.quic.stream_framing import (
    MAX_DATAGRAM,
    PREFACE_SIZE,
    BadPreface,
    EmptyFrame,
    FrameDecoder,
    FrameTooLarge,
    VersionMismatch,
    encode_frame,
    encode_frames,
    encode_preface,
    parse_preface,
)
from hypothesis import given, settings
from hypothesis import strategies as st

datagrams = st.lists(st.binary(min_size=1, max_size=MAX_DATAGRAM), max_size=12)


def test_preface_layout() -> None:
    assert encode_preface() == b"CYQUIC\x01\x00"
    assert len(encode_preface()) == PREFACE_SIZE
    assert parse_preface(encode_preface(7)) == 7
    for bad in (b"CYQUIC\x00\x00", b"CYQUIC\x01\x01", b"HTTP/1.1", b"CYQUIC\x01"):
        with pytest.raises(BadPreface):
            parse_preface(bad)


def test_frame_layout() -> None:
    assert encode_frame(b"abc") == b"\x00\x03abc"
    assert encode_frames([b"a", b"bc"]) == b"\x00\x01a\x00\x02bc"
    for bad in (b"", b"x" * (MAX_DATAGRAM + 1)):
        with pytest.raises(ValueError):
            encode_frame(bad)
        with pytest.raises(ValueError):
            encode_frames([b"ok", bad])


@settings(max_examples=200, deadline=None)
@given(datagrams, st.lists(st.integers(min_value=1, max_value=9000), max_size=30))
def test_any_split_gives_the_datagrams_back(dgrams: list[bytes], cuts: list[int]) -> None:
    """However TCP cuts the byte stream, the same datagrams come out, in order."""
    wire = encode_preface() + encode_frames(dgrams)
    decoder = FrameDecoder()
    out: list[bytes] = []
    pos = 0
    for cut in cuts:
        out += decoder.feed(wire[pos : pos + cut])
        pos += cut
        assert decoder.buffered <= PREFACE_SIZE + 2 + MAX_DATAGRAM
    out += decoder.feed(wire[pos:])
    assert out == dgrams
    assert decoder.buffered == 0 and decoder.peer_version == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_a_typed_error_or_waits(data: bytes) -> None:
    """Arbitrary bytes never raise anything but the framing's protocol errors."""
    decoder = FrameDecoder(max_datagram=1500)
    try:
        for d in decoder.feed(data):
            assert 0 < len(d) <= 1500
    except (MalformedMessage, OversizedMessage, UnsupportedVersion):
        assert decoder.failed and decoder.buffered == 0


def test_wrong_magic_fails_on_the_first_byte() -> None:
    decoder = FrameDecoder()
    with pytest.raises(BadPreface):
        decoder.feed(b"G")
    # Failed for good, holding nothing.
    with pytest.raises(BadPreface):
        decoder.feed(encode_preface())
    assert decoder.buffered == 0


def test_other_version_names_it() -> None:
    decoder = FrameDecoder()
    with pytest.raises(VersionMismatch) as info:
        decoder.feed(encode_preface(2) + encode_frame(b"x"))
    assert info.value.version == 2 and decoder.peer_version == 2
    assert isinstance(info.value, UnsupportedVersion)


def test_limits() -> None:
    decoder = FrameDecoder(max_datagram=1500)
    assert decoder.feed(encode_preface() + encode_frame(b"x" * 1500)) == [b"x" * 1500]
    # Refused from the length field alone: nothing of the frame is awaited or kept.
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\x05\xdd")
    assert decoder.buffered == 0
    with pytest.raises(EmptyFrame):
        FrameDecoder().feed(encode_preface() + b"\x00\x00")
    with pytest.raises(ValueError):
        FrameDecoder(max_datagram=MAX_DATAGRAM + 1)


def test_datagrams_before_a_bad_frame_are_not_returned() -> None:
    """A feed that ends in an error returns nothing: the stream is closed, not trusted."""
    decoder = FrameDecoder()
    with pytest.raises(EmptyFrame):
        decoder.feed(encode_preface() + encode_frame(b"ok") + b"\x00\x00")
