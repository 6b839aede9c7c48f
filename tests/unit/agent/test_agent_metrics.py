"""The agent's Prometheus endpoint (``cyphonic_agent.metrics``): the families one status
snapshot makes, the setting that switches it on, and the HTTP responder on a real socket."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from cyphonic.errors import InvalidArgument, Unavailable
from cyphonic_agent.config import AgentSettings
from cyphonic_agent.metrics import AgentFacts, MetricsServer, agent_registry
from cyphonic_agent.status import AgentStatus, PeerStatus
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

NOT_AFTER = 1_900_000_000.0


def status_with_drops() -> AgentStatus:
    return AgentStatus(
        fqdn="alice.cyphonic.internal",
        nms_state="connected",
        peers=[
            PeerStatus(
                fqdn="bob.cyphonic.internal",
                state="up",
                pattern="direct",
                tx_packets=3,
                tx_bytes=300,
                rx_packets=5,
                rx_bytes=700,
            ),
            PeerStatus(fqdn="carol.cyphonic.internal", state="up", pattern="direct"),
            PeerStatus(fqdn="dave.cyphonic.internal", state="up", pattern="relay", transport="tcp"),
        ],
        handovers=2,
        policy={
            "revision": 4,
            "mode": "filter",
            "entries": 2,
            "flows": 3,
            "passed": 40,
            "dropped": {"not_allowed": 17, "malformed": 0, "fragment": 1},
            "evicted_flows": 0,
        },
        transport={"carrier": "tcp"},
    )


def facts() -> AgentFacts:
    return AgentFacts(
        version="0.1.0",
        certificate_not_after=NOT_AFTER,
        certificate_renewals=1,
        crl_number=7,
        crl_age_s=12.5,
        crl_revoked=2,
        crl_refresh_failures=0,
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_snapshot_with_drops_makes_every_family() -> None:
    registry = agent_registry(status_with_drops, facts)
    got = samples(generate_latest(registry).decode())
    drops = "cyphonic_agent_policy_dropped_packets_total"
    assert got[(drops, (("reason", "not_allowed"),))] == 17
    assert got[(drops, (("reason", "fragment"),))] == 1
    assert got[(drops, (("reason", "malformed"),))] == 0
    assert got[("cyphonic_agent_policy_passed_packets_total", ())] == 40
    assert got[("cyphonic_agent_policy_revision", ())] == 4
    assert got[("cyphonic_agent_policy_flows", ())] == 3
    peers = "cyphonic_agent_peers"
    direct = (("pattern", "direct"), ("state", "up"), ("transport", "udp"))
    relayed = (("pattern", "relay"), ("state", "up"), ("transport", "tcp"))
    assert got[(peers, direct)] == 2 and got[(peers, relayed)] == 1
    bob = (("peer", "bob.cyphonic.internal"),)
    assert got[("cyphonic_agent_tunnel_tx_packets_total", bob)] == 3
    assert got[("cyphonic_agent_tunnel_tx_bytes_total", bob)] == 300
    assert got[("cyphonic_agent_tunnel_rx_packets_total", bob)] == 5
    assert got[("cyphonic_agent_tunnel_rx_bytes_total", bob)] == 700
    assert got[("cyphonic_agent_nms_state", (("state", "connected"),))] == 1
    assert got[("cyphonic_agent_nms_state", (("state", "disconnected"),))] == 0
    assert got[("cyphonic_agent_transport_carrier", (("carrier", "tcp"),))] == 1
    assert got[("cyphonic_agent_transport_carrier", (("carrier", "udp"),))] == 0
    assert got[("cyphonic_agent_handovers_total", ())] == 2
    assert got[("cyphonic_agent_certificate_expiry_timestamp_seconds", ())] == NOT_AFTER
    assert got[("cyphonic_agent_certificate_renewals_total", ())] == 1
    assert got[("cyphonic_agent_crl_number", ())] == 7
    assert got[("cyphonic_agent_crl_age_seconds", ())] == 12.5
    assert got[("cyphonic_agent_crl_revoked_certificates", ())] == 2
    assert got[("cyphonic_agent_crl_refresh_failures_total", ())] == 0
    info = (("fqdn", "alice.cyphonic.internal"), ("version", "0.1.0"))
    assert got[("cyphonic_agent_info", info)] == 1


def test_a_fresh_agent_has_zero_counters_and_no_crl_yet() -> None:
    registry = agent_registry(lambda: AgentStatus(fqdn="a.x"), AgentFacts)
    got = samples(generate_latest(registry).decode())
    drops = "cyphonic_agent_policy_dropped_packets_total"
    assert got[(drops, (("reason", "not_allowed"),))] == 0
    assert got[("cyphonic_agent_policy_revision", ())] == 0
    assert got[("cyphonic_agent_nms_state", (("state", "disconnected"),))] == 1
    assert got[("cyphonic_agent_transport_carrier", (("carrier", "udp"),))] == 1
    names = {name for name, _ in got}
    assert "cyphonic_agent_crl_number" not in names
    assert "cyphonic_agent_certificate_expiry_timestamp_seconds" not in names
    assert not any(name.startswith("cyphonic_agent_peers") for name in names)


def test_the_endpoint_is_off_by_default_and_set_like_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CYPHONIC_METRICS_LISTEN", raising=False)
    assert AgentSettings.load().metrics_address is None
    assert AgentSettings.load(metrics_listen="127.0.0.1:9464").metrics_address == (
        "127.0.0.1",
        9464,
    )
    monkeypatch.setenv("CYPHONIC_METRICS_LISTEN", "[::1]:9100")
    assert AgentSettings.load().metrics_address == ("::1", 9100)
    assert AgentSettings.load(metrics_listen="off").metrics_address is None
    for bad in ("localhost:9464", "127.0.0.1", "127.0.0.1:70000"):
        with pytest.raises(InvalidArgument, match="metrics_listen"):
            AgentSettings.load(metrics_listen=bad)


async def test_the_server_answers_get_metrics_and_nothing_else() -> None:
    registry = agent_registry(status_with_drops, facts)
    server = await MetricsServer.start(registry, "127.0.0.1", 0)
    host, port = server.address
    base = f"http://{host}:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(f"{base}/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain; version=")
            got = samples(r.text)
            key = ("cyphonic_agent_policy_dropped_packets_total", (("reason", "not_allowed"),))
            assert got[key] == 17
            assert (await client.head(f"{base}/metrics")).content == b""
            assert (await client.get(f"{base}/")).status_code == 404
            assert (await client.post(f"{base}/metrics")).status_code == 405
        # not HTTP, and a head that never ends: an answer or a close, no hang
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"hello\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400")
        writer.close()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 400")
        writer.close()
        with pytest.raises(Unavailable, match="cannot listen for metrics"):
            await MetricsServer.start(registry, host, port)  # the port is taken
    finally:
        await server.close()
