"""UDP or TCP 443 (``cyphonic.quic.path_choice``), with an explicit clock."""

from __future__ import annotations

import pytest
from cyphonic.quic.path_choice import Carrier, PathChoice, RaceStart


def test_udp_first_then_tcp_after_the_delay() -> None:
    choice = PathChoice(race_delay_s=0.5, probe_interval_s=30)
    assert choice.carrier is Carrier.UDP
    assert choice.connecting() == RaceStart(stream_after=0.5, udp=True)


def test_blocked_goes_straight_to_the_stream_and_probes() -> None:
    choice = PathChoice(race_delay_s=0.5, probe_interval_s=30)
    assert choice.carried_by_stream(100.0)
    assert not choice.carried_by_stream(101.0)  # not news twice
    assert choice.carrier is Carrier.TCP
    assert choice.connecting() == RaceStart(stream_after=0.0, udp=False)
    assert not choice.probe_due(129.9)
    assert choice.probe_due(130.0)
    choice.probe_started(130.0)
    assert not choice.probe_due(1000.0)  # one probe at a time
    choice.probe_failed(133.0)
    assert choice.carrier is Carrier.TCP and choice.probe_due(163.0)
    choice.probe_started(163.0)
    assert choice.udp_answered()  # UDP is back: move
    assert choice.carrier is Carrier.UDP and choice.switches_to_udp == 1
    assert not choice.udp_answered()  # already on UDP
    assert not choice.probe_due(10_000.0)
    assert choice.probes == 2


def test_proxy_and_disabled() -> None:
    proxied = PathChoice(via_proxy=True)
    proxied.carried_by_stream(1.0)
    assert proxied.carrier is Carrier.PROXY and proxied.stream_carrier is Carrier.PROXY
    off = PathChoice(enabled=False)
    assert off.connecting() == RaceStart(stream_after=None, udp=True)
    with pytest.raises(ValueError):
        PathChoice(probe_interval_s=0)
