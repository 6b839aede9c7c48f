"""Runs inside a fresh namespace: a TUN device with offloads, taken or refused by the kernel.

For each case (``taken``: the real ioctl; ``no_uso``: USO refused as by a kernel before 6.2;
``refused``: every TUNSETOFFLOAD refused) open the device, send one UDP datagram from a local
socket through it, read what the device hands over and print the facts as JSON.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import select
import socket
import sys
from typing import Any

from cyphonic.log import configure
from cyphonic_agent import offload, tun
from cyphonic_agent.tun import TunConfig, TunDevice

LOCAL4 = ipaddress.IPv4Interface("100.64.0.1/24")
PEER4 = "100.64.0.2"

real_ioctl = fcntl.ioctl


def refusing(refuse: int) -> Any:
    """An ioctl that refuses TUNSETOFFLOAD with any flag of ``refuse`` (EINVAL)."""

    def ioctl(fd: int, request: int, arg: Any = 0, *rest: Any) -> Any:
        if request == tun.TUNSETOFFLOAD and isinstance(arg, int) and arg & refuse:
            raise OSError(errno.EINVAL, "refused (test)")
        return real_ioctl(fd, request, arg, *rest)

    return ioctl


def case(name: str, refuse: int) -> dict[str, Any]:
    fcntl.ioctl = refusing(refuse) if refuse else real_ioctl  # type: ignore[assignment]
    try:
        device = TunDevice.open(
            TunConfig(name=f"cyoff{name[:3]}", mtu=1400, ipv4=LOCAL4, offload=True)
        )
    finally:
        fcntl.ioctl = real_ioctl  # type: ignore[assignment]
    facts: dict[str, Any] = {"offloads": device.offloads, "vnet": device.vnet}
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x" * 900, (PEER4, 9999))
        packets: list[bytes] = []
        for _ in range(50):
            select.select([device.fd], [], [], 0.1)
            packets += device.read()
            udp = [p for p in packets if len(p) > 900]
            if udp:
                break
        (frame,) = udp
        if device.vnet:
            hdr = offload.VnetHeader.unpack(frame)
            facts["hdr_flags"] = hdr.flags
            (packet,) = offload.split_frame(frame, partial=False)
        else:
            packet = frame
        facts["first_byte"] = packet[0]
        facts["checksum_ok"] = offload.verify_l4_checksum(packet)
        facts["payload_ok"] = packet.endswith(b"x" * 900)
        # And back: a datagram written to the device reaches a local socket.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r:
            r.bind((str(LOCAL4.ip), 7777))
            r.settimeout(3)
            reply = udp_packet(b"answer", src=PEER4, dst=str(LOCAL4.ip), dport=7777)
            facts["written"] = device.write([reply])
            facts["reply"] = r.recv(100).decode()
    finally:
        device.close()
    return facts


def udp_packet(payload: bytes, *, src: str, dst: str, dport: int) -> bytes:
    from cyphonic_agent.packet import PROTO_UDP, build_ipv4_header

    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    head = build_ipv4_header(src=s, dst=d, protocol=PROTO_UDP, payload_length=8 + len(payload))
    udp = (
        (4000).to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big")
    )
    packet = head + udp + b"\0\0" + payload
    off = 20 + 6
    seed = offload.fold(offload.pseudo_sum(s, d, PROTO_UDP, 8 + len(payload)))
    packet = packet[:off] + seed.to_bytes(2, "big") + packet[off + 2 :]
    return offload.complete_checksum(packet, 20, 6)


def main() -> None:
    configure(level="warning")
    uso = tun.TUN_F_USO4 | tun.TUN_F_USO6
    out = {
        "taken": case("taken", 0),
        "no_uso": case("nouso", uso),
        "refused": case("refused", 0xFF),
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
