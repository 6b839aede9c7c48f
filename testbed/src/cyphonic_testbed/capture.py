"""Packet capture with tcpdump inside a namespace, and a small pcap reader to check the result.

    with capture(bed.router("gwa"), "wana", "udp") as cap:
        ...                                   # traffic
    assert 443 in cap.ports()
    assert not cap.contains(b"secret")       # never in clear on the wire

The pcap file stays readable while the capture runs (tcpdump writes each packet at once), so a
test may also ``wait_for(lambda: cap.contains(b"x"), 2)`` inside the block. The reader knows
Ethernet (with VLAN tags), raw IP, Linux cooked v1/v2 link types, IPv4, IPv6 (with the common
extension headers), TCP, UDP, ICMP and ICMPv6; anything else is kept as an opaque packet.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cyphonic_testbed.errors import TestbedError
from cyphonic_testbed.host import Host
from cyphonic_testbed.wait import wait_for

#: Seconds to wait for tcpdump to start listening, and to finish writing after SIGINT.
START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0

# pcap link types
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_RAW_ALT = (12, 14)
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = (0x8100, 0x88A8)

PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
_IPV6_EXTENSIONS = {0, 43, 60}  # hop-by-hop, routing, destination options
_IPV6_FRAGMENT = 44

_counter = itertools.count()


@dataclass(frozen=True)
class Packet:
    """One captured packet, summarised. Non-IP frames have ``family`` 0 and empty fields."""

    time: float
    family: int
    src: str
    dst: str
    protocol: str
    sport: int | None
    dport: int | None
    #: Transport payload for TCP/UDP, the IP payload otherwise.
    payload: bytes
    #: The whole captured frame.
    frame: bytes


def _parse_ip(data: bytes) -> tuple[int, str, str, int, bytes] | None:
    """(family, src, dst, protocol number, IP payload) or None."""
    if not data:
        return None
    version = data[0] >> 4
    if version == 4 and len(data) >= 20:
        ihl = (data[0] & 0x0F) * 4
        total = struct.unpack_from("!H", data, 2)[0]
        frag = struct.unpack_from("!H", data, 6)[0] & 0x1FFF
        src = str(ipaddress.IPv4Address(data[12:16]))
        dst = str(ipaddress.IPv4Address(data[16:20]))
        body = data[ihl : total if total >= ihl else len(data)]
        proto = data[9] if frag == 0 else -1  # a later fragment has no transport header
        return 4, src, dst, proto, body
    if version == 6 and len(data) >= 40:
        length = struct.unpack_from("!H", data, 4)[0]
        nxt = data[6]
        src = str(ipaddress.IPv6Address(data[8:24]))
        dst = str(ipaddress.IPv6Address(data[24:40]))
        body = data[40 : 40 + length]
        while nxt in _IPV6_EXTENSIONS or nxt == _IPV6_FRAGMENT:
            if len(body) < 8:
                return 6, src, dst, nxt, body
            if nxt == _IPV6_FRAGMENT:
                offset = struct.unpack_from("!H", body, 2)[0] >> 3
                nxt, body = body[0], body[8:]
                if offset:
                    return 6, src, dst, -1, body
                continue
            nxt, body = body[0], body[(body[1] + 1) * 8 :]
        return 6, src, dst, nxt, body
    return None


def _strip_link(linktype: int, frame: bytes) -> bytes | None:
    """The IP packet inside ``frame``, or None when it is not IP."""
    if linktype == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return None
        ethertype, offset = struct.unpack_from("!H", frame, 12)[0], 14
        while ethertype in ETHERTYPE_VLAN and len(frame) >= offset + 4:
            ethertype, offset = struct.unpack_from("!H", frame, offset + 2)[0], offset + 4
    elif linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return None
        ethertype, offset = struct.unpack_from("!H", frame, 14)[0], 16
    elif linktype == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20:
            return None
        ethertype, offset = struct.unpack_from("!H", frame, 0)[0], 20
    elif linktype == LINKTYPE_RAW or linktype in LINKTYPE_RAW_ALT:
        return frame
    else:
        return None
    if ethertype not in (ETHERTYPE_IPV4, ETHERTYPE_IPV6):
        return None
    return frame[offset:]


def parse_packet(linktype: int, frame: bytes, timestamp: float = 0.0) -> Packet:
    """Summarise one captured frame of pcap link type ``linktype``."""
    ip = _strip_link(linktype, frame)
    parsed = _parse_ip(ip) if ip is not None else None
    if parsed is None:
        return Packet(timestamp, 0, "", "", "other", None, None, b"", frame)
    family, src, dst, proto, body = parsed
    sport = dport = None
    payload = body
    if proto == 17 and len(body) >= 8:
        sport, dport = struct.unpack_from("!HH", body, 0)
        payload = body[8:]
    elif proto == 6 and len(body) >= 20:
        sport, dport = struct.unpack_from("!HH", body, 0)
        payload = body[(body[12] >> 4) * 4 :]
    name = "fragment" if proto == -1 else PROTOCOL_NAMES.get(proto, str(proto))
    return Packet(timestamp, family, src, dst, name, sport, dport, payload, frame)


def read_pcap(path: str | Path) -> list[Packet]:
    """Parse a classic pcap file (either byte order, micro- or nanosecond timestamps).

    A record cut short at the end (the writer is still running) is ignored.
    """
    data = Path(path).read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise TestbedError(f"{path}: not a pcap file (pcapng is not supported)")
    scale = 1e-9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e-6
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0x0FFFFFFF
    packets: list[Packet] = []
    offset = 24
    while offset + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack_from(endian + "IIII", data, offset)
        offset += 16
        if offset + caplen > len(data):
            break
        frame = data[offset : offset + caplen]
        offset += caplen
        packets.append(parse_packet(linktype, frame, sec + frac * scale))
    return packets


class Capture:
    """A running or finished tcpdump capture; every query re-reads the pcap file."""

    def __init__(self, *, node: Host, interface: str, bpf_filter: str, path: Path) -> None:
        self.node = node
        self.interface = interface
        self.bpf_filter = bpf_filter
        self.path = path
        self.process: subprocess.Popen[Any] | None = None

    def __repr__(self) -> str:
        return f"<Capture {self.node.name}:{self.interface} {self.bpf_filter!r} -> {self.path}>"

    def packets(self) -> list[Packet]:
        """Every packet captured so far."""
        return read_pcap(self.path) if self.path.exists() else []

    def __len__(self) -> int:
        return len(self.packets())

    def protocols(self) -> set[str]:
        """Protocol names seen (``udp``, ``tcp``, ``icmp``, ``icmpv6``, ``other``, ...)."""
        return {p.protocol for p in self.packets()}

    def ports(self, protocol: str | None = None) -> set[int]:
        """Every source and destination port seen, optionally of one protocol only."""
        out: set[int] = set()
        for p in self.packets():
            if protocol is None or p.protocol == protocol:
                out.update(port for port in (p.sport, p.dport) if port is not None)
        return out

    def endpoints(self, protocol: str = "udp") -> set[tuple[str, int, str, int]]:
        """Distinct (src, sport, dst, dport) of ``protocol``."""
        return {
            (p.src, p.sport, p.dst, p.dport)
            for p in self.packets()
            if p.protocol == protocol and p.sport is not None and p.dport is not None
        }

    def contains(self, needle: bytes) -> bool:
        """True when ``needle`` appears in the payload of any captured packet."""
        return any(needle in p.payload for p in self.packets())

    def contains_anywhere(self, needle: bytes) -> bool:
        """True when ``needle`` appears anywhere in any captured frame, headers included."""
        return any(needle in p.frame for p in self.packets())


def _stderr_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@contextlib.contextmanager
def capture(node: Host, interface: str, bpf_filter: str = "") -> Iterator[Capture]:
    """Capture on ``interface`` of ``node`` (a host, router or ``bed.network(name)``, whose
    bridge is ``br0``) with tcpdump and the BPF ``bpf_filter``; yield a ``Capture``.

    The capture is listening when the block starts, and complete when it ends.
    """
    n = next(_counter)
    base = node.bed.workdir / f"capture-{n}-{node.name}-{interface}"
    path = base.with_suffix(".pcap")
    err_path = base.with_suffix(".log")
    cap = Capture(node=node, interface=interface, bpf_filter=bpf_filter, path=path)
    argv = [
        "tcpdump",
        "-i",
        interface,
        "-n",
        "-U",
        "--immediate-mode",
        "-B",
        "32768",  # KiB of kernel buffer: fewer drops while the machine is busy
        "-s",
        "0",
        "-Z",
        "root",
        "-w",
        str(path),
    ]
    if bpf_filter:
        argv.append(bpf_filter)
    with err_path.open("wb") as err:
        proc = node.popen(argv, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    cap.process = proc

    def listening() -> bool:
        if proc.poll() is not None:
            raise TestbedError(
                f"tcpdump on {node.name}:{interface} exited {proc.returncode}: "
                f"{_stderr_text(err_path).strip()}"
            )
        return "listening on" in _stderr_text(err_path)

    try:
        wait_for(listening, START_TIMEOUT, message=f"tcpdump on {node.name}:{interface}")
        yield cap
    finally:
        _finish(proc, path)


def _finish(proc: subprocess.Popen[Any], path: Path) -> None:
    # Let packets still in flight reach the file: stop once its size has been stable briefly.
    deadline = time.monotonic() + 1.0
    last = -1
    while time.monotonic() < deadline and proc.poll() is None:
        size = path.stat().st_size if path.exists() else 0
        if size == last:
            break
        last = size
        time.sleep(0.1)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # tcpdump flushes and exits on SIGINT
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
