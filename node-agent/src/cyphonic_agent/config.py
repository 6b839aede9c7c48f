"""Settings of ``cyphonic-agent up``: flags beat ``CYPHONIC_*`` variables beat a TOML file.

    cyphonic-agent up --state-dir /var/lib/cyphonic-agent [--config /etc/cyphonic/agent.toml]

The file holds the same keys as the fields below (``quic_port = 443``, ``dns_listen =
"127.0.0.1:53"``...); the environment uses them upper-cased with the ``CYPHONIC_`` prefix
(``CYPHONIC_QUIC_PORT=443``). Who the node is and where its AS is come from the state
directory written by ``cyphonic-agent enroll``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, ClassVar

from cyphonic.errors import InvalidArgument
from cyphonic.hostport import parse_host_port
from cyphonic.service import describe_settings_error
from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cyphonic_agent.splitdns import MANAGERS
from cyphonic_agent.status import DEFAULT_STATUS_SOCKET
from cyphonic_agent.tun import DEFAULT_MTU

DEFAULT_STATE_DIR = Path("/var/lib/cyphonic-agent")
DEFAULT_DNS_LISTEN = "127.0.0.1:53"
DNS_OFF = ("", "off", "none")


def parse_hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` (or a bare host with ``default_port``) -> (host, port);
    ``cyphonic.hostport.parse_host_port`` with port 0 allowed (bind to any port)."""
    return parse_host_port(text, default_port=default_port, allow_port_zero=True)


