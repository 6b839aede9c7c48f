"""Presence deadlines with an explicit clock."""

from __future__ import annotations

from cyphonic_nms.presence import PresenceTracker


def test_node_expires_after_timeout_only() -> None:
    tracker = PresenceTracker(offline_timeout_s=45)
    tracker.seen("a", 0.0)
    assert tracker.expire(44.9) == []
    assert tracker.next_deadline() == 45.0
    assert tracker.expire(45.0) == ["a"]
    assert "a" not in tracker and len(tracker) == 0
    assert tracker.expire(100.0) == []


def test_keepalive_pushes_the_deadline() -> None:
    tracker = PresenceTracker(offline_timeout_s=45)
    tracker.seen("a", 0.0)
    tracker.seen("a", 15.0)
    tracker.seen("a", 30.0)
    assert tracker.expire(60.0) == []
    assert tracker.next_deadline() == 75.0
    assert tracker.last_seen("a") == 30.0
    assert tracker.expire(75.0) == ["a"]


def test_forgotten_node_never_expires() -> None:
    tracker = PresenceTracker(offline_timeout_s=10)
    tracker.seen("a", 0.0)
    tracker.seen("b", 1.0)
    tracker.forget("a")
    assert tracker.next_deadline() == 11.0
    assert tracker.expire(20.0) == ["b"]


def test_many_nodes_expire_in_deadline_order() -> None:
    tracker = PresenceTracker(offline_timeout_s=5)
    for i in range(100):
        tracker.seen(f"n{i}", float(i))
    assert tracker.expire(54.0) == [f"n{i}" for i in range(50)]
    assert len(tracker) == 50


def test_heap_keeps_one_entry_per_node_however_often_it_is_seen() -> None:
    tracker = PresenceTracker(offline_timeout_s=45_000)
    for i in range(30_000):
        tracker.seen(f"n{i % 3}", float(i))  # a flood of requests from three nodes
    assert tracker.heap_size == 3
    # Deadlines still follow the last sighting of each node (n0 at 29997, n2 at 29999).
    assert tracker.next_deadline() == 29_997 + 45_000
    assert tracker.expire(29_997 + 45_000) == ["n0"]
    assert tracker.expire(29_999 + 45_000) == ["n1", "n2"]
    assert tracker.heap_size == 0


def test_forget_and_come_back_keeps_one_entry() -> None:
    tracker = PresenceTracker(offline_timeout_s=10)
    for round_ in range(1000):
        tracker.seen("a", float(round_))
        tracker.forget("a")
        tracker.seen("a", float(round_) + 0.5)
    assert tracker.heap_size == 1
    assert tracker.expire(1009.4) == []
    assert tracker.expire(1009.5) == ["a"]


def test_forgotten_nodes_are_compacted_away() -> None:
    tracker = PresenceTracker(offline_timeout_s=10)
    for i in range(1000):
        tracker.seen(f"n{i}", 0.0)
    for i in range(1000):
        tracker.forget(f"n{i}")
    assert tracker.heap_size <= 64
    tracker.seen("n5", 1.0)
    assert tracker.expire(11.0) == ["n5"]
