"""Per-destination bounded queues of packets waiting for a tunnel (explicit clock)."""

from __future__ import annotations

import pytest
from cyphonic_agent.pending import PendingPackets
from hypothesis import given
from hypothesis import strategies as st

A = bytes([100, 64, 0, 2])
B = bytes([100, 64, 0, 3])


def test_fifo_per_destination_and_release() -> None:
    q = PendingPackets(max_packets=4)
    assert not q.is_waiting(A)
    assert q.push(A, b"a1", now=0.0)
    assert q.is_waiting(A)
    q.push(B, b"b1", now=0.1)
    q.push(A, b"a2", now=0.2)
    assert len(q) == 3
    assert q.release(A, now=0.3) == [b"a1", b"a2"]
    assert not q.is_waiting(A) and q.is_waiting(B)
    assert q.release(A, now=0.3) == []
    assert q.stats.queued == 3 and q.stats.dropped == 0


def test_drops_beyond_bound_and_counts() -> None:
    q = PendingPackets(max_packets=3)
    results = [q.push(A, bytes([i]), now=0.0) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert q.stats.dropped_full == 2 and q.stats.dropped == 2
    assert q.release(A, now=0.0) == [b"\x00", b"\x01", b"\x02"]


def test_destination_bound() -> None:
    q = PendingPackets(max_destinations=2)
    assert q.push(A, b"x", now=0.0) and q.push(B, b"y", now=0.0)
    assert not q.push(b"\x01\x02\x03\x04", b"z", now=1.0)
    assert q.stats.dropped_destinations == 1
    # once A's packets expire the slot is free again
    assert q.push(b"\x01\x02\x03\x04", b"z", now=10.0)
    assert q.stats.expired == 2


def test_expiry_with_explicit_clock() -> None:
    q = PendingPackets(max_age=2.0)
    q.push(A, b"old", now=0.0)
    q.push(A, b"new", now=1.5)
    q.push(B, b"b", now=1.0)
    assert q.next_expiry() == 2.0
    assert q.expire(now=2.0) == []  # exactly max_age old is still fine
    assert q.expire(now=2.6) == []  # A keeps "new"
    assert q.stats.expired == 1
    assert q.expire(now=3.1) == [B]
    assert q.release(A, now=3.4) == [b"new"]
    assert q.next_expiry() is None and len(q) == 0


def test_release_drops_stale_packets() -> None:
    q = PendingPackets(max_age=1.0)
    q.push(A, b"1", now=0.0)
    q.push(A, b"2", now=0.8)
    assert q.release(A, now=1.5) == [b"2"]
    assert q.stats.expired == 1


def test_discard_counts() -> None:
    q = PendingPackets()
    q.push(A, b"1", now=0.0)
    q.push(A, b"2", now=0.0)
    assert q.discard(A) == 2 and q.discard(A) == 0
    assert q.stats.discarded == 2 and len(q) == 0


def test_destinations_oldest_first() -> None:
    q = PendingPackets()
    q.push(B, b"", now=1.0)
    q.push(A, b"", now=2.0)
    assert q.destinations() == [B, A]


def test_bad_bounds_refused() -> None:
    with pytest.raises(ValueError):
        PendingPackets(max_packets=0)


@given(st.lists(st.tuples(st.sampled_from([A, B, b"\x09" * 4]), st.floats(0, 0.5)), max_size=200))
def test_accounting_invariant(pushes: list[tuple[bytes, float]]) -> None:
    q = PendingPackets(max_packets=5, max_destinations=2, max_age=1.0)
    now = 0.0
    for dest, step in pushes:
        now += step
        q.push(dest, b"p", now=now)
        assert len(q) <= 10
        assert len(q.destinations()) <= 2
    released = sum(len(q.release(d, now=now)) for d in q.destinations())
    assert q.stats.queued == released + q.stats.expired
    assert q.stats.queued + q.stats.dropped_full + q.stats.dropped_destinations == len(pushes)


def test_bytes_bound_per_destination() -> None:
    # A TUN with offloads hands over 64 KB reads: the queue is bounded in bytes too.
    from cyphonic_agent.pending import PendingPackets as Pending

    q = Pending(max_packets=64, max_bytes=150_000)
    big = b"\x45" + bytes(65_000)
    assert q.push(b"\x01\x02\x03\x04", big, now=0.0)
    assert q.push(b"\x01\x02\x03\x04", big, now=0.0)
    assert not q.push(b"\x01\x02\x03\x04", big, now=0.0)  # would pass 150,000 bytes
    assert q.push(b"\x01\x02\x03\x04", b"\x45" + bytes(100), now=0.0)  # small still fits
    assert q.stats.dropped_full == 1 and len(q) == 3
    q.expire(now=10.0)
    assert len(q) == 0
    assert q.push(b"\x01\x02\x03\x04", big, now=10.0)  # the expired bytes were given back
