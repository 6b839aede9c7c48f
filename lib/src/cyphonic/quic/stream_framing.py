"""QUIC datagrams over a byte stream (the TCP 443 transport): the framing, sans-I/O.

docs/tcp-transport.md is the protocol page; this module is its only implementation. No
sockets, no asyncio: bytes in, datagrams (or a typed error) out.

Each side opens with an 8-byte preface, then sends frames::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +---------------------------------------------------------------+
    |                  magic "CYQUIC" (6 bytes) ...                 |
    +                               +---------------+---------------+
    |                               |  version (1)  |  reserved (0) |
    +-------------------------------+---------------+---------------+

    frame:
    +-------------------------------+-------------------------------+
    |    length (16 bits, network)  |  one QUIC datagram (length    |
    +-------------------------------+  bytes, 1..MAX_DATAGRAM) ...  |

The client sends its preface and may send frames at once; the server answers with its own
preface carrying the same version, or (a version it does not speak) with its preface
carrying the version it speaks and then closes. A frame holds exactly one UDP payload as
QUIC would have sent it; nothing is added or changed, so a relay may move it between a
stream and a UDP socket unchanged.

History: version 1 (2026-12-02), the first.
"""

from __future__ import annotations

import struct
from typing import Final

from cyphonic.errors import MalformedMessage, OversizedMessage, UnsupportedVersion

__all__ = [
    "MAGIC",
    "MAX_DATAGRAM",
    "PREFACE_SIZE",
    "VERSION",
    "BadPreface",
    "EmptyFrame",
    "FrameDecoder",
    "FrameTooLarge",
    "VersionMismatch",
    "encode_frame",
    "encode_frames",
    "encode_preface",
    "parse_preface",
]

MAGIC: Final = b"CYQUIC"
VERSION: Final = 1
"""The framing version this side speaks (the only one so far)."""
PREFACE_SIZE: Final = 8
MAX_DATAGRAM: Final = 4096
"""Largest datagram a frame may carry (QUIC here sends at most 1,452 bytes; the rest is
room for larger path MTUs). A longer length field is an error, never a partial read."""
_LENGTH: Final = struct.Struct("!H")
_PREFACE: Final = struct.Struct("!6sBB")


class BadPreface(MalformedMessage):
    """The stream did not start with the CYQUIC magic (not this protocol)."""


class VersionMismatch(UnsupportedVersion):
    """The peer speaks another framing version; ``version`` is the peer's."""

    def __init__(self, message: str, *, version: int) -> None:
        super().__init__(message)
        self.version = version


class EmptyFrame(MalformedMessage):
    """A frame of length 0 (no datagram is empty)."""


class FrameTooLarge(OversizedMessage):
    """A frame longer than the decoder's limit (at most ``MAX_DATAGRAM``)."""


def encode_preface(version: int = VERSION) -> bytes:
    """The 8-byte preface announcing ``version``."""
    if not 0 < version < 256:
        raise ValueError(f"framing version out of range: {version}")
    return _PREFACE.pack(MAGIC, version, 0)


def parse_preface(data: bytes) -> int:
    """The version in an 8-byte preface; ``BadPreface`` if it is not one."""
    if len(data) != PREFACE_SIZE:
        raise BadPreface(f"preface must be {PREFACE_SIZE} bytes, got {len(data)}")
    magic, version, reserved = _PREFACE.unpack(data)
    if magic != MAGIC:
        raise BadPreface("stream does not start with the CYQUIC magic")
    if version == 0 or reserved != 0:
        raise BadPreface(f"invalid preface (version {version}, reserved {reserved})")
    return int(version)


def encode_frame(datagram: bytes) -> bytes:
    """One datagram as a frame; ``ValueError`` for an empty or oversized one (a local bug,
    not the peer's)."""
    n = len(datagram)
    if not 0 < n <= MAX_DATAGRAM:
        raise ValueError(f"datagram of {n} bytes cannot be framed (1..{MAX_DATAGRAM})")
    return _LENGTH.pack(n) + datagram


def encode_frames(datagrams: list[bytes]) -> bytes:
    """Several datagrams as consecutive frames (one write)."""
    pack = _LENGTH.pack
    parts: list[bytes] = []
    for d in datagrams:
        n = len(d)
        if not 0 < n <= MAX_DATAGRAM:
            raise ValueError(f"datagram of {n} bytes cannot be framed (1..{MAX_DATAGRAM})")
        parts.append(pack(n))
        parts.append(d)
    return b"".join(parts)


class FrameDecoder:
    """Bytes of one direction of a stream in, datagrams out.

    ``feed`` returns the datagrams completed by the bytes given. The first bytes must be
    the peer's preface (its version is checked against ``version``); after an error the
    decoder stays failed (every later ``feed`` raises the same error) and holds no data.
    It never holds more than one preface or one frame's worth of bytes between calls.
    """

    __slots__ = ("_buffer", "_error", "max_datagram", "peer_version", "version")

    def __init__(self, *, version: int = VERSION, max_datagram: int = MAX_DATAGRAM) -> None:
        if not 0 < max_datagram <= MAX_DATAGRAM:
            raise ValueError(f"max_datagram must be within 1..{MAX_DATAGRAM}")
        self.version = version
        self.max_datagram = max_datagram
        self.peer_version: int | None = None
        """The version in the peer's preface, once read (also set when it differs)."""
        self._buffer = bytearray()
        self._error: MalformedMessage | OversizedMessage | UnsupportedVersion | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete preface or frame."""
        return len(self._buffer)

    @property
    def failed(self) -> bool:
        """True once the peer's input was refused."""
        return self._error is not None

    def feed(self, data: bytes) -> list[bytes]:
        """The datagrams completed by ``data`` (possibly none)."""
        if self._error is not None:
            raise self._error
        buf = self._buffer
        buf += data
        out: list[bytes] = []
        try:
            if self.peer_version is None:
                if len(buf) < PREFACE_SIZE:
                    if not MAGIC.startswith(bytes(buf[: len(MAGIC)])):
                        raise BadPreface("stream does not start with the CYQUIC magic")
                    return out
                self.peer_version = parse_preface(bytes(buf[:PREFACE_SIZE]))
                if self.peer_version != self.version:
                    raise VersionMismatch(
                        f"peer speaks framing version {self.peer_version}, "
                        f"this side {self.version}",
                        version=self.peer_version,
                    )
                del buf[:PREFACE_SIZE]
            pos, end, limit = 0, len(buf), self.max_datagram
            while end - pos >= 2:
                n = (buf[pos] << 8) | buf[pos + 1]
                if n == 0:
                    raise EmptyFrame("empty frame")
                if n > limit:
                    raise FrameTooLarge(f"frame of {n} bytes exceeds the limit of {limit}")
                if end - pos - 2 < n:
                    break
                out.append(bytes(buf[pos + 2 : pos + 2 + n]))
                pos += 2 + n
            del buf[:pos]
        except (MalformedMessage, OversizedMessage, UnsupportedVersion) as exc:
            self._error = exc
            buf.clear()
            raise
        return out
