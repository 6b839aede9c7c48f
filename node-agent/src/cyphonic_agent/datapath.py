"""The agent's packet pump between the TUN device and its tunnels (thin asyncio glue).

    TUN readable -> drain a batch -> group by destination virtual address
        known tunnel   -> TunnelCore.packets_from_tun(batch) -> conn.transmit() (once per batch)
        no tunnel yet  -> PendingPackets (bounded) + on_miss(destination) once per destination
    DATAGRAM from a peer -> TunnelCore.accept -> access-policy filter -> TUN write

With offloads on the TUN (``TunDevice.vnet``), each read is a virtio_net_hdr frame that may
hold a 64 KB TCP super-segment: it is split into MTU-sized packets (``offload.split_frame``)
per tunnel, leaving inner checksums partial where that peer said it takes them. Packets
from the peers are gathered over one endpoint wake-up and written coalesced
(``offload.Coalescer``), one ``writev`` per super-packet, when the endpoint has handed over
what it read (``datagrams_done``).

One wake-up per hop (the round trip's latency): a TUN read goes out in the same callback
(``transmit(now=True)``), and the endpoint's wake-up that brought datagrams writes them to
the TUN, reads at once what the kernel answered (an echo reply, TCP ACKs, the segments an
ACK released) and sends that in its own transmit pass, with the QUIC acknowledgement.

Back-pressure (offloads on): one 64 KB read is ~46 datagrams, so a handful of reads would
overflow the tunnel's bounded datagram queue, and every packet dropped there is a
retransmission for the inner TCP. So reads stop at the room left in the queue of the tunnel
served last (so that even a 64 KB read at the end still fits), and when there is less
room than one super-segment the TUN is not read at all
for a moment (until packets come back from the tunnels, or ``PAUSE_S``): the kernel keeps
the data, and TCP Small Queues hold the sending socket back, as on a plain TUN.

The QUIC endpoint (``cyphonic.quic``) owns the UDP socket and drains it per wake-up; this
module owns the TUN side. Neither goes through asyncio's datagram transport callbacks per
packet (shared/DESIGN.md "Data path").
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import ipaddress
import os
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from cyphonic.errors import MalformedMessage
from cyphonic.log import get_logger
from cyphonic.policy import PacketFilter

from cyphonic_agent.offload import VNET_HDR_LEN, Coalescer, split_frame
from cyphonic_agent.packet import destination
from cyphonic_agent.pending import PendingPackets
from cyphonic_agent.status import PeerStatus
from cyphonic_agent.tun import READ_BATCH, TUN_F_USO4, TunDevice
from cyphonic_agent.tunnel import TunnelCore

PAUSE_S = 0.0005
"""How long the TUN is left unread at most when the busy tunnel's queue is full."""
SWITCH_INTERVAL_S = 0.0005
"""The interpreter's GIL switch interval while a data path runs (CPython's default: 5 ms).
The pump runs on the event loop's thread and gives up the GIL at every system call; when
another thread (a worker of ``asyncio.to_thread``: netlink readings, file I/O) wants it,
that thread then keeps it for up to the switch interval before the pump gets it back, so
each TUN read or UDP send could wait 5 ms (the convoy effect). 0.5 ms bounds that wait;
with no other thread runnable the interval costs nothing."""
SCHED_SLICE_S = 0.0003
"""The scheduler time slice the pump's thread asks for (Linux >= 6.12, EEVDF: the
``sched_runtime`` of ``sched_setattr`` for a normal task; the default slice is 0.7-3 ms).
The CPU share stays what it was (same weight); a short slice gives the thread an earlier
virtual deadline, so when a packet wakes it on a busy CPU it runs at once instead of after
the running task's slice, and each hop of a round trip saves that wait. Overridden by
``CYPHONIC_DATAPATH_SLICE_US`` (0: leave the default)."""
MAX_SEGMENTS_PER_READ = 48
"""Packets one TUN read can become at most (64 KB at an MSS of 1,368): the TUN is read
(offloads on) only while the busy tunnel's queue has room for that many more."""


