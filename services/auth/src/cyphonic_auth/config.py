"""Settings of the Authentication Service (``CYPHONIC_*`` environment, CLI flags override)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated

from cyphonic.config import QUIC_PORT, ServiceSettings
from cyphonic.errors import InvalidArgument
from cyphonic.hostport import format_host_port, parse_host_port
from cyphonic.pki import NODE_CA_CERT, NODE_CA_KEY, ROOT_CA_CERT, service_name
from pydantic import Field, field_validator
from pydantic_settings import NoDecode

DEFAULT_HTTP_PORT = 8081


def _split(value: object) -> object:
    # "a, b" from the environment or a flag; a JSON list or a Python list also works.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _checked(endpoints: list[str], *, require_ip: bool) -> list[str]:
    for item in endpoints:
        try:
            parse_host_port(item, default_port=QUIC_PORT, require_ip=require_ip)
        except InvalidArgument as exc:  # pydantic reports ValueErrors as validation errors
            raise ValueError(exc.message) from exc
    return endpoints


class AuthSettings(ServiceSettings):
    """The AS: its node CA, what it tells nodes, how long certificates and tokens live."""

    http_port: int = Field(DEFAULT_HTTP_PORT, description="TCP port of the admin REST API")
    node_cert_days: int = Field(
        7,
        ge=1,
        le=397,
        description="validity of node certificates, in days (agents renew them in place at "
        "two thirds of it)",
    )
    node_cert_seconds: int | None = Field(
        None,
        ge=10,
        le=397 * 86_400,
        description="validity of node certificates in seconds, instead of node_cert_days "
        "(very short-lived certificates, tests)",
    )
    token_ttl_seconds: int = Field(
        86_400,
        ge=60,
        le=30 * 86_400,
        description="default lifetime of an enrolment token (an admin may ask for another)",
    )
    crl_hours: int = Field(24, ge=1, le=24 * 30, description="nextUpdate of the published CRL")
    revocation_refresh_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="how often the QUIC endpoint's set of revoked certificates re-reads the "
        "registry (revocations made by this process apply at once)",
    )
    as_endpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="the AS QUIC endpoints told to enrolling nodes, 'host:port' comma-separated "
        "(default: the QUIC bind address if it is not a wildcard, else the host name the node "
        "used for the REST API with quic_port)",
    )
    nms_endpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="NMS QUIC endpoints answered at login, IPv4 and IPv6 'ip:port' "
        "comma-separated ('[v6]:port' for IPv6)",
    )
    nms_server_name: str | None = Field(
        None, description="name in the NMS certificate (default nms.svc.<domain>)"
    )
    node_ca_cert: Path | None = Field(None, description="node CA certificate (default in pki_dir)")
    node_ca_key: Path | None = Field(None, description="node CA private key (default in pki_dir)")
    root_ca_cert: Path | None = Field(None, description="root CA certificate (default in pki_dir)")

    @field_validator("as_endpoints", "nms_endpoints", mode="before")
    @classmethod
    def _parse_list(cls, value: object) -> object:
        return _split(value)

    @field_validator("as_endpoints")
    @classmethod
    def _check_as(cls, value: list[str]) -> list[str]:
        return _checked(value, require_ip=False)

    @field_validator("nms_endpoints")
    @classmethod
    def _check_nms(cls, value: list[str]) -> list[str]:
        return _checked(value, require_ip=True)

    @property
    def node_cert_validity(self) -> timedelta:
        """How long a node certificate is valid."""
        if self.node_cert_seconds is not None:
            return timedelta(seconds=self.node_cert_seconds)
        return timedelta(days=self.node_cert_days)

    @property
    def node_ca_paths(self) -> tuple[Path, Path]:
        """Certificate and key file of the node CA."""
        return (
            self.node_ca_cert or self.pki_dir / NODE_CA_CERT,
            self.node_ca_key or self.pki_dir / NODE_CA_KEY,
        )

    @property
    def root_ca_path(self) -> Path:
        """The root CA certificate file."""
        return self.root_ca_cert or self.pki_dir / ROOT_CA_CERT

    @property
    def as_server_name(self) -> str:
        """The name in the AS certificate, which nodes check."""
        return service_name("as", self.domain)

    @property
    def nms_name(self) -> str:
        """The name in the NMS certificate, which nodes check."""
        return self.nms_server_name or service_name("nms", self.domain)

    @property
    def published_as_endpoints(self) -> list[str]:
        """AS QUIC endpoints for enrolling nodes."""
        if self.as_endpoints:
            return list(self.as_endpoints)
        if self.quic_host in ("", "::", "0.0.0.0"):
            return []
        return [format_host_port(self.quic_host, self.quic_port)]
