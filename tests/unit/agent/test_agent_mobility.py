"""Move detection: the sans-I/O detector, the watcher's fallback check, the status view."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import types
from collections.abc import Iterable

import pytest
from cyphonic_agent import mobility
from cyphonic_agent.mobility import (
    Handover,
    HostPath,
    Move,
    MoveDetector,
    MoveWatcher,
    PathLost,
    host_path,
    seen_on_old_path,
)
from cyphonic_agent.status import AgentStatus, format_status

pytestmark = pytest.mark.timeout(20)


def _path(*addresses: str, routes: Iterable[str] = ("via 192.0.2.1",)) -> HostPath:
    return HostPath(
        addresses=frozenset(ipaddress.ip_address(a) for a in addresses),
        default_routes=frozenset(routes),
    )


OLD = _path("192.168.1.10", routes=["via 192.168.1.1"])
NEW = _path("192.168.3.10", routes=["via 192.168.3.1"])


async def _watch_until(watcher: MoveWatcher, done: asyncio.Event) -> None:
    """Run ``watcher`` until ``done`` is set (5 s at most), then stop it."""
    task = asyncio.ensure_future(watcher.run())
    try:
        await asyncio.wait_for(done.wait(), timeout=5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_first_snapshot_is_the_baseline() -> None:
    detector = MoveDetector()
    assert detector.observe(OLD) is None
    assert detector.observe(OLD) is None
    assert detector.baseline == OLD and detector.moves == 0


def test_a_move_in_steps_is_reported_once_when_settled() -> None:
    detector = MoveDetector()
    detector.observe(OLD)
    # the old interface loses its address (reported at once, once), then the new one comes
    # up before its route
    lost = _path(routes=["via 192.168.1.1"])
    assert detector.observe(lost) == PathLost(old=OLD, now=lost)
    assert detector.observe(_path()) is None
    assert detector.observe(_path("192.168.3.10", routes=[])) is None
    move = detector.observe(NEW)
    assert move == Move(old=OLD, new=NEW)
    assert detector.observe(NEW) is None
    assert detector.moves == 1


def test_path_that_comes_back_is_no_move() -> None:
    detector = MoveDetector()
    detector.observe(OLD)
    assert isinstance(detector.observe(_path()), PathLost)
    assert detector.observe(OLD) is None
    assert isinstance(detector.observe(_path()), PathLost)  # lost again: reported again
    assert detector.moves == 0 and detector.baseline == OLD


def test_an_added_address_is_no_loss() -> None:
    detector = MoveDetector()
    detector.observe(OLD)
    assert detector.observe(_path("192.168.1.10", "192.168.3.10", routes=[])) == PathLost(
        old=OLD, now=_path("192.168.1.10", "192.168.3.10", routes=[])
    )
    detector = MoveDetector()
    detector.observe(OLD)
    both = _path("192.168.1.10", "192.168.3.10", routes=["via 192.168.1.1"])
    assert detector.observe(both) == Move(old=OLD, new=both)


def test_new_gateway_alone_is_a_move() -> None:
    detector = MoveDetector()
    detector.observe(OLD)
    moved = _path("192.168.1.10", routes=["via 192.168.1.254"])
    assert detector.observe(moved) == Move(old=OLD, new=moved)


def test_no_usable_start_waits_for_one() -> None:
    detector = MoveDetector()
    assert detector.observe(_path()) is None
    assert detector.baseline is None
    assert detector.observe(OLD) is None  # the first usable path is the baseline, no move
    assert detector.baseline == OLD


def test_host_path_reads_this_host() -> None:
    path = host_path()
    assert all(not a.is_loopback and not a.is_link_local for a in path.addresses)
    assert all(r.startswith(("via ", "dev ")) for r in path.default_routes)


async def test_watcher_fallback_check_reports_moves() -> None:
    snapshots = [OLD, OLD, _path(), NEW]
    moves: list[Move] = []
    losses: list[PathLost] = []
    got = asyncio.Event()

    def snapshot(*, exclude_ifindexes: list[int]) -> HostPath:
        assert exclude_ifindexes == [7]
        return snapshots.pop(0) if len(snapshots) > 1 else snapshots[0]

    async def on_move(move: Move) -> None:
        moves.append(move)
        got.set()

    watcher = MoveWatcher(
        on_move=on_move,
        on_lost=losses.append,
        exclude_ifindexes=lambda: [7],
        poll_s=0.01,
        snapshot=snapshot,
    )
    await _watch_until(watcher, got)
    assert moves == [Move(old=OLD, new=NEW)]
    assert losses == [PathLost(old=OLD, now=_path())]


async def test_watcher_polls_slowly_while_netlink_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host is read in a thread (the data path then competes for the GIL): with a
    netlink subscription only every POLL_NETLINK_S, without one every POLL_S."""
    monkeypatch.setattr(mobility, "POLL_S", 0.02)
    monkeypatch.setattr(mobility, "POLL_NETLINK_S", 3600.0)
    calls: list[float] = []

    def snapshot(*, exclude_ifindexes: list[int]) -> HostPath:
        calls.append(0.0)
        return OLD

    async def on_move(move: Move) -> None:
        pass

    watcher = MoveWatcher(on_move=on_move, snapshot=snapshot)
    task = asyncio.ensure_future(watcher.run())
    await asyncio.sleep(0.3)
    assert watcher.period() == 3600.0  # subscribed (netlink works in the test process)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(calls) == 1  # the first reading only

    def no_netlink(*args: object) -> object:
        raise OSError("netlink refused (test)")

    calls.clear()
    monkeypatch.setattr(
        mobility,
        "socket",
        types.SimpleNamespace(
            socket=no_netlink,
            AF_NETLINK=0,
            SOCK_RAW=0,
            NETLINK_ROUTE=0,  # only what run() uses
        ),
    )
    watcher = MoveWatcher(on_move=on_move, snapshot=snapshot)
    task = asyncio.ensure_future(watcher.run())
    await asyncio.sleep(0.3)
    assert watcher.period() == 0.02
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(calls) >= 3


