"""TUN offloads, sans-I/O: virtio_net_hdr, splitting super-segments, coalescing segments.

A TUN device opened with ``IFF_VNET_HDR`` and given ``TUNSETOFFLOAD`` flags (TSO4/TSO6,
CSUM, and USO4/USO6 on kernels >= 6.2) prefixes every packet, both ways, with a 10-byte
``struct virtio_net_hdr`` (little-endian on this host)::

    u8 flags         NEEDS_CSUM (1): the L4 checksum at csum_start + csum_offset holds only
                     the folded pseudo-header sum; whoever sends the packet on completes it
    u8 gso_type      NONE 0, TCPV4 1, TCPV6 4, UDP_L4 5 (USO); ECN bit 0x80
    u16 hdr_len      bytes of IP + L4 headers
    u16 gso_size     payload bytes per segment (the MSS)
    u16 csum_start   where the checksummed part starts (the L4 header)
    u16 csum_offset  where in it the checksum field sits (TCP 16, UDP 6)

One read may then return a TCP "super-segment" of up to 64 KB; ``split_frame`` cuts it
into MTU-sized IP packets (IPv4 identification, TCP sequence numbers and flags, lengths and
checksums as the kernel's own segmentation would make them) in one pass before they become
DATAGRAM frames. On the way in ``Coalescer`` merges in-order TCP segments of one flow (and
equal-sized UDP datagrams of one flow where USO is on) into one super-packet per TUN write,
which the kernel takes as if a NIC had done GRO.

Inner checksums. With ``partial=True`` (the peer agent said it accepts them, see
``tunnel.py``) a TCP/UDP packet leaves with its checksum field holding only the folded
pseudo-header sum, as the kernel handed it over: the receiving agent writes every such packet
with NEEDS_CSUM, so its kernel takes the payload as checksummed. Integrity then rests on the
tunnel's AEAD, which authenticates every byte of the inner packet end to end. Without it
(a peer with a plain TUN), the checksums are computed here.

All functions take and return ``bytes``; nothing here does I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cyphonic.errors import MalformedMessage

VNET_HDR_LEN = 10
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

PROTO_TCP = 6
PROTO_UDP = 17
TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6
MAX_IP_PACKET = 65535
MAX_COALESCED_SEGMENTS = 64

PLAIN_HEADER = bytes(VNET_HDR_LEN)
"""The header of a packet with no offload asked for (flags 0, GSO_NONE)."""

Bytes = bytes | bytearray | memoryview
_HDR = struct.Struct("<BBHHHH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class VnetHeader:
    """A ``struct virtio_net_hdr``."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        """The 10 bytes, little-endian."""
        return _HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> VnetHeader:
        """Parse the first 10 bytes of ``data``; ``MalformedMessage`` if shorter."""
        if len(data) < VNET_HDR_LEN:
            raise MalformedMessage("frame shorter than its virtio_net_hdr")
        return cls(*_HDR.unpack_from(data))


# --- checksums --------------------------------------------------------------------------


def ones_sum(data: Bytes) -> int:
    """The one's complement sum of ``data`` as 16-bit big-endian words, modulo 0xFFFF.

    2**16 is 1 modulo 0xFFFF, so the sum of the words is the whole number modulo 0xFFFF: one
    big-integer operation in C instead of a Python loop. The bytes are read little-endian
    (CPython converts that order faster) and the sum swapped back by multiplying by 256
    (RFC 1071 2(B): the sum does not depend on byte order but for a final swap); an odd
    length counts as padded with a zero byte.
    """
    return int.from_bytes(data, "little") % 0xFFFF * 256 % 0xFFFF


def checksum_field(total: int) -> int:
    """The checksum to store for a one's complement sum ``total`` (never 0: UDP's "none")."""
    return 0xFFFF - total % 0xFFFF


def fold(total: int) -> int:
    """``total`` as a folded, not complemented, 16-bit sum: what NEEDS_CSUM expects."""
    r = total % 0xFFFF
    return r if r else 0xFFFF


def pseudo_sum(src: bytes | memoryview, dst: bytes | memoryview, proto: int, length: int) -> int:
    """Sum of the TCP/UDP pseudo-header (RFC 793/768, RFC 8200 8.1), modulo 0xFFFF."""
    return (int.from_bytes(src, "big") + int.from_bytes(dst, "big") + proto + length) % 0xFFFF


def l4_offset(packet: bytes | memoryview) -> tuple[int, int] | None:
    """(protocol, offset of the TCP/UDP header) of a whole, unfragmented TCP or UDP packet.

    None for anything else (ICMP, IPv4 fragments, IPv6 extension headers, lengths that do
    not match the header): such packets are never coalesced and never carry a partial
    checksum over the tunnel. Both agents use this one test.
    """
    n = len(packet)
    if n < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or (packet[2] << 8 | packet[3]) != n or (packet[6] & 0x3F) or packet[7]:
            return None
        proto = packet[9]
        off = ihl
    elif version == 6:
        if n < 40 or (packet[4] << 8 | packet[5]) != n - 40:
            return None
        proto = packet[6]
        off = 40
    else:
        return None
    if proto == PROTO_TCP:
        if n < off + 20 or (packet[off + 12] >> 4) < 5 or off + (packet[off + 12] >> 4) * 4 > n:
            return None
    elif proto == PROTO_UDP:
        if n < off + 8 or (packet[off + 4] << 8 | packet[off + 5]) != n - off:
            return None
    else:
        return None
    return proto, off


def _addresses(packet: bytes | memoryview) -> tuple[bytes | memoryview, bytes | memoryview]:
    if packet[0] >> 4 == 4:
        return packet[12:16], packet[16:20]
    return packet[8:24], packet[24:40]


def complete_checksum(packet: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Finish a NEEDS_CSUM packet: the field holds the seed; sum from ``csum_start`` on."""
    at = csum_start + csum_offset
    if csum_start > len(packet) or at + 2 > len(packet):
        raise MalformedMessage("checksum position beyond the packet")
    csum = checksum_field(ones_sum(memoryview(packet)[csum_start:]))
    return packet[:at] + _U16.pack(csum) + packet[at + 2 :]


