"""The tunnel's per-packet engine: IP packets as QUIC DATAGRAM frames (RFC 9221), sans-I/O.

``TunnelCore`` wraps one end-to-end ``QuicConnection`` (ALPN ``cyphonic-tun/1``). The QUIC
endpoint owns the UDP socket and the loop; per wake-up it drains the TUN and the socket,
then calls ``datagrams_to_send`` once for the whole batch (shared/DESIGN.md "Data path")::

    TUN --read batch--> packets_from_tun() --DATAGRAM frames--> QuicConnection --> UDP
         <--ICMP too big--'
    TUN <--write batch-- handle_event(DatagramFrameReceived) <-- QuicConnection <-- UDP

The core reads the connection only through the engine surface of ``cyphonic.quic``
(``handshake_complete``, ``close_event``, ``smoothed_rtt``,
``remote_max_datagram_frame_size``, ``max_datagram_payload()``, ``datagrams_pending()``,
``push_datagram``), which both engines (aioquic and qh3) offer; a plain aioquic
``QuicConnection`` (tests, the in-memory benchmark) is wrapped in ``AioquicView``.
Three engine facts shape it:

- A DATAGRAM frame larger than fits in one packet, or than the peer's
  ``max_datagram_frame_size``, is never sent and blocks every later datagram on the
  connection (aioquic), or fails every later transmit (qh3). So the MTU is enforced
  here, before anything is queued: an oversized packet gets ICMP "fragmentation needed" /
  ICMPv6 "packet too big" back (or, IPv4 without DF, is fragmented as a router would).
- The queue of pending datagrams is unbounded. Here it is bounded; beyond the bound packets
  are dropped and counted, and the inner TCP backs off as it would at a full router queue.
- Sizes (per 1-RTT packet, 8-byte connection ID): short header 1 + CID 8 + packet number 2,
  AEAD tag 16, DATAGRAM frame type 1 + length 2: 30 bytes. With UDP/IPv4 (28) that is 58
  bytes per inner packet, with UDP/IPv6 (48) 78.

Packets arriving from the tunnel are checked against the peer's virtual addresses (source)
and this node's (destination), the way WireGuard's allowed IPs are, so a peer cannot
inject traffic claiming another node's address.

Capabilities. A datagram whose first byte is 0 is never an IP packet (version 0); the
tunnel uses one such datagram to tell the peer what it can take::

    0x00 "CYC" version(1) flags(1)      flags bit 0: partial inner checksums accepted
                                        flags bit 1: the sender has the receiver's datagram

A core made with ``partial_checksums=True`` (its TUN device writes with NEEDS_CSUM, see
``offload.py``), or one that stopped taking them, sends it with its first batch, again
every ``CAPS_UNCONFIRMED_EVERY`` batches until the peer's says it has ours (bit 1), then every
``CAPS_EVERY`` batches; receiving one without bit 1 makes the next batch carry ours (so a
lost one costs only speed, briefly). Until the peer has said so,
``peer_partial`` is False and every inner checksum leaves complete; an older agent counts
the datagram as malformed and ignores it. Only the authenticated peer can send it, and all
it changes is whether its own inbound packets carry complete checksums.

Path MTU probes (``poll_pmtu``, ``pmtu.PathMtuSearch``) are such datagrams too
(``0x00 "CYP"``): padded to a size, answered with their id. Above what the tunnel carries,
IPv6 packets of at most 1,280 bytes are fragmented here (IPv6's minimum MTU; RFC 8200 5
asks a link that carries less to fragment), larger ones get ICMPv6 "packet too big" 1280.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aioquic.buffer import size_uint_var
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, DatagramFrameReceived, QuicEvent
from aioquic.quic.packet_builder import PACKET_NUMBER_SEND_SIZE
from cyphonic.errors import MalformedMessage

from cyphonic_agent.icmp import too_big
from cyphonic_agent.packet import IPV4_FLAG_DF, IPV6_MIN_MTU, fragment_ipv4, fragment_ipv6
from cyphonic_agent.pmtu import PathMtuSearch

AEAD_TAG_SIZE = 16
SHORT_HEADER_FIRST_BYTE = 1
DEFAULT_CID_LENGTH = 8
DATAGRAM_FRAME_TYPE_SIZE = 1
UDP_IPV4_OVERHEAD = 20 + 8
UDP_IPV6_OVERHEAD = 40 + 8
DEFAULT_MAX_PENDING = 256
CAPS_MAGIC = b"\x00CYC"
CAPS_VERSION = 1
CAPS_PARTIAL_CHECKSUMS = 0x01
CAPS_SEEN_YOURS = 0x02
QUIC_MIN_DATAGRAM = 1200
"""The smallest UDP payload every QUIC path must carry (RFC 9000 14)."""
PROBE_MAGIC = b"\x00CYP"
PROBE_REQUEST = 1
PROBE_ANSWER = 2
PROBE_HEADER_LEN = len(PROBE_MAGIC) + 1 + 4
PROBE_TIMEOUT_FLOOR_S = 1.0
"""Shortest wait for a probe's answer (else three smoothed RTTs)."""
CAPS_EVERY = 256
"""Batches between repeated capability datagrams once the peer has confirmed ours."""
CAPS_UNCONFIRMED_EVERY = 16
"""Batches between them until then."""
"""Datagrams queued in the connection at most (about 360 KB at MTU 1420)."""


