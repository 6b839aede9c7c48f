"""Presence of the nodes connected to this replica: keepalive deadlines. Sans-I/O.

Times are seconds on a monotonic clock passed in by the caller. A node is alive while it has
been seen (registration, keepalive, any request) within ``offline_timeout_s``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class PresenceTracker:
    """Last-seen times and the nodes whose deadline has passed."""

    offline_timeout_s: float
    _last_seen: dict[str, float] = field(default_factory=dict)
    # (deadline, fqdn) heap; stale entries are skipped lazily.
    _deadlines: list[tuple[float, str]] = field(default_factory=list)

    def seen(self, fqdn: str, now: float) -> None:
        """Record that ``fqdn`` was heard from at ``now``."""
        self._last_seen[fqdn] = now
        heapq.heappush(self._deadlines, (now + self.offline_timeout_s, fqdn))

    def forget(self, fqdn: str) -> None:
        """Stop tracking ``fqdn`` (disconnected)."""
        self._last_seen.pop(fqdn, None)

    def last_seen(self, fqdn: str) -> float | None:
        return self._last_seen.get(fqdn)

    def __contains__(self, fqdn: object) -> bool:
        return fqdn in self._last_seen

    def __len__(self) -> int:
        return len(self._last_seen)

    def next_deadline(self) -> float | None:
        """When ``expire`` next has something to return (None: nothing tracked)."""
        while self._deadlines:
            deadline, fqdn = self._deadlines[0]
            seen = self._last_seen.get(fqdn)
            if seen is not None and seen + self.offline_timeout_s == deadline:
                return deadline
            heapq.heappop(self._deadlines)  # stale: refreshed since, or forgotten
        return None

    def expire(self, now: float) -> list[str]:
        """Nodes silent for ``offline_timeout_s`` or more; they are forgotten."""
        out: list[str] = []
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > now:
                return out
            _, fqdn = heapq.heappop(self._deadlines)
            self._last_seen.pop(fqdn, None)
            out.append(fqdn)
