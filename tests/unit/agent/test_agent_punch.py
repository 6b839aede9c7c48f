"""Hole punching schedule (cyphonic_agent.punch) with a fake clock: probes from the delay on,
every interval, over the window; direct when QUIC validated the path; back to the relay when
the direct path stalls; a reconnect when the connection has no path change left."""

from __future__ import annotations

from cyphonic_agent.punch import (
    MAX_PATH_CHANGES,
    HolePunchPlan,
    ProbePeer,
    ProbeRelay,
    PunchState,
    Reconnect,
    Stop,
    Wait,
)


def plan(**kw: float) -> HolePunchPlan:
    return HolePunchPlan(started=10.0, delay=0.2, interval=0.1, window=1.0, check=0.5, **kw)


def test_waits_for_the_delay_then_probes_every_interval() -> None:
    p = plan()
    first = p.tick(now=10.0, direct=False, stalled=False)
    assert isinstance(first, Wait) and abs(first.seconds - 0.2) < 1e-9
    assert p.tick(now=10.2, direct=False, stalled=False) == ProbePeer()
    assert p.state is PunchState.PROBING
    step = p.tick(now=10.25, direct=False, stalled=False)
    assert isinstance(step, Wait) and abs(step.seconds - 0.05) < 1e-9
    assert p.tick(now=10.3, direct=False, stalled=False) == ProbePeer()
    assert p.probes_sent == 2


def test_gives_up_after_the_window_and_stays_relayed() -> None:
    p = plan()
    now = 10.2
    while now < 11.2:
        p.tick(now=now, direct=False, stalled=False)
        now += 0.1
    assert p.tick(now=11.2, direct=False, stalled=False) == Stop()
    assert p.state is PunchState.GAVE_UP
    # No endless punching: it stays stopped.
    assert p.tick(now=50.0, direct=False, stalled=False) == Stop()
    assert p.probes_sent <= 11


def test_direct_once_validated_then_watched() -> None:
    p = plan()
    p.tick(now=10.2, direct=False, stalled=False)
    assert p.tick(now=10.31, direct=True, stalled=False) == Wait(0.5)
    assert p.state is PunchState.DIRECT and p.direct_at == 10.31 and p.path_changes == 1
    assert p.tick(now=30.0, direct=True, stalled=False) == Wait(0.5)


def test_stalled_direct_path_falls_back_to_the_relay() -> None:
    p = plan()
    p.tick(now=10.2, direct=False, stalled=False)
    p.tick(now=10.3, direct=True, stalled=False)
    # A passing pile-up of probe timeouts (a path change makes one) is not a dead path.
    assert p.tick(now=20.0, direct=True, stalled=True) == Wait(0.5)
    assert p.tick(now=20.5, direct=True, stalled=False) == Wait(0.5)
    assert p.tick(now=21.0, direct=True, stalled=True) == Wait(0.5)
    assert p.tick(now=22.0, direct=True, stalled=True) == ProbeRelay()
    assert p.state is PunchState.FALLING_BACK
    assert isinstance(p.tick(now=22.05, direct=True, stalled=True), Wait)
    assert p.tick(now=22.1, direct=True, stalled=True) == ProbeRelay()
    # QUIC validated the relay path again.
    assert p.tick(now=22.2, direct=False, stalled=False) == Stop()
    assert p.state is PunchState.RELAYED and p.path_changes == 2


def test_fallback_that_reaches_nothing_reconnects() -> None:
    p = plan()
    p.tick(now=10.2, direct=False, stalled=False)
    p.tick(now=10.3, direct=True, stalled=False)
    p.tick(now=20.0, direct=True, stalled=True)
    assert p.tick(now=21.0, direct=True, stalled=True) == ProbeRelay()
    assert p.tick(now=22.0, direct=True, stalled=True) == Reconnect()


def test_no_path_change_left_reconnects_instead_of_falling_back() -> None:
    p = plan()
    p.path_changes = MAX_PATH_CHANGES - 1
    p.tick(now=10.2, direct=False, stalled=False)
    p.tick(now=10.3, direct=True, stalled=False)
    assert p.path_changes == MAX_PATH_CHANGES
    p.tick(now=20.0, direct=True, stalled=True)
    assert p.tick(now=21.0, direct=True, stalled=True) == Reconnect()


def test_core_back_on_the_relay_by_itself_stops() -> None:
    p = plan()
    p.tick(now=10.2, direct=False, stalled=False)
    p.tick(now=10.3, direct=True, stalled=False)
    assert p.tick(now=15.0, direct=False, stalled=False) == Stop()
    assert p.state is PunchState.RELAYED