def quic_overhead(*, cid_length: int = DEFAULT_CID_LENGTH, mtu: int = 1420) -> int:
    """Bytes QUIC adds to one inner packet of ``mtu`` bytes in its own 1-RTT packet."""
    return (
        SHORT_HEADER_FIRST_BYTE
        + cid_length
        + PACKET_NUMBER_SEND_SIZE
        + AEAD_TAG_SIZE
        + DATAGRAM_FRAME_TYPE_SIZE
        + size_uint_var(mtu)
    )


def max_datagram_size_for(*, tun_mtu: int, cid_length: int = DEFAULT_CID_LENGTH) -> int:
    """The QUIC ``max_datagram_size`` (UDP payload) that carries ``tun_mtu`` inner packets."""
    return tun_mtu + quic_overhead(cid_length=cid_length, mtu=tun_mtu)


def inner_mtu_for(datagram: int, *, cid_length: int = DEFAULT_CID_LENGTH) -> int:
    """The largest inner packet that fits one DATAGRAM frame in ``datagram`` bytes."""
    mtu = datagram - quic_overhead(cid_length=cid_length, mtu=datagram)
    while mtu + quic_overhead(cid_length=cid_length, mtu=mtu) > datagram:
        mtu -= 1
    return mtu


def tun_mtu_for(*, path_mtu: int, ipv6: bool, cid_length: int = DEFAULT_CID_LENGTH) -> int:
    """The largest inner packet that fits one datagram over a path of ``path_mtu`` bytes."""
    room = path_mtu - (UDP_IPV6_OVERHEAD if ipv6 else UDP_IPV4_OVERHEAD)
    mtu = room - quic_overhead(cid_length=cid_length, mtu=room)
    while mtu + quic_overhead(cid_length=cid_length, mtu=mtu) > room:
        mtu -= 1
    return mtu


