"""The real agent without root: ``cyphonic_agent.agent.Agent`` with fake edges (a TUN over a
socket pair, a silent netlink watcher) against real ``cyphonic-as`` and ``cyphonic-nms``
processes on loopback (the embedded SQLite registry), enrolled through the AS's REST API.

Two agents: alice looks bob up (the DNS stub's hook), the NMS directs pattern 1 to both,
alice connects, and an IP packet an application on alice sends to bob's virtual address
comes out of bob's TUN. A node that is not enrolled is answered "no such node". With
``metrics_listen`` set, a packet bob's access policy refuses shows in his ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cyphonic_agent.metrics import MetricsServer
from cyphonic_agent.mobility import HostPath
from cyphonic_agent.routes import RouteState
from cyphonic_testing.agent import (
    RunningAgent,
    udp_packet,
)
from cyphonic_testing.cloud import DOMAIN, LoopbackCloud, loopback_cloud
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[LoopbackCloud]:
    async with loopback_cloud(tmp_path) as world:
        yield world


async def test_two_real_agents_carry_a_packet_without_root(cloud: LoopbackCloud) -> None:
    alice = await cloud.agent("alice")
    bob = await cloud.agent("bob")
    for running in (alice, bob):
        status = running.agent.snapshot()
        assert status.nms_state == "connected"
        assert status.tun == running.tun.name and status.virtual_ipv4

    found = await alice.agent.peers.lookup(f"bob.{DOMAIN}")
    assert found is not None and found.ipv4 is not None
    bob_vip = bob.agent.snapshot().virtual_ipv4
    assert str(found.ipv4) == bob_vip

    # The route comes up on both sides (pattern 1: both are global IPv4 on loopback).
    async def up(running: RunningAgent, peer: str) -> None:
        while True:
            route = running.agent.peers.routes.get(peer)
            if route is not None and route.state is RouteState.UP:
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(
        asyncio.gather(up(alice, f"bob.{DOMAIN}"), up(bob, f"alice.{DOMAIN}")), 30
    )
    route = alice.agent.peers.routes.get(f"bob.{DOMAIN}")
    assert route is not None and route.pattern_name == "direct"

    alice_vip = alice.agent.snapshot().virtual_ipv4
    assert alice_vip is not None and bob_vip is not None
    packet = udp_packet(alice_vip, bob_vip, b"hello bob, from a fake TUN")
    alice.tun.send_from_app(packet)
    assert await bob.tun.delivered() == packet

    [row] = alice.agent.snapshot().peers
    assert row.fqdn == f"bob.{DOMAIN}" and row.state == "up" and row.pattern == "direct"
    counters = alice.agent.counters()
    assert counters["logins"] == 1 and counters["registrations"] == 1
    assert counters["route_requests"] == 1 and counters["tunnels_connected"] == 1


async def test_an_unknown_name_is_no_such_node_and_held(cloud: LoopbackCloud) -> None:
    alice = await cloud.agent("alice")
    assert await alice.agent.peers.lookup(f"nobody.{DOMAIN}") is None
    # Held down: a second lookup moments later does not ask the NMS again.
    assert await alice.agent.peers.lookup(f"nobody.{DOMAIN}") is None
    assert alice.agent.counters()["route_requests"] == 1


async def test_the_agent_reports_the_nms_losing_and_reconnects(cloud: LoopbackCloud) -> None:
    alice = await cloud.agent("alice")
    cloud.nms.stop()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while alice.agent.snapshot().nms_state == "connected":
        assert loop.time() < deadline, "the agent never noticed the NMS was gone"
        await asyncio.sleep(0.1)
    await cloud.nms.start()
    while alice.agent.snapshot().nms_state != "connected":
        assert loop.time() < deadline + 60, "the agent did not reconnect"
        await asyncio.sleep(0.1)
    assert alice.agent.counters()["registrations"] >= 2
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{cloud.nms.rest}/readyz")).status_code == 200


async def test_a_move_reregisters_and_the_status_shows_the_handover(cloud: LoopbackCloud) -> None:
    alice = await cloud.agent("alice")
    before = alice.agent.snapshot()
    assert before.handovers == 0 and before.last_handover is None
    old = HostPath(
        addresses=frozenset({ipaddress.ip_address("192.0.2.1")}),
        default_routes=frozenset({"dev 7"}),
    )
    new = HostPath(
        addresses=frozenset({ipaddress.ip_address("127.0.0.1")}),
        default_routes=frozenset({"via 127.0.0.254"}),
    )
    await alice.watcher.move(old, new)  # what the netlink watcher reports after a move

    # Re-registration on the same NMS connection; the first answer after the move is shown.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while (alice.agent.snapshot().last_handover or {}).get("nms_network") is None:
        assert loop.time() < deadline, "no re-registration after the move"
        await asyncio.sleep(0.05)
    status = alice.agent.snapshot()
    handover = status.last_handover
    assert handover is not None and status.handovers == 1
    assert handover["old"] == {"addresses": ["192.0.2.1"], "default_routes": ["dev 7"]}
    assert handover["new"] == {"addresses": ["127.0.0.1"], "default_routes": ["via 127.0.0.254"]}
    assert alice.agent.endpoint is not None
    port = alice.agent.endpoint.local_address[1]
    assert handover["nms_network"]["behind_nat"] is False
    assert handover["nms_network"]["observed"] == [f"127.0.0.1:{port}"]
    assert status.nms_state == "connected" and status.virtual_ipv4 == before.virtual_ipv4
    assert alice.agent.counters()["registrations"] == 2


async def _until_up(running: RunningAgent, peer: str) -> None:
    while True:
        route = running.agent.peers.routes.get(peer)
        if route is not None and route.state is RouteState.UP:
            return
        await asyncio.sleep(0.05)


async def scrape(server: MetricsServer | None) -> dict[tuple[str, frozenset[Any]], float]:
    """GET /metrics as Prometheus would, parsed: (sample name, labels) -> value."""
    assert server is not None
    host, port = server.address
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"http://{host}:{port}/metrics")
    assert r.status_code == 200, r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


async def test_a_packet_the_policy_refuses_shows_in_the_metrics(cloud: LoopbackCloud) -> None:
    alice = await cloud.agent("alice", metrics_listen="127.0.0.1:0")
    bob = await cloud.agent("bob", metrics_listen="127.0.0.1:0")
    not_allowed = (
        "cyphonic_agent_policy_dropped_packets_total",
        frozenset({("reason", "not_allowed")}),
    )
    assert (await scrape(bob.agent.metrics_server))[not_allowed] == 0

    # alice (eng) may start ssh to bob (servers), nothing else
    async with cloud.nms.admin() as admin:
        for name, group in (("alice", "eng"), ("bob", "servers")):
            r = await admin.put(f"/v1/nodes/{name}.{DOMAIN}/tags", json={"tags": {"group": group}})
            assert r.status_code == 200, r.text
        rule = {"from": ["group:eng"], "to": ["group:servers"], "proto": "tcp", "ports": [22]}
        r = await admin.put("/v1/policy", json={"rules": [rule]})
        assert r.status_code == 200, r.text
        revision = r.json()["revision"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not (bob.agent.access.received and bob.agent.access.revision >= revision):
        assert loop.time() < deadline, "bob never got the policy filter"
        await asyncio.sleep(0.05)

    assert await alice.agent.peers.lookup(f"bob.{DOMAIN}") is not None
    await asyncio.wait_for(
        asyncio.gather(_until_up(alice, f"bob.{DOMAIN}"), _until_up(bob, f"alice.{DOMAIN}")), 30
    )
    alice_vip = alice.agent.snapshot().virtual_ipv4
    bob_vip = bob.agent.snapshot().virtual_ipv4
    assert alice_vip is not None and bob_vip is not None
    alice.tun.send_from_app(udp_packet(alice_vip, bob_vip, b"udp/9 is not allowed"))

    while True:  # scraped until the drop shows, as a dashboard would see it
        got = await scrape(bob.agent.metrics_server)
        if got[not_allowed] >= 1:
            break
        assert loop.time() < deadline + 30, "the drop never showed in bob's metrics"
        await asyncio.sleep(0.2)
    assert got[("cyphonic_agent_policy_revision", frozenset())] >= revision
    assert "cyphonic_agent_policy_passed_packets_total" in {name for name, _ in got}
    up = frozenset({("state", "up"), ("pattern", "direct"), ("transport", "udp")})
    assert got[("cyphonic_agent_peers", up)] == 1
    assert got[("cyphonic_agent_nms_state", frozenset({("state", "connected")}))] == 1
    assert got[("cyphonic_agent_transport_carrier", frozenset({("carrier", "udp")}))] == 1
    expiry = got[("cyphonic_agent_certificate_expiry_timestamp_seconds", frozenset())]
    assert expiry > datetime.datetime.now(datetime.UTC).timestamp()
    sent = await scrape(alice.agent.metrics_server)
    to_bob = frozenset({("peer", f"bob.{DOMAIN}")})
    assert sent[("cyphonic_agent_tunnel_tx_packets_total", to_bob)] >= 1
    assert sent[("cyphonic_agent_tunnel_tx_bytes_total", to_bob)] > 0
