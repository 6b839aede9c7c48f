"""The stateless refusal, sans-I/O: the packet parses back as an Initial closing with
CONNECTION_REFUSED under the client's Initial keys, stays small, and the gate's rate limit
and retry-after."""

from __future__ import annotations

import os

import pytest
from aioquic._buffer import Buffer
from aioquic.quic.crypto import CryptoError, CryptoPair
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicFrameType, QuicPacketType, QuicProtocolVersion, pull_quic_header
from cyphonic.errors import Overloaded, Unavailable
from cyphonic.quic.engine import error_from_close
from cyphonic.quic.refusal import (
    CONNECTION_REFUSED,
    MIN_RATE_PER_S,
    RETRY_AFTER_S,
    RefusalGate,
    encode_refusal,
    parse_retry_after,
)

VERSIONS = [QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2]


def opened(packet: bytes, *, client_dcid: bytes, version: int) -> tuple[bytes, bytes]:
    """(server source CID, plaintext payload) as the client reads the packet."""
    buf = Buffer(data=packet)
    header = pull_quic_header(buf, host_cid_length=8)
    assert header.packet_type == QuicPacketType.INITIAL and header.version == version
    assert header.packet_length == len(packet)  # one packet, nothing after it
    crypto = CryptoPair()
    crypto.setup_initial(cid=client_dcid, is_client=True, version=version)
    _, payload, number = crypto.decrypt_packet(packet, buf.tell(), 0)
    assert number == 0
    return header.source_cid, payload


@pytest.mark.parametrize("version", VERSIONS)
def test_the_refusal_parses_back_under_the_clients_initial_keys(version: int) -> None:
    dcid, scid = os.urandom(8), os.urandom(8)
    packet = encode_refusal(version=version, client_dcid=dcid, client_scid=scid, retry_after_s=1.5)
    header = pull_quic_header(Buffer(data=packet), host_cid_length=8)
    assert header.destination_cid == scid  # addressed to the client's source CID
    _, payload = opened(packet, client_dcid=dcid, version=version)
    buf = Buffer(data=payload)
    assert buf.pull_uint_var() == QuicFrameType.TRANSPORT_CLOSE
    assert buf.pull_uint_var() == CONNECTION_REFUSED
    assert buf.pull_uint_var() == 0
    reason = buf.pull_bytes(buf.pull_uint_var()).decode()
    assert reason == "overloaded; retry-after-ms=1500"
    assert set(payload[buf.tell() :]) <= {0}  # padding only after the frame
    assert parse_retry_after(CONNECTION_REFUSED, reason) == 1.5


def test_other_keys_do_not_open_it() -> None:
    packet = encode_refusal(
        version=QuicProtocolVersion.VERSION_1,
        client_dcid=b"\x01" * 8,
        client_scid=b"\x02" * 8,
        retry_after_s=1.0,
    )
    with pytest.raises(CryptoError):
        opened(packet, client_dcid=b"\x03" * 8, version=QuicProtocolVersion.VERSION_1)


def test_the_refusal_is_far_smaller_than_an_initial() -> None:
    """Never amplifies: a client's Initial datagram is at least 1200 bytes."""
    packet = encode_refusal(
        version=QuicProtocolVersion.VERSION_1,
        client_dcid=os.urandom(20),
        client_scid=os.urandom(20),
        retry_after_s=RETRY_AFTER_S[1],
    )
    assert len(packet) < 150


def test_retry_after_parsing_and_mapping() -> None:
    assert parse_retry_after(CONNECTION_REFUSED, "overloaded; retry-after-ms=99999") == 10.0
    assert parse_retry_after(CONNECTION_REFUSED, "overloaded; retry-after-ms=1") == 0.25
    assert parse_retry_after(CONNECTION_REFUSED, "go away") is None
    assert parse_retry_after(0x0, "overloaded; retry-after-ms=500") is None
    close = ConnectionTerminated(
        error_code=CONNECTION_REFUSED, frame_type=0, reason_phrase="overloaded; retry-after-ms=800"
    )
    error = error_from_close(close, local_error=None, peer_label="nms")
    assert isinstance(error, Overloaded) and error.retry_after_s == 0.8
    plain = ConnectionTerminated(error_code=CONNECTION_REFUSED, frame_type=0, reason_phrase="no")
    error = error_from_close(plain, local_error=None, peer_label="nms")
    assert isinstance(error, Unavailable) and not isinstance(error, Overloaded)


def test_the_gate_rate_limits_refusals() -> None:
    gate = RefusalGate(rate_per_s=10.0)
    sent = sum(gate.take(now=100.0) for _ in range(50))
    assert sent == 10  # the burst: one second's worth
    assert not gate.take(now=100.05)
    assert sum(gate.take(now=100.5) for _ in range(50)) == 5  # refilled at the rate


def test_retry_after_is_the_backlog_over_the_completion_rate() -> None:
    gate = RefusalGate(window_s=2.0)
    low, high = RETRY_AFTER_S
    assert gate.retry_after(0, now=0.0) == low
    assert gate.retry_after(100, now=0.0) == pytest.approx(100 / MIN_RATE_PER_S)
    for i in range(2000):  # 200 handshakes a second for 10 s
        gate.completed(now=i / 200)
    assert gate.completion_rate(now=10.0) == pytest.approx(200, rel=0.1)
    assert gate.retry_after(100, now=10.0) == pytest.approx(0.5, rel=0.1)
    for _ in range(1000):  # a thousand refused clients come back too
        gate.take(now=10.0)
    assert gate.retry_after(100, now=10.0) == pytest.approx(1100 / 200, rel=0.1)
    assert gate.retry_after(100_000, now=10.0) == high
