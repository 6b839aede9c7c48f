"""Presence of the nodes connected to this replica: keepalive deadlines. Sans-I/O.

Times are seconds on a monotonic clock passed in by the caller. A node is alive while it has
been seen (registration, keepalive, any request) within ``offline_timeout_s``.

The deadline heap holds at most one entry per node: ``seen`` only moves the node's last-seen
time, and an entry that surfaces with an out-of-date deadline is pushed back with the current
one. Requests are attacker-driven, so they must not grow the heap.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class PresenceTracker:
    """Last-seen times and the nodes whose deadline has passed."""

    offline_timeout_s: float
    _last_seen: dict[str, float] = field(default_factory=dict)
    # (deadline, fqdn) heap, one entry per node in ``_queued``; the deadline may be older
    # than the node's real one (it is corrected when the entry reaches the top).
    _deadlines: list[tuple[float, str]] = field(default_factory=list)
    _queued: set[str] = field(default_factory=set)

    def seen(self, fqdn: str, now: float) -> None:
        """Record that ``fqdn`` was heard from at ``now``."""
        self._last_seen[fqdn] = now
        if fqdn not in self._queued:
            self._queued.add(fqdn)
            heapq.heappush(self._deadlines, (now + self.offline_timeout_s, fqdn))

    def forget(self, fqdn: str) -> None:
        """Stop tracking ``fqdn`` (disconnected)."""
        self._last_seen.pop(fqdn, None)
        # Its heap entry is dropped when it surfaces; compact if forgotten ones pile up.
        if len(self._deadlines) > 2 * len(self._last_seen) + 64:
            self._deadlines = [e for e in self._deadlines if e[1] in self._last_seen]
            heapq.heapify(self._deadlines)
            self._queued = {fqdn for _, fqdn in self._deadlines}

    def last_seen(self, fqdn: str) -> float | None:
        return self._last_seen.get(fqdn)

    def __contains__(self, fqdn: object) -> bool:
        return fqdn in self._last_seen

    def __len__(self) -> int:
        return len(self._last_seen)

    @property
    def heap_size(self) -> int:
        """Entries in the deadline heap (at most one per tracked or recently forgotten node)."""
        return len(self._deadlines)

    def next_deadline(self) -> float | None:
        """When ``expire`` next has something to return (None: nothing tracked)."""
        while self._deadlines:
            deadline, fqdn = self._deadlines[0]
            seen = self._last_seen.get(fqdn)
            if seen is None:  # forgotten
                heapq.heappop(self._deadlines)
                self._queued.discard(fqdn)
                continue
            current = seen + self.offline_timeout_s
            if current == deadline:
                return deadline
            heapq.heapreplace(self._deadlines, (current, fqdn))  # seen since: re-queue
        return None

    def expire(self, now: float) -> list[str]:
        """Nodes silent for ``offline_timeout_s`` or more; they are forgotten."""
        out: list[str] = []
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > now:
                return out
            _, fqdn = heapq.heappop(self._deadlines)
            self._queued.discard(fqdn)
            self._last_seen.pop(fqdn, None)
            out.append(fqdn)