class AioquicView:
    """The engine surface of ``cyphonic.quic`` over a plain aioquic ``QuicConnection``."""

    engine_name = "aioquic"

    def __init__(self, quic: QuicConnection) -> None:
        self.quic = quic

    @property
    def handshake_complete(self) -> bool:
        """True once the TLS handshake has completed."""
        return bool(self.quic._handshake_complete)

    @property
    def close_event(self) -> ConnectionTerminated | None:
        """The close under way or done, if any."""
        return self.quic._close_event

    @property
    def smoothed_rtt(self) -> float | None:
        """Smoothed RTT in seconds, None before the first sample."""
        loss = self.quic._loss
        return float(loss._rtt_smoothed) if loss._rtt_initialized else None

    @property
    def remote_max_datagram_frame_size(self) -> int | None:
        """The peer's max_datagram_frame_size."""
        return self.quic._remote_max_datagram_frame_size

    @property
    def push_datagram(self) -> Callable[[bytes], None]:
        """Queue one DATAGRAM payload with no checks."""
        return self.quic._datagrams_pending.append

    def datagrams_pending(self) -> int:
        """DATAGRAM frames queued and not yet sent."""
        return len(self.quic._datagrams_pending)

    def max_datagram_payload(self) -> int:
        """Largest DATAGRAM payload that fits one packet (0 if none allowed)."""
        quic = self.quic
        remote = quic._remote_max_datagram_frame_size
        if not remote:
            return 0
        packet_room = (
            quic._max_datagram_size
            - (SHORT_HEADER_FIRST_BYTE + len(quic._peer_cid.cid) + PACKET_NUMBER_SEND_SIZE)
            - AEAD_TAG_SIZE
        )
        frame_room = min(packet_room, remote)
        payload = frame_room - DATAGRAM_FRAME_TYPE_SIZE - 1
        while payload > 0 and (
            DATAGRAM_FRAME_TYPE_SIZE + size_uint_var(payload) + payload > frame_room
        ):
            payload -= 1
        return max(payload, 0)


def engine_view(quic: Any) -> Any:
    """The connection itself if it offers the engine surface, else an ``AioquicView``."""
    return quic if hasattr(quic, "engine_name") else AioquicView(quic)


def datagram_capacity(quic: QuicConnection) -> int | None:
    """Largest DATAGRAM payload this connection can send now, or None if it cannot send any.

    The smaller of: what the peer accepts (its ``max_datagram_frame_size``, unknown until
    the handshake has delivered its transport parameters) and what fits in one 1-RTT
    packet of ``max_datagram_size`` with the current peer connection ID. A connection of
    the project's QUIC endpoint answers with its own ``max_datagram_payload()``, so the
    tunnel never accepts a packet the endpoint would refuse.
    """
    return _capacity(engine_view(quic))


def _capacity(view: Any) -> int | None:
    if not view.remote_max_datagram_frame_size:
        return None
    limit = int(view.max_datagram_payload())
    return limit if limit > 0 else None


@dataclass(slots=True)
class TunnelStats:
    """Counters of one tunnel (``cyphonic-agent status`` shows the first four)."""

    tx_packets: int = 0
    """Inner packets queued for the peer."""
    tx_bytes: int = 0
    rx_packets: int = 0
    """Inner packets received from the peer and handed to the TUN."""
    rx_bytes: int = 0
    too_big: int = 0
    """Oversized packets answered with ICMP too big (or dropped where ICMP is forbidden)."""
    fragmented: int = 0
    """IPv4 packets without DF, and IPv6 packets of at most 1,280 bytes, split to fit."""
    dropped_queue_full: int = 0
    """Packets dropped because the connection's datagram queue was at its bound."""
    dropped_not_ready: int = 0
    """Packets offered before the tunnel could carry datagrams."""
    dropped_spoofed: int = 0
    """Packets from the peer with a source or destination it may not use."""
    dropped_malformed: int = 0
    """Datagrams from the peer that are not IP packets."""
    caps_sent: int = 0
    caps_received: int = 0
    probes_sent: int = 0
    """Path MTU probes sent (``pmtu``); answered ones show in the search's state."""
    probes_answered: int = 0
    """The peer's probes this side answered."""


