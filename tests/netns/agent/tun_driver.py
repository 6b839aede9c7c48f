"""Runs inside a fresh namespace: drive a real TUN device and print what happened as JSON."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import select
import socket
import struct
import subprocess
import sys

from cyphonic.errors import Unavailable
from cyphonic.log import configure
from cyphonic_agent.icmp import too_big
from cyphonic_agent.packet import (
    PROTO_UDP,
    build_ipv4_header,
    build_ipv6_header,
    internet_checksum,
    parse_header,
)
from cyphonic_agent.tun import TunConfig, TunDevice
from pyroute2 import IPRoute

IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_DO = 2

LOCAL4 = ipaddress.IPv4Interface("100.64.0.1/10")
LOCAL6 = ipaddress.IPv6Interface("fd00:c1::1/64")
PEER4 = ipaddress.IPv4Address("100.64.0.2")
PEER6 = ipaddress.IPv6Address("fd00:c1::2")


def wait_packets(tun: TunDevice, want: int = 1, timeout: float = 3.0) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < want:
        ready, _, _ = select.select([tun.fd], [], [], timeout)
        if not ready:
            break
        got += tun.read()
    return got


def udp6_checksum(src: bytes, dst: bytes, segment: bytes) -> int:
    pseudo = src + dst + struct.pack("!I3xB", len(segment), PROTO_UDP)
    return internet_checksum(pseudo + segment) or 0xFFFF


def udp_reply(request: bytes, payload: bytes) -> bytes:
    """Swap addresses and ports of a UDP packet read from the TUN and carry ``payload``."""
    h = parse_header(request)
    sport, dport = struct.unpack_from("!HH", request, h.header_length)
    segment = struct.pack("!HHHH", dport, sport, 8 + len(payload), 0) + payload
    if h.version == 4:
        header = build_ipv4_header(
            src=h.dst, dst=h.src, protocol=PROTO_UDP, payload_length=len(segment)
        )
        return header + segment  # UDP checksum 0: allowed over IPv4
    csum = udp6_checksum(h.dst, h.src, segment)
    segment = segment[:6] + struct.pack("!H", csum) + segment[8:]
    return (
        build_ipv6_header(src=h.dst, dst=h.src, next_header=PROTO_UDP, payload_length=len(segment))
        + segment
    )


async def open_close_in_running_loop() -> list[int]:
    """The agent runs in asyncio: open and close must work with a loop running."""
    config = TunConfig(name="cyloop0", mtu=1280, ipv4=ipaddress.IPv4Interface("10.9.0.1/24"))

    def count() -> int:  # this test's own lookup, in a thread without a running loop
        with IPRoute() as ipr:
            return len(ipr.link_lookup(ifname="cyloop0"))

    tun = TunDevice.open(config)
    present = await asyncio.to_thread(count)
    tun.close()
    gone = await asyncio.to_thread(count)
    return [present, gone]


def main() -> None:
    configure()  # logs to stderr; stdout carries the JSON
    facts: dict[str, object] = {}
    config = TunConfig(
        name="cytest0",
        mtu=1400,
        ipv4=LOCAL4,
        ipv6=LOCAL6,
        routes=(
            ipaddress.ip_network("100.64.0.0/10"),  # same as the connected prefix
            ipaddress.ip_network("10.99.0.0/16"),
            ipaddress.ip_network("fd00:c2::/48"),
        ),
    )
    with TunDevice.open(config) as tun:
        facts["name"] = tun.name
        with IPRoute() as ipr:
            link = ipr.get_links(tun.index)[0]
            facts["mtu"] = link.get("IFLA_MTU")
            facts["txqlen"] = link.get("IFLA_TXQLEN")
            facts["up"] = bool(link["flags"] & 1)
            facts["addresses"] = sorted(
                f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=tun.index)
            )
            facts["routes"] = sorted(
                f"{r.get('RTA_DST')}/{r['dst_len']}"
                for r in ipr.get_routes(oif=tun.index, family=socket.AF_INET)
                + ipr.get_routes(oif=tun.index, family=socket.AF_INET6)
                if r.get("RTA_DST") and r.get("RTA_TABLE") == 254  # main table only
            )
        # Second device with the same name: refused, and the first is untouched.
        try:
            TunDevice.open(config)
            facts["second_open"] = "opened"
        except Unavailable as exc:
            facts["second_open"] = type(exc).__name__

        # Round trip IPv4 and IPv6: app -> TUN -> (reply written by us) -> app.
        for family, local, peer in (
            (socket.AF_INET, str(LOCAL4.ip), str(PEER4)),
            (socket.AF_INET6, str(LOCAL6.ip), str(PEER6)),
        ):
            key = "v4" if family == socket.AF_INET else "v6"
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.bind((local, 0))
                s.connect((peer, 9999))
                s.send(b"hello " + key.encode())
                packets = wait_packets(tun)
                facts[f"{key}_read"] = len(packets)
                h = parse_header(packets[0])
                facts[f"{key}_src"] = str(ipaddress.ip_address(h.src))
                facts[f"{key}_dst"] = str(ipaddress.ip_address(h.dst))
                facts[f"{key}_payload_ok"] = packets[0].endswith(b"hello " + key.encode())
                tun.write([udp_reply(packets[0], b"answer " + key.encode())])
                facts[f"{key}_reply"] = s.recv(100).decode()

        # Path MTU: a DF packet too big for the tunnel gets our ICMP answer, the kernel
        # learns the smaller MTU, and the application's next large send fails with EMSGSIZE.
        for family, local, peer, proto, opt, val, small in (
            (
                socket.AF_INET,
                str(LOCAL4.ip),
                str(PEER4),
                socket.IPPROTO_IP,
                IP_MTU_DISCOVER,
                IP_PMTUDISC_DO,
                1300,
            ),
            (
                socket.AF_INET6,
                str(LOCAL6.ip),
                str(PEER6),
                socket.IPPROTO_IPV6,
                IPV6_MTU_DISCOVER,
                IPV6_PMTUDISC_DO,
                1280,
            ),
        ):
            key = "v4" if family == socket.AF_INET else "v6"
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((local, 0))
                s.setsockopt(proto, opt, val)
                s.connect((peer, 9999))
                s.send(b"x" * 1300)  # 1300 + 28/48 headers > the tunnel's 1300 below
                packets = wait_packets(tun)
                answer = too_big(packets[0], mtu=small)
                assert answer is not None
                tun.write([answer])
                errors = 0
                for _ in range(3):
                    try:
                        s.send(b"x" * 1300)
                    except OSError as exc:
                        if exc.errno == 90:  # EMSGSIZE
                            errors += 1
                facts[f"{key}_emsgsize"] = errors
                route = subprocess.run(
                    ["ip", "route", "get", peer], capture_output=True, text=True, check=True
                ).stdout
                facts[f"{key}_route_get"] = route
                wait_packets(tun, want=10, timeout=0.2)  # drain what got through

        # Garbage written into the device is refused and counted, not fatal.
        before = tun.stats.tx_errors
        tun.write([b"\x00not an ip packet", b""])
        facts["garbage_errors"] = tun.stats.tx_errors - before
        facts["rx_packets"] = tun.stats.rx_packets
        index = tun.index
    with IPRoute() as ipr:
        facts["after_close_links"] = len(ipr.link_lookup(ifname="cytest0"))
        facts["after_close_routes"] = [
            str(r.get("RTA_DST"))
            for r in ipr.get_routes(family=socket.AF_INET) + ipr.get_routes(family=socket.AF_INET6)
            if r.get("RTA_OIF") == index
        ]
    facts["in_loop"] = asyncio.run(open_close_in_running_loop())
    json.dump(facts, sys.stdout)


if __name__ == "__main__":
    main()
