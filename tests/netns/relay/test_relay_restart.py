"""A TRS process killed and restarted in the middle of a relayed transfer, nothing mocked.

Two ``cyphonic-trs`` replicas (0 and 1, each in its own cloud host) share the bed's Redis;
the NMS picks one of them for the route between alice and bob, each behind a symmetric
NAT and the enterprise firewall (``double_nat``), joined with ``cyphonic-agent up``. While
a paced TCP transfer runs from alice to bob's virtual address through the relay (and a
ping every 10 ms beside it), the replica carrying the route is killed with SIGKILL (no
chance to save anything) and started again, same host, same replica number.

The restarted replica reloads the session from Redis; the nodes do nothing special: QUIC
and the inner TCP retransmit what was lost while nothing listened, and the transfer
completes with every byte correct (SHA-256 checked at the receiver). The other replica is
not involved. Printed (``-s``): how long the TRS was down, the longest gap in the ping
stream and the longest TCP stall at the receiver.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import pytest
from cyphonic_testbed import double_nat
from cyphonic_testbed.interruption import measure_move
from relay_bed import TrsProcess, start_trs

pytestmark = [pytest.mark.netns, pytest.mark.timeout(480)]

SERVICES = ("as", "nms", "trs", "trs2", "redis")
SIZE = 12_000_000
RATE = 1_500_000
"""Bytes per second the sender paces itself to: the transfer lasts about 8 s unhindered."""


def _sessions(trs: TrsProcess) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = trs.get("/v1/sessions")["items"]
    return items


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s")
        time.sleep(0.2)


def test_trs_process_killed_mid_transfer_comes_back_by_itself(relay_overlay: Any) -> None:
    o = relay_overlay(double_nat(services=SERVICES))
    replicas = {
        "trs": o.trs,
        "trs2": start_trs(o.services, host="trs2", redis_url=o.redis_url, replica=1),
    }
    _wait(lambda: len(o.trs.get("/v1/replicas")) == 2, 30, "both replicas registered in Redis")
    alice, bob = o.start("alice"), o.start("bob")
    alice.wait_up()
    bob.wait_up()
    a_node, b_node = o.bed.host("alice"), o.bed.host("bob")
    vip = bob.status()["virtual_ipv4"]
    # The first packet to bob's virtual address asks the NMS for the route (pattern 3).
    _wait(
        lambda: a_node.run(["ping", "-n", "-c", "1", "-W", "1", vip], timeout=10).returncode == 0,
        60,
        "no relayed route to bob",
    )
    (row,) = [p for p in alice.status()["peers"] if p["fqdn"] == bob.fqdn]
    assert row["pattern"] == "relay", row
    holding = {host: _sessions(t) for host, t in replicas.items()}
    (host,) = [h for h, items in holding.items() if items]  # exactly one replica carries it
    (other,) = set(replicas) - {host}
    (session,) = holding[host]
    victim = replicas[host]
    tunnels_before = alice.log_text().count('"tunnel_up"')

    restarted: list[TrsProcess] = []
    moments: dict[str, float] = {}

    def kill_and_restart() -> None:
        """SIGKILL the replica carrying the route, then start it again the same way."""
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(timeout=10)
        moments["killed"] = time.time()
        # A fresh log, so that its start is what is waited for.
        os.replace(victim.log, victim.log.with_suffix(".killed.log"))
        restarted.append(
            start_trs(
                o.services, host=host, redis_url=o.redis_url, replica=0 if host == "trs" else 1
            )
        )
        moments["serving"] = time.time()

    # A quarter of the transfer is through when the relay dies.
    result = measure_move(
        src=a_node,
        dst=b_node,
        address=vip,
        move=kill_and_restart,
        size=SIZE,
        rate=RATE,
        settle=2.0,
        timeout=180.0,
    )
    (restarted_trs,) = restarted
    replicas[host] = restarted_trs
    if host == "trs":
        o.trs = restarted_trs

    assert result.tcp_intact, (result.sender, result.receiver)
    # The relay died mid-transfer: the stream was still being sent when it was killed.
    assert result.sender["started_at"] + result.sender["seconds"] > moments["killed"]
    assert result.ping.received > 0.5 * result.ping.sent  # pings flow before and after
    # The restarted replica reloaded the route from Redis and carried the rest of it.
    replica = restarted_trs.get("/v1/replica")
    assert replica["restored_at_start"] >= 1, replica
    (after,) = _sessions(restarted_trs)
    assert after["route_id"] == session["route_id"]
    assert {s["fqdn"]: s["address"] for s in after["sides"]} == {
        s["fqdn"]: s["address"] for s in session["sides"]
    }
    assert after["bytes"] > 0 and replica["forwarded_packets"] > 0
    assert _sessions(replicas[other]) == []  # the other replica was never involved
    same_tunnel = alice.log_text().count('"tunnel_up"') == tunnels_before
    serving_s = moments["serving"] - moments["killed"]
    sys.stderr.write(
        f"\nTRS {host} (replica {replica['replica']}) SIGKILLed mid-transfer: serving again "
        f"{serving_s:.1f} s later, {replica['restored_at_start']} session(s) reloaded from "
        f"Redis; {SIZE / 1e6:g} MB transfer complete and correct; longest gap in the 10 ms "
        f"ping stream {result.ping_gap_ms or 0:.0f} ms ({result.ping.received}/{result.ping.sent} "
        f"replies); longest TCP stall at the receiver {result.tcp_stall_ms:.0f} ms; "
        f"{'same' if same_tunnel else 'a new'} tunnel afterwards\n"
    )