def with_partial_checksum(packet: bytes) -> tuple[bytes, int] | None:
    """(packet with its L4 checksum field set to the folded pseudo-header sum, L4 offset)
    for a whole TCP/UDP packet; None for others."""
    found = l4_offset(packet)
    if found is None:
        return None
    proto, off = found
    src, dst = _addresses(packet)
    seed = fold(pseudo_sum(src, dst, proto, len(packet) - off))
    at = off + (TCP_CSUM_OFFSET if proto == PROTO_TCP else UDP_CSUM_OFFSET)
    return packet[:at] + _U16.pack(seed) + packet[at + 2 :], off


def verify_l4_checksum(packet: bytes) -> bool:
    """Whether a whole TCP/UDP packet's checksum is right (for tests and checks)."""
    found = l4_offset(packet)
    if found is None:
        return False
    proto, off = found
    if proto == PROTO_UDP and packet[0] >> 4 == 4 and packet[off + 6 : off + 8] == b"\0\0":
        return True  # IPv4 UDP without a checksum
    src, dst = _addresses(packet)
    total = pseudo_sum(src, dst, proto, len(packet) - off) + ones_sum(memoryview(packet)[off:])
    return total % 0xFFFF == 0


def ipv4_header_checksum_ok(packet: bytes) -> bool:
    """Whether an IPv4 header's checksum is right."""
    ihl = (packet[0] & 0x0F) * 4
    return ones_sum(packet[:ihl]) == 0


def _ipv4_checksum(header: bytearray) -> None:
    """Recompute the IPv4 header checksum in place (``header`` may go on past the IP
    header: only IHL * 4 bytes count)."""
    ihl = (header[0] & 0x0F) * 4
    header[10:12] = b"\0\0"
    header[10:12] = _U16.pack(checksum_field(ones_sum(memoryview(header)[:ihl])))


# --- split (TUN read -> tunnel) ---------------------------------------------------------