class TunnelConnection(Protocol):
    """What the data path needs of an endpoint connection (``cyphonic.quic.Connection``)."""

    datagram_handler: Callable[[bytes], None] | None
    datagrams_done: Callable[[], None] | None
    """Called by the endpoint after a wake-up's datagrams went to ``datagram_handler``,
    before its transmit pass."""

    def transmit(self, *, now: bool = False) -> None: ...


@dataclass(eq=False)
class Tunnel:
    """One peer's tunnel as the data path sees it."""

    core: TunnelCore
    conn: TunnelConnection
    addresses: frozenset[bytes]
    """The peer's virtual addresses (raw 4/16 bytes) routed into this tunnel."""
    label: str = ""
    """The peer FQDN (logs, status)."""
    pattern: str = "-"
    """Route pattern as the status shows it: direct, nat_connects or relay."""

    def status(self) -> PeerStatus:
        """This tunnel's row of ``cyphonic-agent status``."""
        core = self.core
        stats = core.stats
        rtt = core.rtt
        address = getattr(self.conn, "peer_address", None)
        v4 = [a for a in self.addresses if len(a) == 4]
        v6 = [a for a in self.addresses if len(a) == 16]
        return PeerStatus(
            fqdn=self.label,
            virtual_ipv4=str(ipaddress.IPv4Address(v4[0])) if v4 else None,
            virtual_ipv6=str(ipaddress.IPv6Address(v6[0])) if v6 else None,
            state="up" if core.ready else ("down" if core.terminated else "establishing"),
            pattern=self.pattern,
            path=_format_address(address) if address else "-",
            rtt_ms=round(rtt * 1000, 3) if rtt is not None else None,
            mtu=core.effective_mtu,
            tx_bytes=stats.tx_bytes,
            rx_bytes=stats.rx_bytes,
            tx_packets=stats.tx_packets,
            rx_packets=stats.rx_packets,
        )


