"""End to end, nothing mocked: ``cyphonic-as`` and ``cyphonic-nms`` on UDP 443 in the test
bed's cloud, nodes enrolled with ``cyphonic-agent enroll`` and joined with ``cyphonic-agent
up``; applications use the overlay by name through the agent's DNS stub.

(a) pattern 1: two IPv6-only nodes, bob behind the enterprise firewall (out: TCP 80/443 and
    UDP 443 only; in: replies only). bob resolves alice, so bob connects out.
(b) pattern 2: alice behind an IPv4 NAT and the same firewall, bob on a global IPv4 address.
(c) the firewall also drops UDP 443: alice cannot join, and says why.

Each of (a) and (b): the time from the DNS answer to the first echo reply on the fresh route,
ping over the overlay's IPv4 and IPv6 addresses, a 2 MB TCP transfer whose SHA-256 is
checked at the receiver, ``cyphonic-agent status``, and a capture of the firewall's outside
interface holding nothing but UDP to or from port 443 and never the marker sent in clear.
"""

from __future__ import annotations

import sys
import time

import pytest
from cyphonic_testbed import FirewallPolicy, pattern1, pattern2
from cyphonic_testbed.overlay import first_reply_in
from e2e_harness import (
    MARKER,
    Overlay,
    marked_payload,
    not_quic_udp_443,
    packets_seen,
    ping,
    sha256,
    tcp_transfer,
    udp_bytes,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(420)]

DOMAIN = "cyphonic.internal"


def _report(label: str, probe: dict[str, float]) -> None:
    sys.stderr.write(
        f"\n{label}: DNS answer in {probe['dns_ms']:.1f} ms, first echo reply "
        f"{probe['first_reply_ms']:.1f} ms after it "
        f"({probe['requests_sent']} requests sent)\n"
    )


def _overlay_works(o: Overlay, *, src: str, dst: str, pattern: str, path: str) -> int:
    """Route from ``src`` to ``dst`` set up by a DNS lookup; checks every use; bytes sent."""
    source, target = o.agents[src], o.agents[dst]
    src_node, dst_node = o.bed.host(src), o.bed.host(dst)

    # A fresh route: the lookup starts it, the first echo reply proves it carries packets.
    probe = first_reply_in(src_node, target.fqdn, timeout=15)
    _report(f"{src} -> {dst} ({pattern})", probe)
    assert probe["first_reply_ms"] < 5000  # the figure itself is reported, target < 50 ms

    theirs = target.status()
    v4, v6 = source.resolve(target.fqdn, "A"), source.resolve(target.fqdn, "AAAA")
    assert v4 == [theirs["virtual_ipv4"]] and v6 == [theirs["virtual_ipv6"]]
    assert probe["address"] == v4[0]
    unknown = source.dig(f"nobody.{DOMAIN}")
    assert "status: NXDOMAIN" in unknown.stdout, unknown.stdout

    for address in (v4[0], v6[0]):
        result = ping(src_node, address)
        assert " 0% packet loss" in result.stdout, result.stdout + result.stderr

    payload = marked_payload()
    assert tcp_transfer(src_node, dst_node, listen=v4[0], connect=v4[0], payload=payload) == sha256(
        payload
    )

    mine = source.status()
    assert mine["nms_state"] == "connected" and mine["tun"] == "cyphonic0"
    (peer,) = [p for p in mine["peers"] if p["fqdn"] == target.fqdn]
    assert (peer["state"], peer["pattern"], peer["path"]) == ("up", pattern, path)
    assert peer["tx_bytes"] >= len(payload) and peer["rx_packets"] > 0
    assert peer["rtt_ms"] is not None and peer["rtt_ms"] > 0 and peer["mtu"] == 1420
    assert target.fqdn in source.status_table()
    return len(payload)


def _stops_cleanly(o: Overlay) -> None:
    for name, agent in o.agents.items():
        assert agent.stop() == 0, agent.log_text()[-3000:]
        gone = o.bed.host(name).run(["ip", "link", "show", "cyphonic0"])
        assert gone.returncode != 0, f"{name}: TUN device left behind"
        assert "agent_stopped" in agent.log_text()


def test_pattern1_ipv6_nodes_one_behind_the_enterprise_firewall(overlay: object) -> None:
    o: Overlay = overlay(pattern1())  # type: ignore[operator]
    gwb = o.bed.router("gwb")
    with gwb.capture(gwb.interface("wanb")) as wire:
        o.start("alice")
        o.start("bob")
        o.alice.wait_up()
        o.bob.wait_up()
        # bob sits behind the firewall: the NMS's reachability probe found that nothing gets
        # in, so he is the side that connects out (pattern 2 for IPv6: docs/nms.md).
        o.services.wait_probed([o.alice.fqdn, o.bob.fqdn])
        sent = _overlay_works(
            o,
            src="bob",
            dst="alice",
            pattern="nat_connects",
            path=f"[{o.bed.host('alice').address('lana', 6)}]:443",
        )
    # The transfer crossed this interface...
    assert udp_bytes(wire) > sent, (udp_bytes(wire), len(wire.packets()), packets_seen(wire))
    assert not_quic_udp_443(wire) == []  # ...as QUIC on UDP 443 only...
    assert not wire.contains_anywhere(MARKER)  # ...and never in clear
    _stops_cleanly(o)