class AgentSettings(BaseSettings):
    """Everything ``cyphonic-agent up`` reads besides its state directory."""

    model_config = SettingsConfigDict(env_prefix="CYPHONIC_", extra="ignore")
    _config_file: ClassVar[Path | None] = None

    state_dir: Path = Field(DEFAULT_STATE_DIR, description="written by `cyphonic-agent enroll`")
    quic_host: str = Field(
        "::", description="address of the one UDP socket (dual-stack ::) for every connection"
    )
    quic_port: int = Field(
        443,
        ge=0,
        le=65535,
        description="UDP port of that socket; peers reach an accepting node here, and "
        "firewalls that pass HTTP/3 pass 443 (0: ephemeral)",
    )
    as_endpoints: list[str] = Field(
        default_factory=list,
        description="AS QUIC endpoints (host:port) overriding agent.json's",
    )
    tun_name: str = Field("cyphonic0", description="name of the TUN device")
    mtu: int = Field(
        DEFAULT_MTU,
        ge=1280,
        le=65000,
        description="TUN MTU; 1420 fits one QUIC datagram on a 1500-byte IPv4 or IPv6 path",
    )
    tun_offload: bool = Field(
        True,
        description="TUN with IFF_VNET_HDR and TSO/checksum offloads (64 KB reads and "
        "coalesced writes); a kernel that refuses them gets a plain TUN",
    )
    dns_listen: str = Field(
        DEFAULT_DNS_LISTEN,
        description="address:port of the DNS stub for the overlay domain ('off' disables it)",
    )
    dns_upstreams: list[str] | None = Field(
        None, description="resolvers for other names (default: /etc/resolv.conf's)"
    )
    accept_dns: bool = Field(
        True,
        description="put the overlay domain into the host's resolver (systemd-resolved "
        "per-link, else a managed /etc/resolv.conf put back on exit); false: leave it alone",
    )
    dns_manager: str = Field(
        "auto",
        description="how: auto (systemd-resolved where it runs, else resolv.conf), "
        "resolved or resolv.conf",
    )
    resolv_conf: Path = Field(
        Path("/etc/resolv.conf"), description="the resolver file the resolv.conf way edits"
    )
    status_socket: Path = Field(DEFAULT_STATUS_SOCKET, description="local status API socket")
    metrics_listen: str = Field(
        "off",
        description="address:port of the Prometheus endpoint GET /metrics ('off', the "
        "default, disables it; keep it on loopback, e.g. 127.0.0.1:9464: it is plain HTTP "
        "without authentication)",
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, description="seconds to wait for a QUIC handshake with one address"
    )
    peer_timeout_s: float = Field(
        30.0,
        ge=3,
        description="QUIC idle timeout: a peer (or the NMS) silent this long is gone",
    )
    tunnel_keepalive_s: float = Field(
        10.0, gt=0, description="PING interval on idle tunnels (keeps NAT bindings open)"
    )
    route_setup_timeout_s: float = Field(
        15.0, gt=0, description="a route not up after this long is given up"
    )
    reconnect_max_s: float = Field(
        30.0, gt=0, description="longest pause between attempts to reach the AS/NMS"
    )
    give_up_after_s: float = Field(
        0.0,
        ge=0,
        description="exit 1 if the first registration has not succeeded after this long "
        "(0: keep trying)",
    )
    tcp_fallback: bool = Field(
        True,
        description="carry QUIC over TLS on TCP 443 when UDP 443 gets no answer "
        "(docs/tcp-transport.md)",
    )
    https_proxy: str | None = Field(
        None,
        description="HTTPS proxy (http://host:port) for the TCP 443 transport; "
        "default: the HTTPS_PROXY environment variable",
    )
    tcp_race_delay_s: float = Field(
        0.5, ge=0, description="seconds a service's UDP may stay silent before TCP 443 joins in"
    )
    udp_probe_interval_s: float = Field(
        30.0, gt=0, description="while on TCP 443: seconds between checks that UDP is back"
    )
    crl_refresh_s: float = Field(
        30.0,
        ge=0.1,
        description="seconds between fetches of the AS's CRL: a revoked peer's tunnel "
        "closes within this even when the NMS cannot reach either node",
    )
    renew_at: float = Field(
        2 / 3,
        gt=0,
        lt=1,
        description="renew the node certificate (new key) at this fraction of its lifetime",
    )
    log_level: str = Field("info", description="debug, info, warning or error")
    log_format: str = Field("console", description="console or json")

    @field_validator("tun_name")
    @classmethod
    def _tun_name(cls, value: str) -> str:
        if not 0 < len(value.encode()) < 16:
            raise ValueError("the TUN name must be 1-15 bytes")
        return value

    @field_validator("dns_listen")
    @classmethod
    def _dns_listen(cls, value: str) -> str:
        if value.strip().lower() in DNS_OFF:
            return "off"
        try:
            host, _ = parse_hostport(value, default_port=53)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from exc
        ipaddress.ip_address(host)  # the stub binds an address, not a name
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str) -> str:
        if value.strip().lower() in DNS_OFF:
            return "off"
        try:
            host, _ = parse_hostport(value)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from exc
        ipaddress.ip_address(host)  # an address to bind, not a name
        return value

    @field_validator("dns_manager")
    @classmethod
    def _dns_manager(cls, value: str) -> str:
        if value not in MANAGERS:
            raise ValueError(f"must be one of {', '.join(MANAGERS)}")
        return value

    @field_validator("as_endpoints", "dns_upstreams")
    @classmethod
    def _endpoints(cls, value: list[str] | None) -> list[str] | None:
        for item in value or ():
            try:
                parse_hostport(item, default_port=443)
            except InvalidArgument as exc:
                raise ValueError(exc.message) from exc
        return value

    @model_validator(mode="after")
    def _timing(self) -> AgentSettings:
        if self.tunnel_keepalive_s * 2 > self.peer_timeout_s:
            raise ValueError("tunnel_keepalive_s must be at most half of peer_timeout_s")
        return self

    @property
    def dns_address(self) -> tuple[str, int] | None:
        """Where the DNS stub listens, or None when it is off."""
        if self.dns_listen == "off":
            return None
        return parse_hostport(self.dns_listen, default_port=53)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where the metrics endpoint listens, or None when it is off."""
        if self.metrics_listen == "off":
            return None
        return parse_hostport(self.metrics_listen)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = getattr(settings_cls, "_config_file", None)
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @classmethod
    def load(cls, *, config_file: Path | None = None, **flags: Any) -> AgentSettings:
        """Settings from flags (None = not given), then the environment, then the file.

        Raises ``InvalidArgument`` with every problem found.
        """
        given = {k: v for k, v in flags.items() if v is not None}
        if config_file is not None and not config_file.is_file():
            raise InvalidArgument(f"config file {config_file} does not exist")
        source = cls
        if config_file is not None:
            source = type("AgentSettingsFromFile", (cls,), {"_config_file": config_file})
        try:
            settings = source(**given)
        except ValueError as exc:  # a ValidationError, or e.g. a TOML syntax error
            problems = describe_settings_error(exc)
            raise InvalidArgument(f"bad agent settings: {problems}") from exc
        return settings