def _format_address(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class DataPathStats:
    """Counters of the TUN side."""

    wakeups: int = 0
    packets_in: int = 0
    """Packets read from the TUN."""
    no_route: int = 0
    """Packets for a destination with no tunnel (queued or dropped in ``pending``)."""
    not_ip: int = 0
    batches: dict[int, int] = field(default_factory=dict)
    """Histogram of batch sizes read per wake-up (bucketed to powers of two)."""
    super_segments: int = 0
    """TUN reads that were GSO super-segments (offloads on)."""
    segments_out: int = 0
    """Packets those super-segments were split into."""
    malformed_frames: int = 0
    """TUN reads with a virtio_net_hdr that could not be split (dropped)."""
    frames_written: int = 0
    """TUN writes of packets from the tunnels (offloads on; a coalesced one counts once)."""
    pauses: int = 0
    """Times the TUN was left unread because the busy tunnel's queue was full."""
    packets_written: int = 0
    """Packets from the tunnels those writes carried (/ frames_written: packets a write)."""


class DataPath:
    """Moves packets between a TUN device and the tunnels keyed by peer virtual address."""

    def __init__(
        self,
        *,
        tun: TunDevice,
        pending: PendingPackets | None = None,
        on_miss: Callable[[bytes], None] | None = None,
        clock: Callable[[], float] | None = None,
        partial_checksums: bool = True,
        packet_filter: PacketFilter | None = None,
    ) -> None:
        """``on_miss(destination)`` is called once per destination that starts waiting: the
        agent starts route establishment there. ``partial_checksums``: with offloads, tell
        peers this side takes partial inner checksums (False: they compute them; for
        measuring what that costs)."""
        self.tun = tun
        self.pending = pending or PendingPackets()
        self.on_miss = on_miss
        self.stats = DataPathStats()
        self._routes: dict[bytes, Tunnel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock = clock
        self.packet_filter = packet_filter
        """The access-policy filter (docs/policy.md): packets from tunnels that it refuses
        are dropped before the TUN write; packets into tunnels note their flows."""
        self.vnet = bool(getattr(tun, "vnet", False))
        """The TUN device carries virtio_net_hdr frames (offloads on)."""
        self._offset = VNET_HDR_LEN if self.vnet else 0
        self.partial_checksums = partial_checksums and self.vnet
        self._coalescer = Coalescer(udp=bool(getattr(tun, "offloads", 0) & TUN_F_USO4))
        self._inbound: list[bytes] = []
        self._partial_peers: set[str] = set()
        self._busy: Tunnel | None = None
        """The tunnel served last (offloads on): its queue sets how much to read."""
        self._paused = False
        self._resume_handle: asyncio.TimerHandle | None = None
        """Peers of tunnels gone that had said they take partial checksums (for the log)."""
        self._log = get_logger("agent.datapath", device=tun.name)

    # -- lifecycle

    def start(self) -> None:
        """Start reading the TUN device on the running loop."""
        self._loop = asyncio.get_running_loop()
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        # What exists now (modules, settings, certificates: ~75,000 objects in an agent)
        # lives as long as the process: out of the collector's full passes, which took
        # 90-190 ms each in a loaded agent (gc callbacks) and stall the pump meanwhile.
        gc.freeze()
        request_time_slice(_slice_from_environment())
        if self._clock is None:
            self._clock = self._loop.time
        self._loop.add_reader(self.tun.fd, self._on_tun_readable)

    def stop(self) -> None:
        """Stop reading the TUN device (the device itself is closed by its owner)."""
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        if self._loop is not None:
            if not self._paused:
                self._loop.remove_reader(self.tun.fd)
            self._loop = None
        self._paused = False
        self.flush()
        stats = self.stats
        self._log.info(
            "datapath_stopped",
            offloads=getattr(self.tun, "offloads", 0),
            packets_in=stats.packets_in,
            super_segments=stats.super_segments,
            segments_out=stats.segments_out,
            malformed_frames=stats.malformed_frames,
            frames_written=stats.frames_written,
            packets_written=stats.packets_written,
            tcp_super_packets=self._coalescer.tcp_super_packets,
            udp_super_packets=self._coalescer.udp_super_packets,
            peers_taking_partial_checksums=sorted(
                self._partial_peers | {t.label for t in self.tunnels() if t.core.peer_partial}
            ),
        )

    # -- tunnels

    def add_tunnel(self, tunnel: Tunnel) -> None:
        """Route the peer's addresses into ``tunnel`` and flush packets waiting for them."""
        fd = self.tun.fd
        accept = tunnel.core.accept
        write = os.write
        tun_stats = self.tun.stats
        pf = self.packet_filter
        allowed = pf.inbound if pf is not None else None
        clock = time.monotonic

        def deliver(data: bytes) -> None:
            packet = accept(data)
            if packet is not None and (allowed is None or allowed(packet, clock())):
                try:
                    write(fd, packet)
                    tun_stats.tx_packets += 1
                except OSError:
                    tun_stats.tx_errors += 1

        inbound = self._inbound

        def gather(data: bytes) -> None:
            packet = accept(data)
            if packet is not None and (allowed is None or allowed(packet, clock())):
                inbound.append(packet)  # written by datagrams_done, in the same wake-up

        if self.vnet:
            tunnel.core.set_partial_checksums(self.partial_checksums)
            tunnel.conn.datagram_handler = gather
        else:
            tunnel.conn.datagram_handler = deliver
        tunnel.conn.datagrams_done = self.datagrams_done
        for address in tunnel.addresses:
            self._routes[address] = tunnel
        now = self._now()
        waiting: list[bytes] = []
        # Oldest destination first, so packets leave roughly in the order they came.
        for address in self.pending.destinations():
            if address in tunnel.addresses:
                waiting += self.pending.release(address, now=now)
        if waiting:
            self._send(tunnel, waiting)
        self._log.info("tunnel added", peer=tunnel.label, released=len(waiting))

    def remove_tunnel(self, tunnel: Tunnel) -> None:
        """Stop routing into ``tunnel`` (closed, or its peer vanished)."""
        for address in tunnel.addresses:
            if self._routes.get(address) is tunnel:
                del self._routes[address]
        tunnel.conn.datagram_handler = None
        tunnel.conn.datagrams_done = None
        if self._busy is tunnel:
            self._busy = None
            self._resume()
        core = tunnel.core
        if core.peer_partial:
            self._partial_peers.add(tunnel.label)
        self._log.info(
            "tunnel removed",
            peer=tunnel.label,
            peer_takes_partial_checksums=core.peer_partial,
            capabilities_sent=core.stats.caps_sent,
            capabilities_received=core.stats.caps_received,
        )

    def tunnels(self) -> list[Tunnel]:
        """Current tunnels, once each."""
        return list({id(t): t for t in self._routes.values()}.values())

    # -- the pump

    def _now(self) -> float:
        return self._clock() if self._clock is not None else time.monotonic()

    def datagrams_done(self) -> None:
        """The endpoint has handed over one wake-up's datagrams (before its transmit pass):
        write them, then read what the writes produced at once (an echo reply, a TCP ACK
        or the next segments the kernel sent inline): it leaves in the same transmit pass
        as the acknowledgement, one datagram and no further loop iteration."""
        self.flush()
        if self._loop is not None and not self._paused:
            self._on_tun_readable()

    def flush(self) -> None:
        """Write the packets gathered from the tunnels, coalesced (offloads on)."""
        packets = self._inbound
        if not packets:
            return
        writes = self._coalescer.coalesce(packets)
        self.stats.frames_written += len(writes)
        self.stats.packets_written += len(packets)
        packets.clear()
        self.tun.write_frames(writes)
        if self._paused:
            self._resume()  # the peer answered: the busy tunnel may have room again

    def _pause(self) -> None:
        loop = self._loop
        if loop is None or self._paused:
            return
        self._paused = True
        self.stats.pauses += 1
        loop.remove_reader(self.tun.fd)
        self._resume_handle = loop.call_later(PAUSE_S, self._resume)

    def _resume(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        if self._loop is not None:
            self._loop.add_reader(self.tun.fd, self._on_tun_readable)

    def _on_tun_readable(self) -> None:
        budget: int | None = None
        limit = READ_BATCH
        busy = self._busy
        if busy is not None:
            core = busy.core
            room = core.max_pending - core.pending - 1  # (1: a capability datagram)
            if room < MAX_SEGMENTS_PER_READ:
                self._pause()
                return
            # Whatever the next read returns must fit: stop reading while a whole
            # super-segment could still follow, and read no more frames than packets fit.
            limit = min(limit, room)
            budget = (room - MAX_SEGMENTS_PER_READ) * max(core.mtu - 80, 1) + 1
        packets = self.tun.read(limit, budget)
        if not packets:
            return
        stats = self.stats
        stats.wakeups += 1
        stats.packets_in += len(packets)
        bucket = 1 << (len(packets) - 1).bit_length()
        stats.batches[bucket] = stats.batches.get(bucket, 0) + 1
        self.route(packets)

    def route(self, packets: Iterable[bytes]) -> None:
        """Send each packet into its destination's tunnel, or queue it and report the miss."""
        routes = self._routes
        by_tunnel: dict[int, tuple[Tunnel, list[bytes]]] = {}
        last_dst: bytes | None = None
        last_batch: list[bytes] | None = None
        offset = self._offset
        pf = self.packet_filter
        note = pf.outbound if pf is not None and not pf.allow_all else None
        now = time.monotonic()
        for packet in packets:
            if note is not None:
                note(packet, now, offset)  # a flow this node opens: its replies may come in
            dst = destination(packet, offset)
            if dst is None:
                self.stats.not_ip += 1
                continue
            if dst == last_dst and last_batch is not None:
                last_batch.append(packet)  # the common case: a run of packets to one peer
                continue
            tunnel = routes.get(dst)
            if tunnel is None:
                self._miss(dst, packet)
                last_dst = last_batch = None
                continue
            entry = by_tunnel.get(id(tunnel))
            if entry is None:
                entry = by_tunnel[id(tunnel)] = (tunnel, [])
            last_dst, last_batch = dst, entry[1]
            last_batch.append(packet)
        for tunnel, batch in by_tunnel.values():
            self._send(tunnel, batch)

    def _send(self, tunnel: Tunnel, batch: list[bytes]) -> None:
        if self.vnet:
            batch = self._split(batch, partial=tunnel.core.peer_partial)
            self._busy = tunnel
        answers = tunnel.core.packets_from_tun(batch)
        if answers:
            self.tun.write(answers)
        tunnel.conn.transmit(now=True)  # in this wake-up, not after another loop iteration

    def _split(self, frames: list[bytes], *, partial: bool) -> list[bytes]:
        """virtio_net_hdr frames -> IP packets: super-segments cut, checksums as the peer
        takes them. The common plain frame (flags 0, GSO_NONE) just loses its header."""
        packets: list[bytes] = []
        stats = self.stats
        for frame in frames:
            if not frame[0] and not frame[1]:
                packets.append(frame[VNET_HDR_LEN:])
                continue
            try:
                pieces = split_frame(frame, partial=partial)
            except MalformedMessage:
                stats.malformed_frames += 1
                continue
            if len(pieces) > 1:
                stats.super_segments += 1
                stats.segments_out += len(pieces)
            packets += pieces
        return packets

    def _miss(self, dst: bytes, packet: bytes) -> None:
        self.stats.no_route += 1
        first = not self.pending.is_waiting(dst)
        if self.pending.push(dst, packet, now=self._now()) and first and self.on_miss:
            self.on_miss(dst)


_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}
_SCHED_ATTR = struct.Struct("=IIQiIQQQII")  # struct sched_attr (SCHED_ATTR_SIZE_VER1)


def _slice_from_environment() -> float:
    """``SCHED_SLICE_S``, or ``CYPHONIC_DATAPATH_SLICE_US`` (microseconds) when it is a
    number (0: none asked for)."""
    value = os.environ.get("CYPHONIC_DATAPATH_SLICE_US", "").strip()
    try:
        return max(0, int(value)) * 1e-6 if value else SCHED_SLICE_S
    except ValueError:
        return SCHED_SLICE_S


def request_time_slice(seconds: float) -> bool:
    """Ask the scheduler for a ``seconds`` time slice for the calling thread (a normal,
    SCHED_OTHER task; kernels since 6.12 take it, clamped to 0.1-100 ms). Same CPU share,
    earlier wake-up. False where the kernel or platform has no such request, or the
    thread runs under another policy (nothing changed); 0 does nothing. Kernels before
    6.12 take the request and ignore the slice."""
    number = _SYS_SCHED_SETATTR.get(os.uname().machine) if sys.platform == "linux" else None
    if number is None or seconds <= 0:
        return False
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        return False  # a policy an administrator chose (chrt) is theirs to keep
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    attr = ctypes.create_string_buffer(
        _SCHED_ATTR.pack(
            _SCHED_ATTR.size,
            0,
            0,
            os.getpriority(os.PRIO_PROCESS, 0),
            0,
            int(seconds * 1e9),
            0,
            0,
            0,
            0,
        ),
        _SCHED_ATTR.size,
    )
    return int(libc.syscall(number, 0, attr, 0)) == 0
