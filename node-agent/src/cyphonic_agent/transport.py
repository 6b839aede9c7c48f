"""The agent's TCP 443 transport: settings to ``cyphonic.quic.tcp_transport.StreamPaths``.

docs/tcp-transport.md describes the protocol; ``cyphonic.quic.path_choice`` the decisions
(UDP first, TCP after ``tcp_race_delay_s``, UDP probed every ``udp_probe_interval_s``).
"""

from __future__ import annotations

import os

from cyphonic.pki import TrustStore
from cyphonic.quic import QuicEndpoint
from cyphonic.quic.path_choice import PathChoice
from cyphonic.quic.tcp_transport import HttpsProxy, StreamPaths

from cyphonic_agent.config import AgentSettings

__all__ = ["proxy_from", "start_stream_paths"]


def proxy_from(settings: AgentSettings) -> HttpsProxy | None:
    """``--https-proxy``, else ``HTTPS_PROXY`` / ``https_proxy`` from the environment."""
    url = settings.https_proxy
    if url is None:
        url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    return HttpsProxy.parse(url) if url else None


def start_stream_paths(
    settings: AgentSettings, endpoint: QuicEndpoint, trust: TrustStore
) -> StreamPaths | None:
    """The TCP 443 fallback on ``endpoint`` (None with ``tcp_fallback`` off)."""
    if not settings.tcp_fallback:
        return None
    proxy = proxy_from(settings)
    choice = PathChoice(
        via_proxy=proxy is not None,
        race_delay_s=settings.tcp_race_delay_s,
        probe_interval_s=settings.udp_probe_interval_s,
    )
    return StreamPaths(
        endpoint,
        trust=trust,
        choice=choice,
        proxy=proxy,
        dial_timeout=settings.connect_timeout_s,
    )
