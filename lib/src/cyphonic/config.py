"""Configuration shared by every service: one pydantic-settings class each, ``CYPHONIC_*``.

Each service subclasses ``ServiceSettings`` and adds its own fields; flags given on the
command line override the environment (the CLI passes them as keyword arguments).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DOMAIN = "cyphonic.internal"
QUIC_PORT = 443
ALPN_SIGNALLING = "cyphonic-sig/1"
ALPN_TUNNEL = "cyphonic-tun/1"
QUIC_RETRY_THRESHOLD = 64
QUIC_MAX_HANDSHAKES = 128
"""Server handshakes a service carries at once; Initials beyond are refused statelessly with
a retry-after (``cyphonic.quic.refusal``; the client's connect raises ``Overloaded`` at once).
A bound well above the retry threshold and below what the CPU finishes inside a client's
connect timeout: in a reconnect storm, all of 1,000 handshakes at once would each take
longer than that timeout and none would count."""
"""Server handshakes under way from which services ask new clients for a QUIC Retry."""

_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "sslpassword", "token"})


def hide_password(url: str | None) -> str | None:
    """``url`` fit to print or log: the password in its user info and password-like query
    parameters become ``***`` (database and Redis URLs alike); None stays None.

    SQLAlchemy's ``make_url(url).render_as_string(hide_password=True)`` does the first part
    for database URLs only; Redis URLs (``redis://:secret@host/0``) need the same.
    """
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL hidden>"
    out = url
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        hidden = f"{userinfo.split(':', 1)[0]}:***@{host}"
        out = out.replace(f"//{parts.netloc}", f"//{hidden}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(k.lower() in _SECRET_QUERY_KEYS for k, _ in pairs):
            query = urlencode(
                [(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*"
            )
            out = out.replace(f"?{parts.query}", f"?{query}", 1)
    return out


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` in its user info, percent-encoded (``@ / : %`` and the like
    cannot break the URL); a password already in ``url`` is replaced.

    For URLs assembled from parts, e.g. a Kubernetes Secret holding only the password:
    ``with_password("redis://redis:6379/0", "p@ss")`` is ``redis://:p%40ss@redis:6379/0``.
    """
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0] if at else ""
    netloc = f"{user}:{quote(password, safe='')}@{hostport}"
    return urlunsplit(parts._replace(netloc=netloc))


# A misspelt environment ("prod") must not slip past the production checks: refuse it.
Environment = Literal["local", "test", "production"]


class ServiceSettings(BaseSettings):
    """Settings every cloud service (AS, NMS, TRS) has."""

    model_config = SettingsConfigDict(env_prefix="CYPHONIC_", extra="ignore")

    environment: Environment = Field(
        "local",
        description="local, test or production; production refuses unsafe defaults "
        "(anything else is refused)",
    )
    database_url: str = Field(
        "sqlite+aiosqlite:///./cyphonic.db",
        description="SQLAlchemy URL of the node registry (postgresql+asyncpg://... in production)",
    )
    database_password: SecretStr | None = Field(
        None,
        description="password put into database_url, percent-encoded (for URLs assembled from "
        "parts, e.g. a Kubernetes Secret holding only the password)",
    )
    redis_url: str | None = Field(
        None, description="Redis URL (CID table, presence, pub/sub); none = in-process"
    )
    redis_password: SecretStr | None = Field(
        None, description="password put into redis_url, percent-encoded"
    )
    redis_prefix: str = Field(
        "cyphonic:",
        description="prefix of every Redis key; the same for all services that "
        "share a Redis (the NMS finds the TRS replicas under it)",
    )
    domain: str = Field(DEFAULT_DOMAIN, description="overlay DNS domain; node FQDN = name.domain")
    quic_host: str = Field("::", description="address the QUIC endpoint binds (dual-stack ::)")
    quic_port: int = Field(QUIC_PORT, description="UDP port of the QUIC endpoint")
    quic_retry_threshold: int = Field(
        QUIC_RETRY_THRESHOLD,
        ge=0,
        description="QUIC handshakes under way from which new clients must prove their "
        "address with a stateless Retry (0: always)",
    )
    quic_max_handshakes: int = Field(
        QUIC_MAX_HANDSHAKES,
        ge=1,
        description="QUIC handshakes carried at once; new clients beyond are refused with a "
        "retry-after before any handshake work: a reconnect storm is served in turn",
    )
    http_host: str = Field("127.0.0.1", description="address of the admin REST API")
    http_port: int = Field(8080, description="TCP port of the admin REST API")
    pki_dir: Path = Field(Path("./pki"), description="directory of CA and service certificates")
    admin_token: SecretStr | None = Field(None, description="bearer token of the admin REST API")
    admin_token_file: Path | None = Field(None, description="file holding the admin token")
    log_level: str = Field("info", description="debug, info, warning or error")
    log_format: str = Field("console", description="console (people) or json (collectors)")

    @model_validator(mode="after")
    def _load_admin_token(self) -> ServiceSettings:
        if self.database_password is not None:
            self.database_url = with_password(
                self.database_url, self.database_password.get_secret_value()
            )
        if self.redis_password is not None and self.redis_url:
            self.redis_url = with_password(self.redis_url, self.redis_password.get_secret_value())
        if self.admin_token is None and self.admin_token_file is not None:
            self.admin_token = SecretStr(self.admin_token_file.read_text().strip())
        if self.environment == "production":
            token = self.admin_token.get_secret_value() if self.admin_token else ""
            if len(token) < 24:
                raise ValueError("production needs an admin token of at least 24 characters")
            if self.database_url.startswith("sqlite"):
                raise ValueError("production needs a PostgreSQL database_url")
        return self
