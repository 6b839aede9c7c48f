"""The revocation poll's id cursor with an explicit clock: gaps of late commits are asked for
again, expire after the grace time, and stay bounded."""

from __future__ import annotations

from cyphonic_nms.revocations import RevocationCursor


def test_cursor_follows_the_highest_id_without_gaps() -> None:
    cur = RevocationCursor()
    cur.start_at(10)
    cur.advance([11, 12, 13], now=0.0)
    assert cur.cursor == 13 and cur.pending_gaps(0.0) == []


def test_an_id_committed_out_of_order_is_asked_for_again() -> None:
    cur = RevocationCursor(gap_grace_s=60)
    cur.start_at(10)
    cur.advance([11, 13, 16], now=0.0)  # 12, 14 and 15 are still in flight
    assert cur.cursor == 16
    assert cur.pending_gaps(1.0) == [12, 14, 15]
    cur.filled([14])
    assert cur.pending_gaps(2.0) == [12, 15]
    cur.advance([12], now=3.0)  # seen again through a later page: not a new position
    assert cur.cursor == 16 and cur.pending_gaps(3.0) == [15]


def test_gaps_expire_after_the_grace_time() -> None:
    cur = RevocationCursor(gap_grace_s=60)
    cur.advance([2], now=0.0)
    cur.advance([5], now=30.0)
    assert cur.pending_gaps(59.0) == [1, 3, 4]
    assert cur.pending_gaps(61.0) == [3, 4]  # 1 was missed at 0 s: a rolled-back insert
    assert cur.pending_gaps(91.0) == []


def test_gaps_stay_bounded_on_a_jump() -> None:
    cur = RevocationCursor(max_gaps=100)
    cur.advance([1_000_000], now=0.0)  # a sequence that jumped
    gaps = cur.pending_gaps(0.0)
    assert len(gaps) == 100 and gaps[-1] == 999_999 and gaps[0] == 999_900
    cur.advance(list(range(1_000_001, 1_000_050, 2)), now=1.0)
    assert len(cur.pending_gaps(1.0)) <= 100
