"""The agent's optional Prometheus endpoint (``--metrics-listen``, docs/agent.md "Metrics").

    GET /metrics   the Prometheus text exposition of the metrics below (anything else: 404)

Every value is read when scraped, from what the agent already keeps for
``cyphonic-agent status`` (``Agent.snapshot``) and from its certificate and CRL cache: the
per-packet path never touches a Prometheus object. ``agent_metrics`` turns one snapshot
(plus ``AgentFacts``) into metric families; ``AgentCollector`` calls it per scrape;
``MetricsServer`` is a small HTTP/1.1 responder on the agent's event loop (no thread, so a
scrape sees the parts between two of their updates, never halfway through one).

Per-peer tunnel counters carry a ``peer`` label (the FQDN): fine for an edge host with tens
of peers; a host with thousands of peers makes as many series.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cyphonic.errors import Unavailable
from cyphonic.hostport import format_host_port
from cyphonic.log import get_logger
from cyphonic.policy import DropReason
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from cyphonic_agent.status import AgentStatus

NMS_STATES = ("connecting", "connected", "disconnected")
CARRIERS = ("udp", "tcp", "proxy")
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class AgentFacts:
    """What the status snapshot lacks: the certificate and the CRL cache."""

    version: str = ""
    certificate_not_after: float | None = None
    """Unix time the node certificate expires."""
    certificate_renewals: int = 0
    crl_number: int | None = None
    """The CRL number applied, None before the first fetch worked."""
    crl_age_s: float | None = None
    """Seconds since the last CRL fetch that worked."""
    crl_revoked: int = 0
    crl_refresh_failures: int = 0


def agent_metrics(status: AgentStatus, facts: AgentFacts) -> list[Metric]:
    """The metric families of one snapshot."""
    out: list[Metric] = []
    info = GaugeMetricFamily(
        "cyphonic_agent_info", "This agent: FQDN and version (always 1)", labels=["fqdn", "version"]
    )
    info.add_metric([status.fqdn, facts.version], 1)
    out.append(info)

    policy = status.policy or {}
    dropped = CounterMetricFamily(
        "cyphonic_agent_policy_dropped_packets",
        "Packets from tunnels the access-policy filter dropped, by reason",
        labels=["reason"],
    )
    counts = policy.get("dropped", {})
    for reason in DropReason:
        dropped.add_metric([reason.value], counts.get(reason.value, 0))
    out.append(dropped)
    out.append(
        CounterMetricFamily(
            "cyphonic_agent_policy_passed_packets",
            "Packets from tunnels the access-policy filter let in",
            value=policy.get("passed", 0),
        )
    )
    out.append(
        GaugeMetricFamily(
            "cyphonic_agent_policy_revision",
            "Revision of the policy filter in force (0: none received yet)",
            value=policy.get("revision") or 0,
        )
    )
    out.append(
        GaugeMetricFamily(
            "cyphonic_agent_policy_flows",
            "Flows this node opened that the filter lets replies in for",
            value=policy.get("flows", 0),
        )
    )

    peers = GaugeMetricFamily(
        "cyphonic_agent_peers",
        "Peers by route state, NMS pattern and carrier",
        labels=["state", "pattern", "transport"],
    )
    groups: dict[tuple[str, str, str], int] = {}
    for row in status.peers:
        key = (row.state, row.pattern, row.transport)
        groups[key] = groups.get(key, 0) + 1
    for key, n in sorted(groups.items()):
        peers.add_metric(list(key), n)
    out.append(peers)
    for direction in ("tx", "rx"):
        packets = CounterMetricFamily(
            f"cyphonic_agent_tunnel_{direction}_packets",
            f"Inner packets {'sent into' if direction == 'tx' else 'received from'} the "
            "peer's tunnel (restarts at 0 with a new tunnel)",
            labels=["peer"],
        )
        octets = CounterMetricFamily(
            f"cyphonic_agent_tunnel_{direction}_bytes",
            f"Inner bytes {'sent into' if direction == 'tx' else 'received from'} the "
            "peer's tunnel (restarts at 0 with a new tunnel)",
            labels=["peer"],
        )
        for row in status.peers:
            packets.add_metric([row.fqdn], getattr(row, f"{direction}_packets"))
            octets.add_metric([row.fqdn], getattr(row, f"{direction}_bytes"))
        out += [packets, octets]

    nms = GaugeMetricFamily(
        "cyphonic_agent_nms_state",
        "Connection to the NMS (1 for the current state)",
        labels=["state"],
    )
    for state in NMS_STATES:
        nms.add_metric([state], 1 if status.nms_state == state else 0)
    out.append(nms)
    carrier = (status.transport or {}).get("carrier") or "udp"
    transport = GaugeMetricFamily(
        "cyphonic_agent_transport_carrier",
        "What carries QUIC to the services (1 for the current carrier)",
        labels=["carrier"],
    )
    for name in CARRIERS:
        transport.add_metric([name], 1 if carrier == name else 0)
    out.append(transport)
    out.append(
        CounterMetricFamily(
            "cyphonic_agent_handovers",
            "Moves of this host (address or default route changed)",
            value=status.handovers,
        )
    )

    if facts.certificate_not_after is not None:
        out.append(
            GaugeMetricFamily(
                "cyphonic_agent_certificate_expiry_timestamp_seconds",
                "Unix time the node certificate expires",
                value=facts.certificate_not_after,
            )
        )
    out.append(
        CounterMetricFamily(
            "cyphonic_agent_certificate_renewals",
            "Certificate renewals since the agent started",
            value=facts.certificate_renewals,
        )
    )
    if facts.crl_number is not None:
        out.append(
            GaugeMetricFamily(
                "cyphonic_agent_crl_number", "Number of the CRL applied", value=facts.crl_number
            )
        )
    if facts.crl_age_s is not None:
        out.append(
            GaugeMetricFamily(
                "cyphonic_agent_crl_age_seconds",
                "Seconds since the last CRL fetch that worked",
                value=facts.crl_age_s,
            )
        )
    out.append(
        GaugeMetricFamily(
            "cyphonic_agent_crl_revoked_certificates",
            "Node certificates the CRL applied revokes",
            value=facts.crl_revoked,
        )
    )
    out.append(
        CounterMetricFamily(
            "cyphonic_agent_crl_refresh_failures",
            "CRL fetches that failed",
            value=facts.crl_refresh_failures,
        )
    )
    return out


class AgentCollector(Collector):
    """Reads the agent at scrape time."""

    def __init__(self, status: Callable[[], AgentStatus], facts: Callable[[], AgentFacts]) -> None:
        self._status = status
        self._facts = facts

    def collect(self) -> Iterator[Metric]:
        yield from agent_metrics(self._status(), self._facts())


def agent_registry(
    status: Callable[[], AgentStatus], facts: Callable[[], AgentFacts]
) -> CollectorRegistry:
    """A registry holding only the agent's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(status, facts))
    return registry


class MetricsServer:
    """``GET /metrics`` over plain HTTP on ``host:port``, one request per connection."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: asyncio.Server | None = None
        self._log = get_logger("agent.metrics")

    @classmethod
    async def start(cls, registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
        """Listen on ``host:port``; ``Unavailable`` when the address cannot be bound."""
        server = cls(registry)
        try:
            server._server = await asyncio.start_server(
                server._handle, host=host, port=port, limit=MAX_REQUEST_HEAD
            )
        except OSError as exc:
            where = format_host_port(host, port)
            raise Unavailable(f"cannot listen for metrics on {where}: {exc.strerror}") from exc
        server._log.info("metrics_listening", address=format_host_port(*server.address))
        return server

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, ctype = self._answer(head)
            headers = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            method = head.split(b" ", 1)[0]
            writer.write(headers.encode() + (b"" if method == b"HEAD" else body))
            await writer.drain()
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            with contextlib.suppress(ConnectionError):
                writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        text = "text/plain; charset=utf-8"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "400 Bad Request", b"bad request\n", text
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET /metrics only\n", text
        if target != b"/metrics":
            return "404 Not Found", b"GET /metrics only\n", text
        return "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
