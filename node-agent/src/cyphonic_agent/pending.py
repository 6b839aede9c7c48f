"""Packets waiting for a tunnel: one bounded FIFO per destination, sans-I/O, explicit clock.

A packet for a virtual address with no tunnel yet triggers route establishment; while the
route is being built its packets wait here. Bounds keep a scan or a dead peer from eating
memory: at most ``max_packets`` and ``max_bytes`` per destination (later packets are
dropped, like a full router queue: the oldest are the ones the application is already
retransmitting; the byte bound matters for a TUN with offloads, whose reads are up to 64 KB
each), at most
``max_destinations`` destinations, and nothing older than ``max_age`` seconds. Every drop is
counted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class PendingStats:
    """Counters of the pending queues (monotonic since start)."""

    queued: int = 0
    """Packets accepted into a queue."""
    dropped_full: int = 0
    """Packets refused because their destination's queue was full."""
    dropped_destinations: int = 0
    """Packets refused because too many destinations were already waiting."""
    expired: int = 0
    """Packets discarded because they waited longer than ``max_age``."""
    discarded: int = 0
    """Packets discarded because their route failed."""

    @property
    def dropped(self) -> int:
        """All packets that never reached a tunnel."""
        return self.dropped_full + self.dropped_destinations + self.expired + self.discarded


@dataclass(slots=True)
class _Queue:
    created: float
    packets: deque[tuple[float, bytes]] = field(default_factory=deque)
    size: int = 0
    """Bytes of the packets queued."""


class PendingPackets:
    """Per-destination bounded queues of packets waiting for a tunnel."""

    def __init__(
        self,
        *,
        max_packets: int = 64,
        max_destinations: int = 256,
        max_age: float = 5.0,
        max_bytes: int = 256 * 1024,
    ) -> None:
        if max_packets < 1 or max_destinations < 1 or max_age <= 0 or max_bytes < 1:
            raise ValueError("pending queue bounds must be positive")
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self.max_destinations = max_destinations
        self.max_age = max_age
        self.stats = PendingStats()
        self._queues: dict[bytes, _Queue] = {}

    def push(self, destination: bytes, packet: bytes, *, now: float) -> bool:
        """Queue ``packet`` for ``destination``; False if it was dropped.

        The caller starts route establishment when this is the destination's first packet
        (see ``is_waiting`` before pushing) so a route is requested once, not per packet.
        """
        queue = self._queues.get(destination)
        if queue is None:
            if len(self._queues) >= self.max_destinations:
                self.expire(now=now)
            if len(self._queues) >= self.max_destinations:
                self.stats.dropped_destinations += 1
                return False
            queue = self._queues[destination] = _Queue(created=now)
        if len(queue.packets) >= self.max_packets or queue.size + len(packet) > self.max_bytes:
            self.stats.dropped_full += 1
            return False
        queue.packets.append((now, packet))
        queue.size += len(packet)
        self.stats.queued += 1
        return True

    def is_waiting(self, destination: bytes) -> bool:
        """Whether ``destination`` already has a queue (its route is being established)."""
        return destination in self._queues

    def release(self, destination: bytes, *, now: float) -> list[bytes]:
        """Remove and return the destination's packets still young enough to send, in order."""
        queue = self._queues.pop(destination, None)
        if queue is None:
            return []
        fresh = [p for t, p in queue.packets if now - t <= self.max_age]
        self.stats.expired += len(queue.packets) - len(fresh)
        return fresh

    def discard(self, destination: bytes) -> int:
        """Drop the destination's packets (its route failed); return how many."""
        queue = self._queues.pop(destination, None)
        n = len(queue.packets) if queue else 0
        self.stats.discarded += n
        return n

    def expire(self, *, now: float) -> list[bytes]:
        """Drop packets older than ``max_age``; return the destinations left with none.

        Call it from the agent's timer; a destination returned here had its route
        attempt outlive every packet waiting for it.
        """
        emptied: list[bytes] = []
        for destination, queue in list(self._queues.items()):
            packets = queue.packets
            while packets and now - packets[0][0] > self.max_age:
                queue.size -= len(packets.popleft()[1])
                self.stats.expired += 1
            if not packets:
                del self._queues[destination]
                emptied.append(destination)
        return emptied

    def next_expiry(self) -> float | None:
        """The time the oldest waiting packet expires, or None when nothing waits."""
        oldest = [q.packets[0][0] for q in self._queues.values() if q.packets]
        return min(oldest) + self.max_age if oldest else None

    def __len__(self) -> int:
        """Packets waiting in all queues."""
        return sum(len(q.packets) for q in self._queues.values())

    def destinations(self) -> list[bytes]:
        """Destinations with a queue, oldest first."""
        return sorted(self._queues, key=lambda d: self._queues[d].created)
