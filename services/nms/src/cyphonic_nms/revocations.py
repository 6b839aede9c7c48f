"""Which registry revocations the NMS has seen: an id cursor with gaps. Sans-I/O.

The NMS polls the ``revocations`` table for rows after its cursor (the highest id seen), in
pages, so a bulk revocation of any size is read in full and the AS's clock (``revoked_at``)
plays no part. Ids come from a sequence, and a transaction that took id 10 may commit after
the one that took id 11: when the cursor passes an id that is not there, the id is kept as a
*gap* and asked for again on later polls until it shows up or ``gap_grace_s`` has passed on
the NMS's own monotonic clock (a rolled-back insert leaves a gap for ever).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

REVOCATION_PAGE = 1000
"""Rows read per query; a poll reads pages until one comes back short."""


@dataclass
class RevocationCursor:
    """The position of the revocation poll, and the ids it passed that may still commit."""

    cursor: int = 0
    gap_grace_s: float = 60.0
    max_gaps: int = 1000
    _gaps: dict[int, float] = field(default_factory=dict)  # id -> when it was first missed

    def start_at(self, last_id: int) -> None:
        """Begin after ``last_id`` (the newest revocation when the replica starts)."""
        self.cursor = max(0, last_id)
        self._gaps.clear()

    def advance(self, ids: Sequence[int], now: float) -> None:
        """Record a page of ids read after the cursor (ascending); ids skipped become gaps."""
        for new in sorted(ids):
            if new <= self.cursor:
                self._gaps.pop(new, None)
                continue
            for missing in range(max(self.cursor + 1, new - self.max_gaps), new):
                self._gaps.setdefault(missing, now)
            self.cursor = new
        if len(self._gaps) > self.max_gaps:  # keep the newest: old ones are long committed
            for old in sorted(self._gaps)[: len(self._gaps) - self.max_gaps]:
                del self._gaps[old]

    def pending_gaps(self, now: float) -> list[int]:
        """Gap ids to ask for again (expired ones are dropped)."""
        for gap in [g for g, since in self._gaps.items() if now - since > self.gap_grace_s]:
            del self._gaps[gap]
        return sorted(self._gaps)

    def filled(self, ids: Iterable[int]) -> None:
        """These gap ids were found (committed late)."""
        for gap in ids:
            self._gaps.pop(gap, None)