def split_frame(frame: bytes, *, partial: bool) -> list[bytes]:
    """One TUN read (virtio_net_hdr + packet) -> IP packets for the tunnel.

    A super-segment (GSO TCPV4/TCPV6/UDP_L4) becomes ``gso_size``-payload packets; a packet
    with NEEDS_CSUM gets its checksum completed unless ``partial`` (the peer accepts
    partial checksums) and it is a whole TCP/UDP packet. Raise ``MalformedMessage`` for a
    frame the kernel would not produce.
    """
    if len(frame) < VNET_HDR_LEN:
        raise MalformedMessage("frame shorter than its virtio_net_hdr")
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = _HDR.unpack_from(frame)
    gso = gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        packet = frame[VNET_HDR_LEN:]
        if not flags & F_NEEDS_CSUM:
            return [packet]
        if partial:
            found = l4_offset(packet)
            if found is not None and found[1] == csum_start:
                want = TCP_CSUM_OFFSET if found[0] == PROTO_TCP else UDP_CSUM_OFFSET
                if csum_offset == want:
                    return [packet]
        return [complete_checksum(packet, csum_start, csum_offset)]
    if gso in (GSO_TCPV4, GSO_TCPV6):
        return _split_tcp(frame, gso_size, partial=partial, v6=gso == GSO_TCPV6)
    if gso == GSO_UDP_L4:
        return _split_udp(frame, gso_size, partial=partial)
    raise MalformedMessage(f"GSO type {gso_type} not supported")


def _ip_parts(pkt: memoryview, *, v6: bool | None) -> tuple[int, int, int]:
    """(version, IP header length, protocol) of a super-segment's IP header."""
    if len(pkt) < 20:
        raise MalformedMessage("super-segment shorter than an IP header")
    version = pkt[0] >> 4
    if version == 4 and v6 is not True:
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < 20 or len(pkt) < ihl:
            raise MalformedMessage("bad IPv4 header in super-segment")
        return 4, ihl, pkt[9]
    if version == 6 and v6 is not False and len(pkt) >= 40:
        return 6, 40, pkt[6]
    raise MalformedMessage("GSO type and IP version disagree")


_STRUCTS: dict[tuple[int, int, int], struct.Struct] = {}


def _headers_struct(version: int, ihl: int, doff: int) -> struct.Struct:
    """IP + TCP headers of one segment in one ``pack``: the fields that change per segment
    (IPv4 total length, identification, checksum / IPv6 payload length; TCP sequence
    number, flags, checksum) as numbers, the rest as runs of bytes."""
    key = (version, ihl, doff)
    found = _STRUCTS.get(key)
    if found is None:
        ip = f"2sHH4sH{ihl - 12}s" if version == 4 else "4sH34s"
        found = _STRUCTS[key] = struct.Struct(f"!{ip}4sI5sB2sH{doff - 18}s")
    return found


