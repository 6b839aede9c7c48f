"""Resilience with real processes (pattern 2 topology): tunnels outlive the NMS, agents find
the NMS again by themselves, and a peer that vanishes without a word is noticed by QUIC's
idle timeout; its route is torn down and the next packet builds a new one."""

from __future__ import annotations

import json

import pytest
from cyphonic_testbed import pattern2
from cyphonic_testbed.wait import wait_for
from e2e_harness import Overlay, ping

pytestmark = [pytest.mark.netns, pytest.mark.timeout(420)]

# A short idle timeout so that a vanished peer is noticed within seconds.
FAST = ("--peer-timeout", "6", "--tunnel-keepalive", "2")


def _events(text: str, event: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{") and f'"event": "{event}"' in line:
            out.append(json.loads(line))
    return out


def test_tunnels_outlive_the_nms_and_a_vanished_peer_is_rebuilt(overlay: object) -> None:
    o: Overlay = overlay(pattern2())  # type: ignore[operator]
    alice, bob = o.start("alice", *FAST), o.start("bob", *FAST)
    alice.wait_up()
    bob.wait_up()
    alice_node = o.bed.host("alice")
    bob_v4 = alice.resolve(bob.fqdn)[0]
    first = ping(alice_node, bob_v4)
    assert " 0% packet loss" in first.stdout, first.stdout

    # The NMS goes away: the tunnel does not care.
    assert o.services.stop_service("nms") == 0
    alice.wait_logged("nms_unreachable")
    during = ping(alice_node, bob_v4, count=15)
    assert " 0% packet loss" in during.stdout, during.stdout
    status = alice.status()
    assert status["nms_state"] != "connected"
    assert [(p["fqdn"], p["state"]) for p in status["peers"]] == [(bob.fqdn, "up")]

    # The NMS comes back: both agents register again on their own, same addresses.
    o.services.restart_service("nms")
    alice.wait_logged('"event": "registered"', count=2, timeout=90)
    bob.wait_logged('"event": "registered"', count=2, timeout=90)
    assert alice.status()["nms_state"] == "connected"
    assert alice.resolve(bob.fqdn) == [bob_v4]
    after = ping(alice_node, bob_v4)
    assert " 0% packet loss" in after.stdout, after.stdout

    # bob vanishes without closing anything: alice's side times out and drops the route.
    bob.proc.kill()
    bob.proc.wait(timeout=10)
    alice.wait_logged('"event": "tunnel_down"', timeout=40)
    (down,) = _events(alice.log_text(), "tunnel_down")
    assert "idle timeout" in str(down["reason"]), down
    assert wait_for(lambda: alice.status()["peers"] == [], 10)

    # bob returns; alice's next packets ask for a new route and flow through it.
    bob = o.start("bob", *FAST)
    bob.wait_up()
    again = ping(alice_node, bob_v4, count=5)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(_events(alice.log_text(), "tunnel_up")) == 2
    (peer,) = alice.status()["peers"]
    assert (peer["fqdn"], peer["state"]) == (bob.fqdn, "up")
    assert alice.stop() == 0 and bob.stop() == 0
