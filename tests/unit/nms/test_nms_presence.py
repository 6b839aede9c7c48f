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
