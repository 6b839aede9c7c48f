"""TRS settings: ``CYPHONIC_*`` environment variables, overridden by command-line flags."""

from __future__ import annotations

from cyphonic import relay_token
from cyphonic.config import QUIC_PORT, ServiceSettings
from cyphonic.errors import InvalidArgument
from cyphonic.hostport import parse_host_port
from pydantic import Field, SecretStr, field_validator, model_validator

from cyphonic_trs.allocation import DEFAULT_CIDS_PER_SIDE, MAX_CIDS_PER_SIDE
from cyphonic_trs.cid import MAX_REPLICA_ID
from cyphonic_trs.storage import DEFAULT_PREFIX


class TrsSettings(ServiceSettings):
    """Everything the TRS reads from its environment (prefix ``CYPHONIC_``)."""

    http_port: int = Field(8083, description="TCP port of the TRS admin REST API")
    replica_id: int = Field(
        0,
        ge=0,
        le=MAX_REPLICA_ID,
        description="number of this TRS replica, encoded in every CID it issues; unique among "
        "replicas sharing Redis (a StatefulSet ordinal)",
    )
    public_endpoints: list[str] = Field(
        default_factory=list,
        description="UDP addresses nodes dial to reach this replica (ip:port, [v6]:port: the "
        "NMS hands out addresses, so a host name is refused), registered for the NMS; JSON "
        "list in the environment",
    )
    server_name: str | None = Field(
        None, description="name in this replica's certificate; default trs.svc.<domain>"
    )
    redis_prefix: str = Field(DEFAULT_PREFIX, description="prefix of every Redis key")
    relay_token_secret: SecretStr | None = Field(
        None, description="HMAC secret shared with the NMS (16+ bytes)"
    )
    relay_token_previous_secret: SecretStr | None = Field(
        None, description="the secret before a rotation, accepted until its tokens expire"
    )
    cids_per_side: int = Field(
        DEFAULT_CIDS_PER_SIDE,
        ge=1,
        le=MAX_CIDS_PER_SIDE,
        description="connection IDs issued to each side of a relayed route",
    )
    idle_timeout_s: float = Field(
        300.0, gt=0, description="a relayed session with no packet for this long is removed"
    )
    sync_interval_s: float = Field(
        10.0,
        gt=0,
        description="how often Redis TTLs, counters and this replica's heartbeat are refreshed",
    )
    as_url: str | None = Field(
        None,
        description="REST URL of the AS (http://as:8081): its CRL, signed by the node CA, is "
        "fetched from <as_url>/v1/crl so that revoked node certificates are refused in the TLS "
        "handshake; without it revocation is not checked (logged at start)",
    )
    revocation_refresh_s: float = Field(
        5.0, gt=0, le=3600, description="how often the AS's CRL is fetched again"
    )
    socket_buffer_bytes: int = Field(
        4 * 1024 * 1024, ge=65536, description="UDP socket send and receive buffer size"
    )

    @field_validator("public_endpoints")
    @classmethod
    def _check_endpoints(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                parse_host_port(item, default_port=QUIC_PORT, require_ip=True)
            except InvalidArgument as exc:  # pydantic reports ValueErrors as validation errors
                raise ValueError(exc.message) from exc
        return value

    @model_validator(mode="after")
    def _check(self) -> TrsSettings:
        if self.sync_interval_s * 2 >= self.idle_timeout_s:
            raise ValueError("idle_timeout_s must be more than twice sync_interval_s")
        return self

    @property
    def certificate_name(self) -> str:
        """The name nodes expect in this replica's certificate."""
        return self.server_name or f"trs.svc.{self.domain}"

    @property
    def session_ttl_s(self) -> float:
        """TTL of session and CID keys in Redis: idle timeout plus two syncs."""
        return self.idle_timeout_s + 2 * self.sync_interval_s

    def relay_secrets(self) -> list[bytes]:
        """Secrets accepted for allocation tokens, current first (a development default only
        in the ``local`` environment)."""
        current = self.relay_token_secret.get_secret_value() if self.relay_token_secret else None
        secrets = [relay_token.secret_from_env(self.environment, current)]
        if self.relay_token_previous_secret is not None:
            secrets.append(self.relay_token_previous_secret.get_secret_value().encode())
        return secrets
