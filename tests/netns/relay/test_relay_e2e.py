"""Pattern 3 end to end, nothing mocked: ``cyphonic-as``, ``cyphonic-nms`` and ``cyphonic-trs``
on UDP 443 in the test bed's cloud (registry on Postgres, CID table and TRS directory in
Redis), nodes joined with ``cyphonic-agent up``; programs use the overlay by name through
the agent's DNS stub (the namespace's resolver points at it).

(a) ``double_nat()``: alice and bob each behind a symmetric NAT (endpoint-dependent
    mapping) and the enterprise firewall. No direct path exists; both reach the TRS.
(b) ``v4_v6()``: alice on an IPv4-only network, bob on an IPv6-only one; the TRS is
    dual-stack and joins the two families.

In each: ping by FQDN over the overlay's IPv4 and IPv6, a 2 MB TCP transfer to bob's name
with its SHA-256 checked at the receiver, ``cyphonic-agent status`` showing the path as
relayed via the TRS, the TRS's session table showing the pair, and a capture on the TRS's
cloud interface: only UDP 443, the marker never in clear.

That the TRS holds no keys of the node-to-node connection is shown three ways:
1. byte for byte: nearly every datagram the TRS sent to one node is one it received from
   the other node, unchanged (matched by UDP payload in the capture): it relays the tunnel's
   packets without decrypting and re-encrypting them; the rest are its own control traffic;
2. both agents authenticated the tunnel's peer as the other node (ALPN cyphonic-tun/1, the
   peer's node certificate and FQDN, at the TRS's address). The TRS has only a service
   certificate (``trs.svc.<domain>``) and key, which a node refuses as a tunnel peer;
3. the TRS process made no connection of the tunnel's ALPN: every connection it logged is a
   control connection (cyphonic-sig/1), and its session table lists routes, node names,
   addresses and CID counts only.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest
from cyphonic.hostport import format_host_port, parse_host_port
from cyphonic_testbed import double_nat, v4_v6
from relay_bed import (
    MARKER,
    capture_drops,
    forget_udp_mappings,
    json_log,
    marked_payload,
    ping_name,
    read_relay,
    sha256,
    stub_resolver,
    tcp_transfer,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(480)]

SERVICES = ("as", "nms", "trs", "redis")
DOMAIN = "cyphonic.internal"
TRS_NAME = f"trs.svc.{DOMAIN}"


def _relayed(
    o: Any,
    *,
    a_outside: str,
    b_outside: str,
    trs_seen_a: str,
    trs_seen_b: str,
) -> None:
    """Run every check of the module docstring for a bed whose agents are up."""
    alice, bob = o.agents["alice"], o.agents["bob"]
    a_node, b_node = o.bed.host("alice"), o.bed.host("bob")
    trs_node = o.trs.node
    trs_addresses = {trs_node.address("cloud", f) for f in (4, 6) if trs_node.has_family(f)}
    payload = marked_payload()
    with (
        trs_node.capture(trs_node.interface("cloud"), "udp or icmp or icmp6") as wire,
        stub_resolver(a_node, b_node),
    ):
        # The name lookup starts the route; ping by name over both overlay families.
        for family in (4, 6):
            result = ping_name(a_node, bob.fqdn, family=family)
            assert " 0% packet loss" in result.stdout, result.stdout + result.stderr
        result = ping_name(b_node, alice.fqdn, family=4)
        assert " 0% packet loss" in result.stdout, result.stdout + result.stderr
        bob_v4 = bob.status()["virtual_ipv4"]
        digest = tcp_transfer(a_node, b_node, listen=bob_v4, connect=bob.fqdn, payload=payload)
        assert digest == sha256(payload)

        for me, peer, trs_address in ((alice, bob, trs_seen_a), (bob, alice, trs_seen_b)):
            status = me.status()
            (row,) = [p for p in status["peers"] if p["fqdn"] == peer.fqdn]
            label = format_host_port(trs_address, 443)
            assert (row["state"], row["pattern"]) == ("up", "relay"), row
            assert row["path"] == f"via {label} ({TRS_NAME})", row
            assert row["rx_packets"] > 0 and row["rtt_ms"] is not None
            assert "relay" in me.status_table() and label in me.status_table()
        (row,) = [p for p in alice.status()["peers"] if p["fqdn"] == bob.fqdn]
        assert row["tx_bytes"] >= len(payload)

        sessions = o.trs.get("/v1/sessions")["items"]
        (session,) = sessions
        assert set(session["pair"]) == {alice.fqdn, bob.fqdn} and session["complete"]
        sides = {s["fqdn"]: s for s in session["sides"]}
        assert parse_host_port(sides[alice.fqdn]["address"])[0] == a_outside
        assert parse_host_port(sides[bob.fqdn]["address"])[0] == b_outside
        assert sides[alice.fqdn]["bytes"] >= len(payload)
        assert set(sides[alice.fqdn]) == {"fqdn", "address", "connection_ids", "packets", "bytes"}
        replica = o.trs.get("/v1/replica")
        assert replica["forwarded_bytes"] >= len(payload)
        assert replica["drops"].get("spoofed_source", 0) == 0
    # What crossed the TRS's interface: UDP 443 only, the marker never in clear, and the
    # tunnel's datagrams relayed unchanged.
    reading = read_relay(wire, trs=trs_addresses, a=a_outside, b=b_outside)
    missed = capture_drops(wire)
    assert reading.not_udp_443 == []
    assert not wire.contains_anywhere(MARKER)
    # tcpdump may miss packets on a loaded machine (it says how many). A packet the TRS
    # sent that is not found in what it received is its own control traffic, or relayed
    # with its received copy missed; beyond the misses, only a little control traffic.
    # Counted in bytes: the TRS forwards a node's GSO train with one GSO send, which the
    # capture shows as one packet of up to 64 KB.
    slack = missed * 65536
    assert reading.relayed_bytes + slack > len(payload), (reading, missed)
    assert reading.relayed_bytes + reading.own_bytes + slack >= 0.9 * replica["forwarded_bytes"], (
        reading,
        missed,
        replica,
    )
    assert reading.own_bytes <= reading.relayed_bytes // 10 + slack, (reading, missed)
    sys.stderr.write(
        f"\nTRS capture: {reading.relayed} packets ({reading.relayed_bytes} B) relayed "
        f"unchanged (TRS counted {replica['forwarded_packets']} datagrams, "
        f"{replica['forwarded_bytes']} B forwarded), {reading.own} ({reading.own_bytes} B) "
        f"not in what it received (its control traffic, or a copy tcpdump missed); "
        f"tcpdump missed {missed}\n"
    )
    # The tunnel's TLS ends at the nodes, which authenticated each other through the TRS.
    for me, peer, trs_address in ((alice, bob, trs_seen_a), (bob, alice, trs_seen_b)):
        tunnels = [
            e
            for e in json_log(me.log)
            if e.get("event") == "connection_ready" and e.get("alpn") == "cyphonic-tun/1"
        ]
        assert tunnels, me.log_text()[-3000:]
        assert all(e["peer"] == peer.fqdn and e["peer_kind"] == "node" for e in tunnels)
        assert all(e["address"][0] == trs_address for e in tunnels), tunnels
    ready = [e for e in o.trs.log_events() if e.get("event") == "connection_ready"]
    assert ready and {e.get("alpn") for e in ready} == {"cyphonic-sig/1"}
    assert {e.get("peer") for e in ready} == {alice.fqdn, bob.fqdn}


def test_double_symmetric_nat_behind_firewalls(relay_overlay: Any) -> None:
    o = relay_overlay(double_nat(services=SERVICES))
    o.start("alice")
    o.start("bob")
    o.agents["alice"].wait_up()
    o.agents["bob"].wait_up()
    trs_v4 = o.trs.node.address("cloud", 4)
    _relayed(
        o,
        a_outside=o.bed.router("gwa").address("wana", 4),
        b_outside=o.bed.router("gwb").address("wanb", 4),
        trs_seen_a=trs_v4,
        trs_seen_b=trs_v4,
    )
    _survives_nat_rebinding(o)


def _survives_nat_rebinding(o: Any) -> None:
    """alice's NAT forgets her mappings (as after a reboot of the box, or a move): her next
    packets leave from a new random port. Relayed packets from there are refused until her
    authenticated control connection to the TRS shows the new address (its keepalive); then
    the tunnel carries on by itself, same connection, same route."""
    alice, bob = o.agents["alice"], o.agents["bob"]
    gwa, a_node = o.bed.router("gwa"), o.bed.host("alice")
    (before,) = o.trs.get("/v1/sessions")["items"]
    old = {s["fqdn"]: s["address"] for s in before["sides"]}[alice.fqdn]
    bob_v4 = bob.status()["virtual_ipv4"]
    tunnels_before = alice.log_text().count('"tunnel_up"')
    assert forget_udp_mappings(gwa, a_node.address("lana", 4)) > 0
    started = time.monotonic()
    while True:
        if time.monotonic() - started > 40:
            raise AssertionError("the relayed tunnel did not recover within 40 s")
        probe = a_node.run(["ping", "-n", "-c", "1", "-W", "1", bob_v4], timeout=10)
        if probe.returncode == 0:
            break
    outage = time.monotonic() - started
    (after,) = o.trs.get("/v1/sessions")["items"]
    new = {s["fqdn"]: s["address"] for s in after["sides"]}[alice.fqdn]
    assert after["route_id"] == before["route_id"]
    assert new != old and parse_host_port(new)[0] == parse_host_port(old)[0], (old, new)
    assert alice.log_text().count('"tunnel_up"') == tunnels_before  # the same tunnel
    payload = marked_payload(500_000)
    assert tcp_transfer(
        a_node, o.bed.host("bob"), listen=bob_v4, connect=bob_v4, payload=payload
    ) == sha256(payload)
    drops = o.trs.get("/v1/replica")["drops"]
    sys.stderr.write(
        f"\nNAT rebinding: alice's side moved {old} -> {new}; relayed tunnel "
        f"back after {outage:.1f} s; TRS refused "
        f"{drops.get('spoofed_source', 0)} packets from the unannounced address\n"
    )


def test_ipv4_only_node_and_ipv6_only_node_through_a_dual_stack_trs(
    relay_overlay: Any,
) -> None:
    o = relay_overlay(v4_v6(services=SERVICES))
    o.start("alice")
    o.start("bob")
    o.agents["alice"].wait_up()
    o.agents["bob"].wait_up()
    _relayed(
        o,
        a_outside=o.bed.host("alice").address("lana", 4),
        b_outside=o.bed.host("bob").address("lanb", 6),
        trs_seen_a=o.trs.node.address("cloud", 4),
        trs_seen_b=o.trs.node.address("cloud", 6),
    )