def test_pattern2_natted_node_behind_the_firewall_and_a_global_node(overlay: object) -> None:
    o: Overlay = overlay(pattern2())  # type: ignore[operator]
    gwa = o.bed.router("gwa")
    with gwa.capture(gwa.interface("wana")) as wire:
        o.start("alice")
        o.start("bob")
        o.alice.wait_up()
        o.bob.wait_up()
        sent = _overlay_works(
            o,
            src="alice",
            dst="bob",
            pattern="nat_connects",
            path=f"{o.bed.host('bob').address('lanb', 4)}:443",
        )
        # The other way round over the same tunnel: bob reaches alice behind her NAT.
        alice_v4 = o.bob.resolve(o.alice.fqdn, "A")[0]
        result = ping(o.bed.host("bob"), alice_v4)
        assert " 0% packet loss" in result.stdout, result.stdout
        (peer,) = o.bob.status()["peers"]
        nat_outside = gwa.address("wana", 4)
        assert (peer["fqdn"], peer["path"]) == (o.alice.fqdn, f"{nat_outside}:443")
    assert udp_bytes(wire) > sent, (udp_bytes(wire), len(wire.packets()), packets_seen(wire))
    assert not_quic_udp_443(wire) == []
    assert not wire.contains_anywhere(MARKER)
    _stops_cleanly(o)


def test_no_overlay_when_the_firewall_drops_udp_443_and_the_agent_says_why(
    overlay: object,
) -> None:
    o: Overlay = overlay(pattern2(firewall=FirewallPolicy.ENTERPRISE_NO_UDP))  # type: ignore[operator]
    gwa = o.bed.router("gwa")
    with (
        gwa.capture(gwa.interface("lana"), "udp") as inside,
        gwa.capture(gwa.interface("wana"), "udp") as outside,
    ):
        bob = o.start("bob")
        # UDP only (--no-tcp): with the TCP 443 transport she would come up over TCP
        # (tests/netns/transport).
        alice = o.start("alice", "--connect-timeout", "3", "--give-up-after", "8", "--no-tcp")
        bob.wait_up()
        assert alice.wait_exit(90) == 1
    log = alice.log_text()
    as_address = o.services.as_node.address("cloud", 4)
    expected = (
        f"cannot reach the AS at {as_address}:443 over UDP: no answer in 3 s; "
        "a firewall may be blocking UDP 443"
    )
    assert expected in log, log[-3000:]
    assert "cyphonic-agent: unavailable:" in log
    # alice did try (UDP 443 inside the firewall) and nothing got through it.
    assert any(p.dport == 443 for p in inside.packets())
    assert outside.packets() == []
    # bob cannot reach her either: she never registered, so the name does not resolve.
    answer = bob.dig(alice.fqdn)
    assert "status: SERVFAIL" in answer.stdout, answer.stdout
    assert "overlay_up" not in log
    assert bob.stop() == 0


def test_pattern1_the_open_node_reaches_the_firewalled_one(overlay: object) -> None:
    o: Overlay = overlay(pattern1())  # type: ignore[operator]
    alice, bob = o.start("alice"), o.start("bob")
    alice.wait_up()
    bob.wait_up()
    # The NMS's reachability probe found at registration that nothing gets in to bob (his
    # firewall), so when alice, on the open network, asks, bob is told to connect out from
    # the first packet: no 2 s wait for a route reversal (issue 14, item 5).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log = o.services.log("nms").read_text(errors="replace")
        if any("reach_probed" in line and bob.fqdn in line for line in log.splitlines()):
            break
        time.sleep(0.2)
    bob_v4 = alice.resolve(bob.fqdn)[0]
    result = o.bed.host("alice").run(
        ["ping", "-c", "6", "-i", "0.5", "-W", "6", bob_v4], timeout=40
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"event": "route_reversed"' not in bob.log_text() + alice.log_text()
    (peer,) = alice.status()["peers"]
    assert (peer["state"], peer["pattern"]) == ("up", "nat_connects")
    assert peer["reason_code"] == "inbound_blocked", peer
    again = ping(o.bed.host("alice"), bob_v4)
    assert " 0% packet loss" in again.stdout, again.stdout
    _stops_cleanly(o)
