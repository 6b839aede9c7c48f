"""Reachability probe frames (docs/nms.md "Reachability probes"): pure encode/parse.

A probe frame is 26 bytes; its first byte is 0, so it is never a QUIC packet (QUIC sets the
fixed bit, 0x40, in every packet this project sends)::

    0      1          9      10                26
    +------+----------+------+-----------------+
    | 0x00 | CYREACH1 | kind | nonce (16)      |
    +------+----------+------+-----------------+
    kind 1 = mapping probe (node -> the NMS probe port)
         2 = inbound probe (NMS, from a socket the node never sent to -> the node)
         3 = echo of an inbound probe (node -> the probe's source)

The nonce comes from the node's RegisterResponse (``ReachProbe``): a node echoes only a
probe carrying its own registration's nonce, once, so it never reflects a stranger's
datagram.
"""

from __future__ import annotations

MAGIC = b"\x00CYREACH1"
NONCE_LEN = 16
FRAME_LEN = len(MAGIC) + 1 + NONCE_LEN
KIND_MAPPING = 1
KIND_INBOUND = 2
KIND_ECHO = 3


def frame(kind: int, nonce: bytes) -> bytes:
    """One probe frame."""
    if len(nonce) != NONCE_LEN or kind not in (KIND_MAPPING, KIND_INBOUND, KIND_ECHO):
        raise ValueError("bad reach probe frame")
    return MAGIC + bytes([kind]) + nonce


def parse(data: bytes) -> tuple[int, bytes] | None:
    """``(kind, nonce)`` of a probe frame, or None if ``data`` is not one."""
    if len(data) != FRAME_LEN or not data.startswith(MAGIC):
        return None
    kind = data[len(MAGIC)]
    if kind not in (KIND_MAPPING, KIND_INBOUND, KIND_ECHO):
        return None
    return kind, data[len(MAGIC) + 1 :]