def test_status_shows_the_last_handover() -> None:
    handover = {
        "at": "2026-01-01T00:00:00.000+00:00",
        "old": OLD.describe(),
        "new": NEW.describe(),
        "nms_network": {"behind_nat": True},
    }
    status = AgentStatus(fqdn="a.cyphonic.internal", handovers=2, last_handover=handover)
    again = AgentStatus.from_dict(json.loads(json.dumps(status.to_dict())))
    assert again.last_handover == handover and again.handovers == 2
    text = format_status(again)
    assert (
        "moved      2026-01-01T00:00:00.000+00:00 (2 moves): 192.168.1.10 -> 192.168.3.10" in text
    )
    assert "moved" not in format_status(AgentStatus(fqdn="a.cyphonic.internal"))


async def test_watcher_survives_a_failing_hook() -> None:
    """A handover that raises (issue 14: qh3 refused a connection ID) costs that step only:
    the watcher goes on and reports the next move (a dead watcher missed the move back)."""
    snapshots = [OLD, _path(), NEW, _path(), OLD]
    moves: list[Move] = []
    back = asyncio.Event()

    def snapshot(*, exclude_ifindexes: list[int]) -> HostPath:
        return snapshots.pop(0) if len(snapshots) > 1 else snapshots[0]

    def on_lost(lost: PathLost) -> None:
        raise ValueError("invalid connection configuration: no unused peer connection ID")

    async def on_move(move: Move) -> None:
        moves.append(move)
        if move.new == OLD:
            back.set()
        else:
            raise RuntimeError("a failing handover")

    watcher = MoveWatcher(on_move=on_move, on_lost=on_lost, poll_s=0.01, snapshot=snapshot)
    await _watch_until(watcher, back)
    assert moves == [Move(old=OLD, new=NEW), Move(old=NEW, new=OLD)]


def test_a_registration_answered_by_the_old_path_is_seen() -> None:
    """server-move: bob re-registered on his migrated NMS connection before the NMS had
    validated his new path; it answered with his old address as the observed one and took
    him for a node behind NAT (a relay instead of pattern 2)."""
    old = _path("203.0.113.10", routes=["via 203.0.113.1"])
    new = _path("203.0.113.138", routes=["via 203.0.113.129"])
    handover = Handover(at=0.0, old=old, new=new)
    ip = ipaddress.ip_address
    assert seen_on_old_path(handover, [ip("203.0.113.10")])
    assert seen_on_old_path(handover, [ip("::ffff:203.0.113.10")])  # a dual-stack socket's form
    assert not seen_on_old_path(handover, [ip("203.0.113.138")])
    assert not seen_on_old_path(handover, [ip("198.51.100.2")])  # a NAT's public address
    assert not seen_on_old_path(handover, [])
    # An address both paths have (one uplink kept) is no sign of the old path.
    both = Handover(at=0.0, old=old, new=_path("203.0.113.10", "2001:db8:a::10"))
    assert not seen_on_old_path(both, [ip("203.0.113.10")])
