"""NMS settings: ``CYPHONIC_*`` environment variables, overridden by command-line flags."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Literal

from cyphonic import relay_token
from cyphonic.config import ServiceSettings
from pydantic import Field, SecretStr, field_validator, model_validator

from cyphonic_nms.leases import DEFAULT_IPV4_POOL

if TYPE_CHECKING:
    from cyphonic.quic.tickets import TicketKeys


class NmsSettings(ServiceSettings):
    """Everything the NMS reads from its environment (prefix ``CYPHONIC_``)."""

    http_port: int = Field(8082, description="TCP port of the NMS admin REST API")
    replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="name of this NMS replica (unique among replicas sharing Redis)",
    )
    ipv4_pool: str = Field(
        DEFAULT_IPV4_POOL, description="virtual IPv4 pool (CIDR, inside 100.64.0.0/10)"
    )
    ipv6_pool: str | None = Field(
        None, description="virtual IPv6 pool (CIDR); default: a ULA /48 derived from the domain"
    )
    keepalive_interval_s: float = Field(
        15.0,
        gt=0,
        description="how often agents that do not PING (older ones) send a Keepalive",
    )
    ping_interval_s: float = Field(
        25.0,
        ge=0,
        description="QUIC PING interval told to agents: keeps the connection and the NAT "
        "binding (UDP timeouts of 30 s are common) open; 0: ask for Keepalive requests; "
        "at most 0.6 x offline_timeout_s is told",
    )
    offline_timeout_s: float = Field(
        45.0,
        gt=0,
        description="QUIC idle timeout of node connections: a node silent this long is offline",
    )
    presence_refresh_s: float = Field(
        5.0,
        gt=0,
        description="how often presence and route TTLs in Redis are refreshed "
        "(at least three times per offline_timeout_s)",
    )
    last_seen_interval_s: float = Field(
        60.0, gt=0, description="how often last_seen of connected nodes is written"
    )
    revocation_poll_s: float = Field(
        15.0,
        gt=0,
        description="safety poll of the registry for new revocations: they are applied when "
        "Postgres notifies one or the AS's watch (as_url) reports one; on SQLite without "
        "as_url this is how soon a revocation made elsewhere takes effect",
    )
    max_pending_registrations: int = Field(
        128,
        ge=1,
        description="registrations in progress at once; more are refused with a retry-after "
        "(admission control: a reconnect storm queues at the nodes, not here); as many as "
        "QUIC_MAX_HANDSHAKES, so a handshake that completes is rarely refused",
    )
    admission_max_wait_s: float = Field(
        2.5,
        gt=0,
        description="refuse registrations while an admitted one has waited this long "
        "(the replica is behind; admitted ones must finish inside the nodes' timeout)",
    )
    overload_retry_after_s: float = Field(
        2.0,
        gt=0,
        description="the retry-after a refused registration carries (nodes add jitter)",
    )
    policy_default: Literal["allow", "deny"] = Field(
        "allow",
        description="access policy while none is set: allow (every node may reach every "
        "node) or deny (nothing until the operator sets a policy); docs/policy.md",
    )
    policy_poll_s: float = Field(
        15.0,
        gt=0,
        le=300,
        description="safety poll of the policy revision: a change is applied when Postgres "
        "notifies it or it is made through this replica; on SQLite a change made through "
        "another process takes effect within this",
    )
    relay_token_secret: SecretStr | None = Field(
        None, description="HMAC secret shared with the TRS replicas (16+ bytes)"
    )
    relay_token_lifetime_s: float = Field(
        120.0, gt=0, description="how long a relay allocation token can be redeemed"
    )
    public_quic_addresses: list[str] = Field(
        default_factory=list,
        description="addresses nodes use to reach this NMS (host:port), for documentation "
        "and the AS; JSON list in the environment",
    )
    trs_endpoints: list[str] = Field(
        default_factory=list,
        description="static TRS addresses (host:port, JSON list) used instead of the Redis "
        "directory, e.g. for the embedded default without Redis",
    )
    trs_server_name: str | None = Field(
        None, description="name in the static TRS's certificate (default trs.svc.<domain>)"
    )
    redis_timeout_s: float = Field(
        5.0, gt=0, description="bound on each Redis command and connection attempt (seconds)"
    )
    reach_probe_port: int = Field(
        0,
        ge=-1,
        le=65535,
        description="UDP port (on quic_host) where nodes send their NAT mapping probe; nodes "
        "learn it at registration. 0: any free port; -1: no reachability probes "
        "(docs/nms.md). Behind a firewall that passes only UDP 443, give the NMS a second "
        "address and run the probes on its port 443",
    )
    reach_probe_timeout_s: float = Field(
        1.0, gt=0, le=10, description="how long a reachability probe waits for its answers"
    )
    migrate: bool = Field(False, description="run registry migrations before serving")
    as_url: str | None = Field(
        None,
        description="base URL of the AS REST API (http://as:8081, as the TRS's as_url); the "
        "console's revoke is sent there with as_admin_token; none = no revoke in the console",
    )
    as_admin_token: SecretStr | None = Field(
        None, description="bearer token for the AS admin API (default: this NMS's admin token)"
    )
    trs_admin_urls: list[str] = Field(
        default_factory=list,
        description="base URLs of the TRS replicas' admin REST APIs (JSON list), one per "
        "replica, read by the console for relayed sessions and counters",
    )
    trs_admin_url_template: str | None = Field(
        None,
        description="admin base URL of a TRS replica with {replica} for its number, e.g. "
        "http://cyphonic-trs-{replica}.cyphonic-trs-headless:8083 (a StatefulSet): applied "
        "to every replica in the TRS directory, so scaled replicas are found",
    )
    trs_admin_token: SecretStr | None = Field(
        None, description="bearer token for the TRS admin APIs (default: this NMS's admin token)"
    )
    session_ticket_secret: SecretStr | None = Field(
        None,
        description="secret(s) the TLS session ticket keys are derived from, the same on "
        "every replica (a node resumes at any of them), newest first, comma-separated, 32+ "
        "characters each; unset: no session resumption, every reconnect a full handshake",
    )

    @model_validator(mode="after")
    def _check_timing(self) -> NmsSettings:
        if self.offline_timeout_s <= self.keepalive_interval_s:
            raise ValueError("offline_timeout_s must be longer than keepalive_interval_s")
        return self

    @field_validator("trs_admin_url_template")
    @classmethod
    def _check_template(cls, value: str | None) -> str | None:
        if value is not None and (
            "{replica}" not in value or value.replace("{replica}", "").count("{")
        ):
            raise ValueError("trs_admin_url_template needs {replica} and no other {...}")
        return value

    def ticket_keys(self) -> TicketKeys | None:
        """The session ticket keys, if a secret is configured."""
        from cyphonic.quic.tickets import TicketKeys

        secret = self.session_ticket_secret
        return None if secret is None else TicketKeys.from_secrets(secret.get_secret_value())

    def relay_secret(self) -> bytes:
        """The relay token secret (a development default only in the ``local`` environment)."""
        value = self.relay_token_secret.get_secret_value() if self.relay_token_secret else None
        return relay_token.secret_from_env(self.environment, value)
