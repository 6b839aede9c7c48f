#!/usr/bin/env python3
"""Per-packet CPU cost of the tunnel engine (TunnelCore over a QUIC engine), no sockets.

    uv run --frozen python bench/tunnel_core.py [--engine aioquic|qh3] [--packets 50000]
        [--batch 64] [--size 1420] [--tcp | --tso [--no-partial]]

Two connections of the project's QUIC engine classes (mutual TLS with node certificates
from a fresh PKI, as on the wire) are joined in memory; the sender queues batches of inner
packets and builds UDP datagrams once per batch, the receiver parses them and hands the
packets out, ACKs flow back. Printed: CPU microseconds per packet on each side (thread CPU
time, so waiting for a busy machine's cores does not count) and the packet rate one core
could sustain, which bounds what the real data path can reach.

``--tcp``: the inner packets are full-size TCP/IPv4 segments (timestamps option) as a plain
TUN hands them over. ``--tso``: the same segments, but the sender gets them as 64 KB
super-segments with a virtio_net_hdr (a TUN with offloads) and splits them
(``offload.split_frame``), leaving inner checksums partial (both sides take them; with
``--no-partial`` computed), and the receiver coalesces what arrives into super-packets
(``offload.Coalescer``) and writes each with one ``writev`` to /dev/null: the per-packet
Python work of both halves of the offload path, which plain mode does not have.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import pstats
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cyphonic import pki
from cyphonic.config import ALPN_TUNNEL
from cyphonic.quic import engine
from cyphonic_agent.offload import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    Coalescer,
    VnetHeader,
    fold,
    pseudo_sum,
    split_frame,
)
from cyphonic_agent.packet import PROTO_TCP, PROTO_UDP, build_ipv4_header
from cyphonic_agent.tunnel import TunnelCore, max_datagram_size_for

CLIENT = ("192.0.2.1", 4433)
SERVER = ("192.0.2.2", 443)


def pair(mtu: int, engine_name: str) -> tuple[Any, Any]:
    """A client and a server connection of the engine, node certificates both sides."""
    now = datetime.datetime.now(datetime.UTC)
    material = pki.init_pki(Path(tempfile.mkdtemp(prefix="tunnel-core-")), now=now, services=())
    trust = pki.TrustStore(root=material.root_cert, node_ca=material.node_ca.cert)

    def node(name: str) -> pki.CertifiedKey:
        key = pki.generate_key()
        fqdn = f"{name}.cyphonic.internal"
        cert = pki.sign_node_csr(material.node_ca, pki.make_csr(key, fqdn), fqdn=fqdn, now=now)
        return pki.CertifiedKey(cert=cert, key=key, chain=(material.node_ca.cert,))

    def verifier(expected: str | None) -> Any:
        def verify(chain: list[x509.Certificate], _alpn: str | None) -> pki.PeerIdentity:
            return pki.verify_peer(
                chain,
                trust=trust,
                expect="node",
                expected_name=expected,
                now=datetime.datetime.now(datetime.UTC),
            )

        return verify

    size = max_datagram_size_for(tun_mtu=mtu)
    a, b = node("a"), node("b")
    if engine_name == "qh3":
        from cyphonic.quic import engine_qh3

        client = engine_qh3.Qh3QuicConnection(
            configuration=engine_qh3.make_configuration(
                is_client=True,
                identity=a,
                alpn_protocols=[ALPN_TUNNEL],
                idle_timeout=60,
                max_datagram_size=size,
                server_name="b.cyphonic.internal",
            ),
            peer_verifier=verifier("b.cyphonic.internal"),
        )
        client.connect(SERVER, now=time.monotonic())
        server = engine_qh3.Qh3QuicConnection(
            configuration=engine_qh3.make_configuration(
                is_client=False,
                identity=b,
                alpn_protocols=[ALPN_TUNNEL],
                idle_timeout=60,
                max_datagram_size=size,
            ),
            peer_verifier=verifier(None),
            original_destination_connection_id=client.original_destination_connection_id,
        )
        return client, server
    client = engine.CyphonicQuicConnection(
        configuration=engine.make_configuration(
            is_client=True,
            identity=a,
            alpn_protocols=[ALPN_TUNNEL],
            idle_timeout=60,
            max_datagram_size=size,
            server_name="b.cyphonic.internal",
        ),
        peer_verifier=verifier("b.cyphonic.internal"),
    )
    client.connect(SERVER, now=time.monotonic())
    server = engine.CyphonicQuicConnection(
        configuration=engine.make_configuration(
            is_client=False,
            identity=b,
            alpn_protocols=[ALPN_TUNNEL],
            idle_timeout=60,
            max_datagram_size=size,
        ),
        peer_verifier=verifier(None),
        original_destination_connection_id=client.original_destination_connection_id,
    )
    return client, server


TS_OPTION = b"\x01\x01\x08\x0a" + bytes(8)


def tso_frame(mtu: int, segments: int) -> bytes:
    """A TUN read with offloads: ``segments`` full-size TCP segments in one super-segment."""
    mss = mtu - 20 - 20 - len(TS_OPTION)
    payload = bytes(range(256)) * (mss * segments // 256 + 1)
    payload = payload[: mss * segments]
    tcp_len = 20 + len(TS_OPTION) + len(payload)
    src, dst = b"\x64\x40\x00\x01", b"\x64\x40\x00\x02"
    ip = build_ipv4_header(
        src=src, dst=dst, protocol=PROTO_TCP, payload_length=tcp_len, flags_frag=0x4000
    )
    seed = fold(pseudo_sum(src, dst, PROTO_TCP, tcp_len))
    tcp = struct.pack(
        "!HHIIBBHHH", 40000, 5201, 1, 1, (20 + len(TS_OPTION)) // 4 << 4, 0x10, 512, seed, 0
    )
    hdr = VnetHeader(
        flags=F_NEEDS_CSUM,
        gso_type=GSO_TCPV4,
        hdr_len=40 + len(TS_OPTION),
        gso_size=mss,
        csum_start=20,
        csum_offset=16,
    )
    return hdr.pack() + ip + tcp + TS_OPTION + payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["aioquic", "qh3"], default="aioquic")
    parser.add_argument("--packets", type=int, default=50000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=1420)
    parser.add_argument("--profile", action="store_true", help="print the top functions")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tcp", action="store_true", help="inner TCP segments, plain TUN")
    mode.add_argument("--tso", action="store_true", help="TUN offloads: split and coalesce")
    parser.add_argument(
        "--no-partial",
        action="store_true",
        help="--tso with inner checksums computed (a peer that cannot take partial ones)",
    )
    args = parser.parse_args()

    client, server = pair(args.size, args.engine)
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
    packet = (
        build_ipv4_header(
            src=b"\x64\x40\x00\x01",
            dst=b"\x64\x40\x00\x02",
            protocol=PROTO_UDP,
            payload_length=len(payload) + 8,
            flags_frag=0x4000,
        )
        + struct.pack("!HHHH", 1, 2, 0, 0)
        + payload
    )
    batch = [packet] * args.batch
    frames: list[bytes] = []
    if args.tcp or args.tso:
        frame = tso_frame(args.size, 46)
        segments = split_frame(frame, partial=False)  # what a plain TUN would hand over
        per_frame = len(segments)
        if args.tso:
            frames = [frame] * max(1, args.batch // per_frame)
            batch = []
        else:
            batch = (segments * (args.batch // per_frame + 1))[: args.batch]
    partial = args.tso and not args.no_partial
    coalescer = Coalescer()
    sink = os.open(os.devnull, os.O_WRONLY)
    written = 0
    writes = 0
    send_t = recv_t = 0.0
    delivered = 0
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    offered = 0
    while delivered < args.packets:
        t0 = time.thread_time()
        now = time.monotonic()
        if offered - delivered < 2 * args.batch:
            if frames:
                packets: list[bytes] = []
                for f in frames:
                    packets += split_frame(f, partial=partial)
            else:
                packets = batch
            a.packets_from_tun(packets)
            offered += len(packets)
        datagrams = client.datagrams_to_send(now=now)
        t1 = time.thread_time()
        for data, _ in datagrams:
            server.receive_datagram(data, CLIENT, now=now)
        got, _ = b.receive_events()
        delivered += len(got)
        if args.tso:
            for parts in coalescer.coalesce(got):
                os.writev(sink, parts)
                writes += 1
            written += len(got)
        acks = server.datagrams_to_send(now=now)
        t2 = time.thread_time()
        for data, _ in acks:
            client.receive_datagram(data, SERVER, now=now)
        a.receive_events()
        t3 = time.thread_time()
        send_t += (t1 - t0) + (t3 - t2)  # the sender also processes the ACKs
        recv_t += t2 - t1
        timer = client.get_timer()
        if timer is not None and timer <= time.monotonic():
            client.handle_timer(now=time.monotonic())
    if profiler:
        profiler.disable()
    per_send = send_t / delivered * 1e6
    per_recv = recv_t / delivered * 1e6
    what = "UDP packets"
    if args.tcp:
        what = "TCP segments, plain TUN"
    elif args.tso:
        checksums = "partial" if partial else "computed"
        what = (
            f"TCP segments from super-segments (split, {checksums} checksums), coalesced "
            f"{written / max(writes, 1):.0f} a write"
        )
    print(f"{args.engine} TunnelCore, {delivered} {what} of {args.size} B, batches of {args.batch}")
    print(
        f"  sender   {per_send:6.1f} us/packet  (one core: {1e6 / per_send:,.0f} pkt/s, "
        f"{1e6 / per_send * args.size * 8 / 1e9:.2f} Gbit/s)"
    )
    print(
        f"  receiver {per_recv:6.1f} us/packet  (one core: {1e6 / per_recv:,.0f} pkt/s, "
        f"{1e6 / per_recv * args.size * 8 / 1e9:.2f} Gbit/s)"
    )
    print(f"  dropped: queue {a.stats.dropped_queue_full}, not ready {a.stats.dropped_not_ready}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