def _split_tcp(frame: bytes, mss: int, *, partial: bool, v6: bool) -> list[bytes]:
    """Cut a TCP super-segment like the kernel's tcp_gso_segment: sequence numbers step by
    ``mss``, FIN and PSH only on the last segment, CWR only on the first, IPv4
    identification counting up; headers built with one ``pack`` per segment, checksums
    from sums taken once per super-segment."""
    pkt = memoryview(frame)[VNET_HDR_LEN:]
    version, th, proto = _ip_parts(pkt, v6=v6)
    if proto != PROTO_TCP or len(pkt) < th + 20:
        raise MalformedMessage("TCP super-segment without a TCP header")
    doff = (pkt[th + 12] >> 4) * 4
    hl = th + doff
    if hl > len(pkt) or doff < 20:
        raise MalformedMessage("bad TCP header length in super-segment")
    if mss <= 0:
        raise MalformedMessage("super-segment with gso_size 0")
    size = len(pkt) - hl
    if size <= 0:
        raise MalformedMessage("super-segment without payload")
    head = bytes(pkt[:hl])
    pack = _headers_struct(version, th, doff).pack
    (seq,) = _U32.unpack_from(head, th + 4)
    flags = head[th + 13]
    ports = head[th : th + 4]
    ack_doff = head[th + 8 : th + 13]
    window = head[th + 14 : th + 16]
    rest = head[th + 18 : hl]
    src, dst = _addresses(head)
    base = pseudo_sum(src, dst, PROTO_TCP, 0)
    # The TCP header's words but for sequence number, flags and checksum (zero there).
    tcp_const = ones_sum(ports + b"\0\0\0\0" + ack_doff + b"\0" + window + b"\0\0" + rest)
    if version == 4:
        ip_a, ip_b, ip_c = head[0:2], head[6:10], head[12:th]
        (ident,) = _U16.unpack_from(head, 4)
        ip_const = ones_sum(ip_a + b"\0\0\0\0" + ip_b + b"\0\0" + ip_c)
    else:
        ip_a, ip_c = head[0:4], head[6:40]
    out: list[bytes] = []
    append = out.append
    full_seed = fold(base + doff + mss)
    last_start = (size - 1) // mss * mss
    fin_psh = TCP_FIN | TCP_PSH
    for start in range(0, size, mss):
        last = start == last_start
        end = size if last else start + mss
        chunk = pkt[hl + start : hl + end]
        seg_flags = flags if last else flags & ~fin_psh
        if start:
            seg_flags &= ~TCP_CWR
        l4_len = doff + end - start
        s = (seq + start) & 0xFFFFFFFF
        if partial:
            csum = full_seed if not last else fold(base + l4_len)
        else:
            csum = (
                0xFFFF
                - (
                    base
                    + l4_len
                    + tcp_const
                    + (s >> 16)
                    + (s & 0xFFFF)
                    + seg_flags
                    + ones_sum(chunk)
                )
                % 0xFFFF
            )
        if version == 4:
            total = th + l4_len
            ip_id = (ident + len(out)) & 0xFFFF
            ip_csum = 0xFFFF - (ip_const + total + ip_id) % 0xFFFF
            header = pack(
                ip_a, total, ip_id, ip_b, ip_csum, ip_c,
                ports, s, ack_doff, seg_flags, window, csum, rest,
            )  # fmt: skip
        else:
            header = pack(ip_a, l4_len, ip_c, ports, s, ack_doff, seg_flags, window, csum, rest)
        append(b"".join((header, chunk)))
    return out


def _split_udp(frame: bytes, size_each: int, *, partial: bool) -> list[bytes]:
    pkt = memoryview(frame)[VNET_HDR_LEN:]
    version, uh, proto = _ip_parts(pkt, v6=None)
    if proto != PROTO_UDP or len(pkt) < uh + 8:
        raise MalformedMessage("UDP super-segment without a UDP header")
    if size_each <= 0:
        raise MalformedMessage("super-segment with gso_size 0")
    payload = pkt[uh + 8 :]
    size = len(payload)
    ip_head = bytearray(pkt[:uh])
    udp_head = bytearray(pkt[uh : uh + 8])
    src, dst = _addresses(pkt)
    base = pseudo_sum(src, dst, PROTO_UDP, 0)
    if version == 4:
        (ident,) = _U16.unpack_from(ip_head, 4)
    out: list[bytes] = []
    pack16 = _U16.pack_into
    start = 0
    while start < size or not out:
        end = min(start + size_each, size)
        chunk = payload[start:end]
        l4_len = 8 + end - start
        pack16(udp_head, 4, l4_len)
        if partial:
            pack16(udp_head, 6, fold(base + l4_len))
        else:
            udp_head[6:8] = b"\0\0"
            total = base + l4_len + ones_sum(udp_head) + ones_sum(chunk)
            pack16(udp_head, 6, checksum_field(total))
        if version == 4:
            pack16(ip_head, 2, uh + l4_len)
            pack16(ip_head, 4, (ident + len(out)) & 0xFFFF)
            _ipv4_checksum(ip_head)
        else:
            pack16(ip_head, 4, l4_len)
        out.append(b"".join((ip_head, udp_head, chunk)))
        start = end
    return out


