#!/usr/bin/env python3
"""Per-packet CPU cost of the tunnel engine (TunnelCore over aioquic), no sockets, no TUN.

    uv run --frozen python bench/tunnel_core.py [--packets 50000] [--batch 64] [--size 1420]

Two QuicConnections are joined in memory; the sender queues batches of inner packets and
builds UDP datagrams once per batch, the receiver parses them and hands the packets out,
ACKs flow back. Printed: microseconds per packet on each side and the packet rate one core
could sustain, which bounds what the real data path can reach (shared/DESIGN.md "Data path":
about 35 us per packet per side measured for aioquic).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import pstats
import ssl
import struct
import time

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cyphonic.config import ALPN_TUNNEL
from cyphonic_agent.packet import PROTO_UDP, build_ipv4_header
from cyphonic_agent.tunnel import TunnelCore, max_datagram_size_for

CLIENT = ("192.0.2.1", 4433)
SERVER = ("192.0.2.2", 443)


def certificate() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return cert, key


def pair(mtu: int) -> tuple[QuicConnection, QuicConnection]:
    cert, key = certificate()
    size = max_datagram_size_for(tun_mtu=mtu)
    client = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN_TUNNEL], max_datagram_frame_size=65536,
        max_datagram_size=size, verify_mode=ssl.CERT_NONE))
    client.connect(SERVER, now=time.monotonic())
    server = QuicConnection(
        configuration=QuicConfiguration(
            is_client=False, alpn_protocols=[ALPN_TUNNEL], max_datagram_frame_size=65536,
            max_datagram_size=size, certificate=cert, private_key=key),
        original_destination_connection_id=client.original_destination_connection_id)
    return client, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=50000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=1420)
    parser.add_argument("--profile", action="store_true", help="print the top functions")
    args = parser.parse_args()

    client, server = pair(args.size)
    a = TunnelCore(client, mtu=args.size, max_pending=4096)
    b = TunnelCore(server, mtu=args.size, max_pending=4096)
    for _ in range(10):  # handshake
        now = time.monotonic()
        for data, _ in client.datagrams_to_send(now=now):
            server.receive_datagram(data, CLIENT, now=now)
        for data, _ in server.datagrams_to_send(now=now):
            client.receive_datagram(data, SERVER, now=now)
    a.receive_events()
    b.receive_events()
    assert a.ready and b.ready, "handshake did not complete"

    payload = bytes(args.size - 28)
    packet = build_ipv4_header(src=b"\x64\x40\x00\x01", dst=b"\x64\x40\x00\x02",
                               protocol=PROTO_UDP, payload_length=len(payload) + 8,
                               flags_frag=0x4000) + struct.pack("!HHHH", 1, 2, 0, 0) + payload
    batch = [packet] * args.batch
    send_t = recv_t = 0.0
    delivered = 0
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    offered = 0
    while delivered < args.packets:
        t0 = time.perf_counter()
        now = time.monotonic()
        if offered - delivered < 2 * args.batch:
            a.packets_from_tun(batch)
            offered += len(batch)
        datagrams = client.datagrams_to_send(now=now)
        t1 = time.perf_counter()
        for data, _ in datagrams:
            server.receive_datagram(data, CLIENT, now=now)
        got, _ = b.receive_events()
        delivered += len(got)
        acks = server.datagrams_to_send(now=now)
        t2 = time.perf_counter()
        for data, _ in acks:
            client.receive_datagram(data, SERVER, now=now)
        a.receive_events()
        t3 = time.perf_counter()
        send_t += (t1 - t0) + (t3 - t2)  # the sender also processes the ACKs
        recv_t += t2 - t1
        timer = client.get_timer()
        if timer is not None and timer <= time.monotonic():
            client.handle_timer(now=time.monotonic())
    if profiler:
        profiler.disable()
    per_send = send_t / delivered * 1e6
    per_recv = recv_t / delivered * 1e6
    print(f"aioquic TunnelCore, {delivered} packets of {args.size} B, batches of {args.batch}")
    print(f"  sender   {per_send:6.1f} us/packet  (one core: {1e6 / per_send:,.0f} pkt/s, "
          f"{1e6 / per_send * args.size * 8 / 1e9:.2f} Gbit/s)")
    print(f"  receiver {per_recv:6.1f} us/packet  (one core: {1e6 / per_recv:,.0f} pkt/s, "
          f"{1e6 / per_recv * args.size * 8 / 1e9:.2f} Gbit/s)")
    print(f"  dropped: queue {a.stats.dropped_queue_full}, not ready {a.stats.dropped_not_ready}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
