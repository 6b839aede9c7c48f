"""``cyphonic_testbed.interruption``: the ping stream's longest gap and the TCP stream's stall
and content check, read from real flows across an outage of known length."""

from __future__ import annotations

import time

import pytest
from cyphonic_testbed import move_nat_nat
from cyphonic_testbed.bed import Move
from cyphonic_testbed.interruption import measure_move, read_ping

pytestmark = pytest.mark.timeout(120)

OUTAGE_S = 0.4

PING_OUTPUT = """PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.
[1700000000.000000] 64 bytes from 10.0.0.2: icmp_seq=1 ttl=64 time=0.1 ms
[1700000000.010000] 64 bytes from 10.0.0.2: icmp_seq=2 ttl=64 time=0.1 ms
[1700000000.020000] 64 bytes from 10.0.0.2: icmp_seq=3 ttl=64 time=0.1 ms
[1700000000.020100] 64 bytes from 10.0.0.2: icmp_seq=3 ttl=64 time=0.1 ms (DUP!)
[1700000000.520000] 64 bytes from 10.0.0.2: icmp_seq=53 ttl=64 time=0.1 ms
[1700000000.530000] 64 bytes from 10.0.0.2: icmp_seq=54 ttl=64 time=0.1 ms

--- 10.0.0.2 ping statistics ---
54 packets transmitted, 5 received, +1 duplicates, 90.7407% packet loss, time 540ms
"""


def test_read_ping_finds_the_longest_gap_and_ignores_duplicates() -> None:
    reading = read_ping(PING_OUTPUT)
    assert (reading.sent, reading.received) == (54, 5)
    assert reading.longest_gap_ms == pytest.approx(500.0, abs=0.01)
    assert reading.gap_started_at == pytest.approx(1700000000.02)
    assert read_ping("").longest_gap_ms is None


def test_an_outage_shows_as_a_gap_and_a_stall_and_the_stream_stays_intact(
    netbed: object,
) -> None:
    bed = netbed(move_nat_nat(services=(), firewall=None))  # type: ignore[operator]
    alice, bob, core = bed.host("alice"), bed.host("bob"), bed.router("core")

    def outage() -> Move:  # bob's network cut off for OUTAGE_S
        started = time.time()
        core.run(["ip", "link", "set", "lanb", "down"], check=True)
        time.sleep(OUTAGE_S)
        core.run(["ip", "link", "set", "lanb", "up"], check=True)
        return Move(
            host="bob",
            left=("lanb",),
            joined="lanb",
            started_at=started,
            detached_s=0.0,
            attached_s=OUTAGE_S,
        )

    result = measure_move(
        src=alice,
        dst=bob,
        address=bob.address("lanb", 4),
        move=outage,
        size=3_000_000,
        rate=1_500_000.0,
        settle=0.5,
    )
    assert result.tcp_intact and result.tcp_bytes == 3_000_000
    assert result.sender["sha256"] == result.receiver["sha256"]
    assert result.ping_gap_ms is not None and result.ping_gap_ms >= OUTAGE_S * 1000 * 0.9
    assert result.ping.received < result.ping.sent
    assert result.tcp_stall_ms >= OUTAGE_S * 1000 * 0.9
    # The gap opened around the outage, not somewhere else in the stream.
    assert result.ping.gap_started_at is not None and result.move is not None
    assert abs(result.ping.gap_started_at - result.move.started_at) < 1.0