# --- coalesce (tunnel -> TUN write) -----------------------------------------------------


class _Group:
    """Segments of one flow being merged (TCP: in sequence; UDP: equal sizes)."""

    __slots__ = (
        "first",
        "hdr_int",
        "hl",
        "key",
        "l4",
        "length",
        "mask",
        "next_seq",
        "open",
        "parts",
        "proto",
        "psh",
        "same",
        "size",
    )

    def __init__(self, first: bytes, hl: int, l4: int, proto: int, size: int, same: bytes) -> None:
        self.first = first
        self.hl = hl
        self.l4 = l4
        self.proto = proto
        self.size = size
        """Payload bytes of the first segment: every segment but the last has this size."""
        self.next_seq = 0
        self.parts: list[bytes] = [first]
        self.length = len(first)
        self.open = True
        self.psh = False
        self.same = same
        """Header bytes every merged segment must repeat (IP fields, ACK, window, options)."""
        self.key = b""
        self.hdr_int = 0
        self.mask = 0
        """TCP: the first segment's headers as a number, and which bits of them a full-size
        segment of the same flow repeats (all but IPv4 identification and checksum, TCP
        sequence number, PSH and checksum): one comparison on the common path."""


_MASKS: dict[tuple[int, int, int], int] = {}


def _tcp_mask(version: int, l4: int, hl: int) -> int:
    key = (version, l4, hl)
    mask = _MASKS.get(key)
    if mask is None:
        bits = bytearray(b"\xff" * hl)
        if version == 4:
            bits[4:6] = bits[10:12] = b"\0\0"
        bits[l4 + 4 : l4 + 8] = b"\0\0\0\0"
        bits[l4 + 13] = 0xFF & ~TCP_PSH
        bits[l4 + 16 : l4 + 18] = b"\0\0"
        mask = _MASKS[key] = int.from_bytes(bits, "big")
    return mask


Write = list[Bytes]
"""One TUN write as a gather list: virtio_net_hdr first, then the packet's pieces."""

_COALESCABLE_TCP = (TCP_ACK, TCP_ACK | TCP_PSH)