class TunnelCore:
    """One tunnel: a ``QuicConnection`` carrying IP packets as DATAGRAM frames."""

    def __init__(
        self,
        quic: QuicConnection,
        *,
        mtu: int,
        max_pending: int = DEFAULT_MAX_PENDING,
        peer_addresses: frozenset[bytes] | None = None,
        local_addresses: frozenset[bytes] | None = None,
        ack_immediately: bool = False,
        partial_checksums: bool = False,
    ) -> None:
        """``peer_addresses`` / ``local_addresses``: raw virtual addresses (4 or 16 bytes)
        allowed as source / destination of packets from the peer; None accepts any.
        ``ack_immediately``: acknowledge in the next transmit pass instead of after aioquic's
        1 ms ACK delay (an experiment knob; no gain measured yet on a loaded machine).
        ``partial_checksums``: this side takes inner packets with partial checksums (its
        TUN has offloads); announced to the peer (see the module's "Capabilities")."""
        if quic.configuration.max_datagram_frame_size is None:
            raise ValueError("the QUIC configuration must enable DATAGRAM frames")
        self.quic = quic
        self._view = engine_view(quic)
        self.mtu = mtu
        self.max_pending = max_pending
        self.peer_addresses = peer_addresses
        self.local_addresses = local_addresses
        self.stats = TunnelStats()
        self.partial_checksums = partial_checksums
        self.peer_partial = False
        """The peer said it takes partial inner checksums."""
        self._caps_in = 0
        self._caps_seen = False
        """We have the peer's capability datagram."""
        self._caps_confirmed = False
        """The peer said it has ours."""
        self._announce = partial_checksums
        """Whether to send capability datagrams (only once there is something to say)."""
        if ack_immediately and hasattr(quic, "_ack_delay"):
            # aioquic delays each ACK by 1 ms on a timer (which an asyncio loop rounds up to
            # its next millisecond tick); the endpoint transmits once per received batch, so
            # acknowledging at once means one ACK per batch and no timer.
            quic._ack_delay = 0.0  # aioquic only; qh3's native core acknowledges itself
        self.pmtu: PathMtuSearch | None = None
        """The path MTU search (``poll_pmtu``); None until the tunnel carries datagrams."""
        self._probe_answers: list[int] = []
        self._fragment_id = int.from_bytes(os.urandom(4), "big")
        """Identification of the IPv6 fragments this tunnel makes (RFC 7739: unpredictable)."""
        # Bound once: the cheapest way in per packet (aioquic: its queue's append).
        self._push: Callable[[bytes], None] = self._view.push_datagram

    @property
    def handshake_complete(self) -> bool:
        """Whether the connection's handshake has completed on this side."""
        return bool(self._view.handshake_complete)

    @property
    def terminated(self) -> ConnectionTerminated | None:
        """The close under way or done (local or remote), if any."""
        event: ConnectionTerminated | None = self._view.close_event
        return event

    @property
    def ready(self) -> bool:
        """Whether packets can be carried now (handshake done, peer accepts datagrams).

        Read from the connection itself, so it holds whoever consumes its events (this
        core's ``receive_events`` or the QUIC endpoint's loop).
        """
        view = self._view
        return bool(
            view.handshake_complete and view.close_event is None and _capacity(view) is not None
        )

    @property
    def effective_mtu(self) -> int:
        """The largest inner packet this tunnel carries now (configured MTU or less, and
        no more than the path MTU search has confirmed)."""
        capacity = _capacity(self._view)
        mtu = min(self.mtu, capacity) if capacity else self.mtu
        search = self.pmtu
        return min(mtu, search.mtu) if search is not None else mtu

    def poll_pmtu(self, now: float) -> bool:
        """Run the path MTU search (``pmtu.PathMtuSearch``, RFC 8899) on clock ``now``:
        hand it the peer's answers, queue the probe it asks for. True if a probe was
        queued (then transmit). A probe is a datagram padded to the size of the inner
        packet it stands for; the peer answers with its id::

            0x00 "CYP" kind(1) id(4) [zero padding]   kind 1: probe, kind 2: answer
        """
        capacity = _capacity(self._view)
        if not self.ready or capacity is None:
            return False
        upper = min(self.mtu, capacity)
        base = inner_mtu_for(QUIC_MIN_DATAGRAM)
        search = self.pmtu
        if search is None or search.upper != upper:  # first time, or the peer's MTU came
            if upper <= base:
                return False
            search = self.pmtu = PathMtuSearch(base=base, upper=upper, now=now)
        for probe_id in self._probe_answers:
            search.acked(probe_id, now=now)
        self._probe_answers.clear()
        rtt = self._view.smoothed_rtt
        search.probe_timeout_s = max(PROBE_TIMEOUT_FLOOR_S, 3 * rtt) if rtt else 2.0
        probe = search.poll(now)
        if probe is None or probe.size > capacity:
            return False
        self._push(
            PROBE_MAGIC
            + bytes((PROBE_REQUEST,))
            + probe.probe_id.to_bytes(4, "big")
            + bytes(probe.size - PROBE_HEADER_LEN)
        )
        self.stats.probes_sent += 1
        return True

    @property
    def pending(self) -> int:
        """Datagrams queued in the connection, not yet sent."""
        return int(self._view.datagrams_pending())

    @property
    def rtt(self) -> float | None:
        """Smoothed RTT of the connection in seconds, None before the first sample."""
        rtt: float | None = self._view.smoothed_rtt
        return rtt

    def packets_from_tun(self, packets: list[bytes]) -> list[bytes]:
        """Queue packets read from the TUN for the peer; return packets to write to the TUN.

        The returned packets are ICMP "too big" answers for packets above the MTU. Call
        ``quic.datagrams_to_send`` once after the whole batch.
        """
        stats = self.stats
        if not self.ready:
            stats.dropped_not_ready += len(packets)
            return []
        mtu = self.effective_mtu
        push = self._push
        room = self.max_pending - self._view.datagrams_pending()
        self._caps_in -= 1
        if self._caps_in < 0 and self._announce:
            self._caps_in = CAPS_EVERY if self._caps_confirmed else CAPS_UNCONFIRMED_EVERY
            push(self.capabilities())
            stats.caps_sent += 1
            room -= 1
        answers: list[bytes] = []
        sent = 0
        sent_bytes = 0
        for packet in packets:
            if len(packet) <= mtu:
                if room <= 0:
                    stats.dropped_queue_full += 1
                    continue
                push(packet)
                room -= 1
                sent += 1
                sent_bytes += len(packet)
                continue
            for piece in self._oversized(packet, mtu, answers):
                if room <= 0:
                    stats.dropped_queue_full += 1
                    continue
                push(piece)
                room -= 1
                sent += 1
                sent_bytes += len(piece)
        stats.tx_packets += sent
        stats.tx_bytes += sent_bytes
        return answers

    def capabilities(self) -> bytes:
        """This side's capability datagram."""
        flags = CAPS_PARTIAL_CHECKSUMS if self.partial_checksums else 0
        if self._caps_seen:
            flags |= CAPS_SEEN_YOURS
        return CAPS_MAGIC + bytes((CAPS_VERSION, flags))

    def set_partial_checksums(self, accept: bool) -> None:
        """Change what this side takes (its TUN device changed); announced at once."""
        if accept != self.partial_checksums:
            self.partial_checksums = accept
            self._announce = True
            self._caps_confirmed = False
            self._caps_in = 0

    def _probe_received(self, data: bytes) -> None:
        kind = data[len(PROBE_MAGIC)]
        probe_id = data[len(PROBE_MAGIC) + 1 : PROBE_HEADER_LEN]
        if kind == PROBE_REQUEST:
            if self.ready:
                self._push(PROBE_MAGIC + bytes((PROBE_ANSWER,)) + probe_id)
                self.stats.probes_answered += 1
        elif kind == PROBE_ANSWER:
            if len(self._probe_answers) < 16:  # only one is ever under way
                self._probe_answers.append(int.from_bytes(probe_id, "big"))
        else:
            self.stats.dropped_malformed += 1

    def _capabilities_received(self, data: bytes) -> None:
        if len(data) >= PROBE_HEADER_LEN and data[: len(PROBE_MAGIC)] == PROBE_MAGIC:
            self._probe_received(data)
            return
        if len(data) < len(CAPS_MAGIC) + 2 or data[: len(CAPS_MAGIC)] != CAPS_MAGIC:
            self.stats.dropped_malformed += 1
            return
        self.stats.caps_received += 1
        flags = data[len(CAPS_MAGIC) + 1]
        self.peer_partial = bool(flags & CAPS_PARTIAL_CHECKSUMS)
        self._caps_seen = True
        if flags & CAPS_SEEN_YOURS:
            self._caps_confirmed = True
        else:
            self._caps_confirmed = False
            self._caps_in = 0  # the peer lacks ours (lost, or it restarted): with the next batch

    def _oversized(self, packet: bytes, mtu: int, answers: list[bytes]) -> list[bytes]:
        # IPv4 without DF: fragment like a router. IPv6 up to 1,280 bytes (its minimum
        # MTU, below which no sender goes) on a path that carries less: fragment as the
        # link's own layer must (RFC 8200 5). Everything else: ICMP too big, never
        # announcing less than 1,280 to an IPv6 sender.
        if packet[0] >> 4 == 6 and len(packet) <= IPV6_MIN_MTU:
            self._fragment_id = (self._fragment_id + 1) & 0xFFFFFFFF
            try:
                pieces = fragment_ipv6(packet, mtu=mtu, identification=self._fragment_id)
            except MalformedMessage:
                self.stats.too_big += 1
                return []
            self.stats.fragmented += 1
            return pieces
        if packet[0] >> 4 == 6:
            mtu = max(mtu, IPV6_MIN_MTU)
        if (
            packet[0] >> 4 == 4
            and len(packet) >= 20
            and not (int.from_bytes(packet[6:8], "big") & IPV4_FLAG_DF)
        ):
            try:
                pieces = fragment_ipv4(packet, mtu=mtu)
            except MalformedMessage:
                self.stats.too_big += 1
                return []
            self.stats.fragmented += 1
            return pieces
        self.stats.too_big += 1
        answer = too_big(packet, mtu=mtu)
        if answer is not None:
            answers.append(answer)
        return []

    def handle_event(self, event: QuicEvent) -> list[bytes]:
        """Process one connection event; return IP packets to write to the TUN."""
        if isinstance(event, DatagramFrameReceived):
            packet = self.accept(event.data)
            return [packet] if packet is not None else []
        return []

    def receive_events(self) -> tuple[list[bytes], list[QuicEvent]]:
        """Drain the connection's events: (packets for the TUN, events for others).

        Non-datagram events (stream data of the tunnel request, termination...) are returned
        for the signalling layer. With the project's QUIC endpoint, which drains events
        itself, use ``accept`` as the connection's ``datagram_handler`` instead.
        """
        packets: list[bytes] = []
        others: list[QuicEvent] = []
        accept = self.accept
        next_event = self.quic.next_event
        while (event := next_event()) is not None:
            if type(event) is DatagramFrameReceived:
                packet = accept(event.data)
                if packet is not None:
                    packets.append(packet)
            else:
                others.append(event)
        return packets, others

    def accept(self, data: bytes) -> bytes | None:
        """Check one DATAGRAM payload from the peer: the IP packet for the TUN, or None.

        Not an IP packet, or a source/destination the peer may not use: dropped, counted.
        """
        stats = self.stats
        n = len(data)
        version = data[0] >> 4 if n else 0
        if version == 4 and n >= 20:
            src, dst = data[12:16], data[16:20]
        elif version == 6 and n >= 40:
            src, dst = data[8:24], data[24:40]
        elif version == 0 and n:
            self._capabilities_received(data)
            return None
        else:
            stats.dropped_malformed += 1
            return None
        if (self.peer_addresses is not None and src not in self.peer_addresses) or (
            self.local_addresses is not None and dst not in self.local_addresses
        ):
            stats.dropped_spoofed += 1
            return None
        stats.rx_packets += 1
        stats.rx_bytes += n
        return data
