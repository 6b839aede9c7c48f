"""QUIC header parsing for routing: hand-built headers, real aioquic packets, garbage."""

from __future__ import annotations

import os

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cyphonic_testing.trs import self_signed
from cyphonic_trs.cid import CID_LEN
from cyphonic_trs.errors import HeaderError
from cyphonic_trs.header import (
    SHORT_MIN_AFTER_DCID,
    VERSION_1,
    VERSION_2,
    PacketType,
    dcid_of,
    parse_header,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def long_header(*, type_bits: int, version: int, dcid: bytes, scid: bytes, rest: bytes) -> bytes:
    first = 0xC0 | (type_bits << 4) | 0x01
    return (
        bytes((first,))
        + version.to_bytes(4, "big")
        + bytes((len(dcid),))
        + dcid
        + bytes((len(scid),))
        + scid
        + rest
    )


def short_header(dcid: bytes, payload_len: int = SHORT_MIN_AFTER_DCID) -> bytes:
    return b"\x41" + dcid + os.urandom(payload_len)


@pytest.mark.parametrize(
    ("version", "type_bits", "expected"),
    [
        (VERSION_1, 0, PacketType.INITIAL),
        (VERSION_1, 1, PacketType.ZERO_RTT),
        (VERSION_1, 2, PacketType.HANDSHAKE),
        (VERSION_1, 3, PacketType.RETRY),
        (VERSION_2, 0, PacketType.RETRY),
        (VERSION_2, 1, PacketType.INITIAL),
        (VERSION_2, 2, PacketType.ZERO_RTT),
        (VERSION_2, 3, PacketType.HANDSHAKE),
        (0, 0, PacketType.VERSION_NEGOTIATION),
        (0x1A2A3A4A, 0, PacketType.UNKNOWN_VERSION),
    ],
)
def test_long_header_types_and_cids(version: int, type_bits: int, expected: PacketType) -> None:
    dcid, scid = os.urandom(CID_LEN), os.urandom(5)
    packet = long_header(
        type_bits=type_bits, version=version, dcid=dcid, scid=scid, rest=b"\x00" * 30
    )
    header = parse_header(packet)
    assert header.is_long and header.packet_type is expected
    assert header.version == version
    assert header.dcid == dcid and header.scid == scid
    assert dcid_of(packet) == dcid


def test_short_header_uses_the_fixed_length() -> None:
    dcid = os.urandom(CID_LEN)
    packet = short_header(dcid)
    assert dcid_of(packet) == dcid
    header = parse_header(packet)
    assert not header.is_long and header.packet_type is PacketType.ONE_RTT
    assert header.version is None and header.scid is None
    # A different fixed length cuts a different DCID out of the same bytes.
    assert dcid_of(packet, 4) == dcid[:4]


def test_short_header_too_short_for_header_protection_is_refused() -> None:
    with pytest.raises(HeaderError):
        dcid_of(short_header(os.urandom(CID_LEN), SHORT_MIN_AFTER_DCID - 1))


def test_v1_cid_longer_than_20_is_refused_but_unknown_versions_may_use_255() -> None:
    long_cid = os.urandom(21)
    with pytest.raises(HeaderError):
        dcid_of(long_header(type_bits=0, version=VERSION_1, dcid=long_cid, scid=b"", rest=b""))
    with pytest.raises(HeaderError):
        dcid_of(
            long_header(type_bits=0, version=VERSION_1, dcid=b"12345678", scid=long_cid, rest=b"")
        )
    huge = os.urandom(255)
    packet = long_header(type_bits=0, version=0x0A0A0A0A, dcid=huge, scid=b"", rest=b"")
    assert dcid_of(packet) == huge


def test_empty_datagram_is_refused() -> None:
    for fn in (dcid_of, parse_header):
        with pytest.raises(HeaderError):
            fn(b"")


@settings(deadline=None)  # a shared machine: no wall-clock deadline
@given(
    dcid=st.binary(min_size=0, max_size=20),
    scid=st.binary(min_size=0, max_size=20),
    type_bits=st.integers(0, 3),
    version=st.sampled_from([VERSION_1, VERSION_2, 0, 0xFF00001D]),
    rest=st.binary(max_size=40),
)
def test_built_long_headers_parse_and_every_truncation_fails(
    dcid: bytes, scid: bytes, type_bits: int, version: int, rest: bytes
) -> None:
    packet = long_header(type_bits=type_bits, version=version, dcid=dcid, scid=scid, rest=rest)
    header = parse_header(packet)
    assert (header.dcid, header.scid, header.version) == (dcid, scid, version)
    header_len = 7 + len(dcid) + len(scid)
    for cut in range(header_len):
        with pytest.raises(HeaderError):
            dcid_of(packet[:cut])


@settings(deadline=None)  # a shared machine: no wall-clock deadline
@given(st.binary(max_size=64), st.integers(0, 20))
def test_garbage_raises_only_header_error(data: bytes, cid_len: int) -> None:
    try:
        header = parse_header(data, cid_len)
    except HeaderError:
        return
    assert header.dcid == dcid_of(data, cid_len)
    if not header.is_long:
        assert len(header.dcid) == cid_len


# --- real packets from aioquic -----------------------------------------------------


def test_every_datagram_of_a_real_handshake_routes_by_the_receivers_cid() -> None:
    cert, key = self_signed("b.test")
    client_cfg = QuicConfiguration(is_client=True, alpn_protocols=["t"], verify_mode=0)
    server_cfg = QuicConfiguration(is_client=False, alpn_protocols=["t"])
    server_cfg.certificate, server_cfg.private_key = cert, key
    client = QuicConnection(configuration=client_cfg)
    client_addr, server_addr = ("10.0.0.1", 1000), ("10.0.0.2", 443)
    now = 1.0
    client.connect(server_addr, now=now)
    first = client.datagrams_to_send(now=now)
    initial = parse_header(first[0][0])
    assert initial.packet_type is PacketType.INITIAL and initial.version == VERSION_1
    assert initial.scid == client.host_cid
    server = QuicConnection(
        configuration=server_cfg, original_destination_connection_id=initial.dcid
    )
    seen_short = {"client": 0, "server": 0}
    pending = [("server", d) for d, _ in first]
    for _ in range(50):
        if not pending:
            break
        batch, pending = pending, []
        for target, data in batch:
            header = parse_header(data)
            receiver = server if target == "server" else client
            own = {c.cid for c in receiver._host_cids}  # what its peer may address
            if target == "server":
                own.add(initial.dcid)  # the client's chosen initial DCID
            assert header.dcid in own
            if not header.is_long:
                seen_short[target] += 1
            receiver.receive_datagram(
                data, client_addr if target == "server" else server_addr, now=now
            )
        for data, _ in server.datagrams_to_send(now=now):
            pending.append(("client", data))
        for data, _ in client.datagrams_to_send(now=now):
            pending.append(("server", data))
        now += 0.01
    assert seen_short["client"] > 0 and seen_short["server"] > 0