class Coalescer:
    """Merges packets from the tunnel into as few TUN writes as the kernel will take.

    TCP: in-order segments of one flow (same addresses, ports, ACK, window and options, flags
    ACK, the last one possibly ACK|PSH) become one GSO_TCPV4/TCPV6 super-packet whose TCP
    checksum field holds the folded pseudo-header sum, written with NEEDS_CSUM. A segment
    out of order, of another size than the first (but the last), with SYN/FIN/RST/URG/
    ECE/CWR, or past 64 KB starts a new write. UDP (``udp=True``, where the device took
    USO): datagrams of one flow of equal size (the last may be shorter) become one
    GSO_UDP_L4 write. Whole TCP/UDP packets that merge with nothing are written with
    NEEDS_CSUM too (the peer may have left their checksum partial); everything else goes
    out as it came, with a plain header. Per-flow order is kept; flows may interleave
    differently than they arrived, as after a NIC's GRO.
    """

    def __init__(self, *, udp: bool = False) -> None:
        self.udp = udp
        self.tcp_super_packets = 0
        """Writes that merged several TCP segments (GSO_TCPV4/TCPV6)."""
        self.udp_super_packets = 0
        """Writes that merged several UDP datagrams (GSO_UDP_L4)."""

    def coalesce(self, packets: Sequence[bytes]) -> list[Write]:
        """The TUN writes for ``packets`` (one wake-up's worth), in order."""
        items: list[_Group | bytes] = []
        flows: dict[bytes, _Group] = {}
        udp = self.udp
        last: _Group | None = None
        from_bytes = int.from_bytes
        unpack32 = _U32.unpack_from
        # The group the last TCP segment went to, unpacked into locals for the common case:
        # the next full-size, in-sequence segment of the same flow (one header comparison).
        fg: _Group | None = None
        fn = -1  # its full-size packet length (-1: no open group)
        fhl = fseq_at = fflag_at = fnext = fsize = froom = fint = fmask = 0
        fappend: Callable[[bytes], None] = list[bytes]().append  # set with the group
        for p in packets:
            n = len(p)
            if (
                n == fn
                and froom
                and not (from_bytes(p[:fhl], "big") ^ fint) & fmask
                and unpack32(p, fseq_at)[0] == fnext
            ):
                fappend(p)
                fnext = (fnext + fsize) & 0xFFFFFFFF
                froom -= 1
                if p[fflag_at] & TCP_PSH:
                    assert fg is not None
                    fg.psh = True
                    fg.open = False
                    del flows[fg.key]
                    fn = -1
                continue
            if fg is not None:  # hand the locals back before the general path looks
                fg.next_seq = fnext
                fg.length = len(fg.first) + (len(fg.parts) - 1) * fg.size
                fg = None
                fn = -1
            last = None
            if n < 20:
                items.append(p)
                continue
            b0 = p[0]
            if b0 == 0x45:  # IPv4 without options: the common case, checked inline
                if (p[2] << 8 | p[3]) != n or (p[6] & 0x3F) or p[7]:
                    items.append(p)
                    continue
                proto = p[9]
                l4 = 20
                key_addr = p[12:20]
                same_ip = p[1:2] + p[6:7] + p[8:9]
            elif b0 >> 4 == 6:
                if n < 40 or (p[4] << 8 | p[5]) != n - 40:
                    items.append(p)
                    continue
                proto = p[6]
                l4 = 40
                key_addr = p[8:40]
                same_ip = p[0:4] + p[7:8]
            else:
                items.append(p)
                continue
            if proto == PROTO_TCP:
                if n < l4 + 20:
                    items.append(p)
                    continue
                doff = (p[l4 + 12] >> 4) * 4
                hl = l4 + doff
                if doff < 20 or hl > n:
                    items.append(p)
                    continue
                key = key_addr + p[l4 : l4 + 4]
                group = flows.get(key)
                flags = p[l4 + 13]
                size = n - hl
                (seq,) = _U32.unpack_from(p, l4 + 4)
                if flags not in _COALESCABLE_TCP or size == 0:
                    if group is not None:
                        group.open = False
                        del flows[key]
                    items.append(p)
                    continue
                same = same_ip + p[l4 + 8 : l4 + 12] + p[l4 + 12 : l4 + 13] + p[l4 + 14 : l4 + 16]
                same += p[l4 + 18 : hl]
                if (
                    group is not None
                    and group.open
                    and seq == group.next_seq
                    and size <= group.size
                    and same == group.same
                    and group.length + size <= MAX_IP_PACKET
                    and len(group.parts) < MAX_COALESCED_SEGMENTS
                ):
                    group.parts.append(p)
                    group.length += size
                    group.next_seq = (seq + size) & 0xFFFFFFFF
                    last = group
                    if size < group.size or flags & TCP_PSH:
                        group.psh = bool(flags & TCP_PSH)
                        group.open = False
                        del flows[key]
                        last = None
                else:
                    group = _Group(p, hl, l4, PROTO_TCP, size, same)
                    group.next_seq = (seq + size) & 0xFFFFFFFF
                    group.key = key
                    group.mask = _tcp_mask(b0 >> 4, l4, hl)
                    group.hdr_int = from_bytes(p[:hl], "big")
                    last = group
                    items.append(group)
                    if flags & TCP_PSH:
                        group.psh = True
                        group.open = False
                        flows.pop(key, None)
                        last = None
                    else:
                        flows[key] = group
                if last is not None:
                    # Load the group into the fast-path locals.
                    fg = last
                    fn = len(fg.first)
                    fhl, fint, fmask = fg.hl, fg.hdr_int, fg.mask
                    fseq_at, fflag_at = fg.l4 + 4, fg.l4 + 13
                    fnext, fsize = fg.next_seq, fg.size
                    froom = min(
                        MAX_COALESCED_SEGMENTS - len(fg.parts),
                        (MAX_IP_PACKET - fg.length) // fsize,
                    )
                    fappend = fg.parts.append
                continue
            if proto == PROTO_UDP and n >= l4 + 8 and (p[l4 + 4] << 8 | p[l4 + 5]) == n - l4:
                if not udp:
                    items.append(p)
                    continue
                key = key_addr + p[l4 : l4 + 4] + b"u"
                group = flows.get(key)
                size = n - l4 - 8
                same = same_ip
                if (
                    group is not None
                    and group.open
                    and size <= group.size
                    and same == group.same
                    and group.length + size <= MAX_IP_PACKET
                    and len(group.parts) < MAX_COALESCED_SEGMENTS
                ):
                    group.parts.append(p)
                    group.length += size
                    if size < group.size:
                        group.open = False
                        del flows[key]
                    continue
                if size == 0:
                    items.append(p)
                    continue
                group = _Group(p, l4 + 8, l4, PROTO_UDP, size, same)
                items.append(group)
                flows[key] = group
                continue
            items.append(p)
        if fg is not None:
            fg.next_seq = fnext
            fg.length = len(fg.first) + (len(fg.parts) - 1) * fg.size
        for item in items:
            if type(item) is _Group and len(item.parts) > 1:
                if item.proto == PROTO_TCP:
                    self.tcp_super_packets += 1
                else:
                    self.udp_super_packets += 1
        return [_write_of(item) for item in items]


def _write_of(item: _Group | bytes) -> Write:
    if isinstance(item, bytes):
        found = l4_offset(item)
        if found is None:
            return [PLAIN_HEADER, item]
        proto, off = found
        src, dst = _addresses(item)
        at = off + (TCP_CSUM_OFFSET if proto == PROTO_TCP else UDP_CSUM_OFFSET)
        field = _U16.pack(fold(pseudo_sum(src, dst, proto, len(item) - off)))
        hdr = _HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, off, at - off)
        return [hdr, item[:at], field, memoryview(item)[at + 2 :]]
    group = item
    first = group.first
    hl, l4 = group.hl, group.l4
    if len(group.parts) == 1:
        return _write_of(first)
    head = bytearray(first[:hl])
    l4_len = group.length - l4
    if first[0] >> 4 == 4:
        _U16.pack_into(head, 2, group.length)
        _ipv4_checksum(head)
        gso = GSO_TCPV4 if group.proto == PROTO_TCP else GSO_UDP_L4
    else:
        _U16.pack_into(head, 4, l4_len)
        gso = GSO_TCPV6 if group.proto == PROTO_TCP else GSO_UDP_L4
    src, dst = _addresses(first)
    seed = fold(pseudo_sum(src, dst, group.proto, l4_len))
    if group.proto == PROTO_TCP:
        if group.psh:
            head[l4 + 13] |= TCP_PSH
        _U16.pack_into(head, l4 + TCP_CSUM_OFFSET, seed)
        csum_offset = TCP_CSUM_OFFSET
    else:
        _U16.pack_into(head, l4 + 4, l4_len)
        _U16.pack_into(head, l4 + UDP_CSUM_OFFSET, seed)
        csum_offset = UDP_CSUM_OFFSET
    hdr = _HDR.pack(F_NEEDS_CSUM, gso, hl, group.size, l4, csum_offset)
    write: Write = [hdr, head]
    write += [memoryview(part)[hl:] for part in group.parts]  # no copies
    return write


def segments_of_write(write: Write) -> list[bytes]:
    """What the kernel makes of one TUN write (for tests): the packets, checksums complete.

    Mirrors the kernel's handling of a virtio_net_hdr on a TUN write: a GSO write is cut
    into ``gso_size`` segments, NEEDS_CSUM is completed at csum_start + csum_offset.
    """
    frame = b"".join(bytes(part) for part in write)
    hdr = VnetHeader.unpack(frame)
    packets = split_frame(frame, partial=True)
    if not hdr.flags & F_NEEDS_CSUM:
        return packets
    return [complete_checksum(p, hdr.csum_start, hdr.csum_offset) for p in packets]
