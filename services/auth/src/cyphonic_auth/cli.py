"""``cyphonic-as``: the Authentication Service command line.

    cyphonic-as init-pki --pki-dir ./pki [--domain cyphonic.internal]
    cyphonic-as migrate [--database-url URL] [--wait SECONDS]
    cyphonic-as pki-bootstrap --prefix P [--label k=v]   # PKI Secrets in Kubernetes (hook Job)
    cyphonic-as serve [--migrate] [--http-port 8081] [--quic-port 443] ...
    cyphonic-as create-node NAME [--tag owner=alice] [--device model=pi4]
    cyphonic-as token NAME [--ttl 3600]          # prints a one-time enrolment token
    cyphonic-as revoke NAME [--reason key_compromise]

Flags override the ``CYPHONIC_*`` environment. Exit status: 0 done, 1 refused or failed
(the reason on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cyphonic import log, service
from cyphonic.errors import CyphonicError
from cyphonic.pki import init_pki
from cyphonic.registry import db
from pydantic import SecretStr

from cyphonic_auth.config import AuthSettings
from cyphonic_auth.server import AsServer, build_service
from cyphonic_auth.service import AuthService

ADMIN_TOKEN_FILE = "admin-token"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="registry database URL (CYPHONIC_DATABASE_URL)")
    parser.add_argument("--pki-dir", type=Path, help="CA and service certificates")
    parser.add_argument("--domain", help="overlay DNS domain (default cyphonic.internal)")
    parser.add_argument("--log-level", help="debug, info, warning or error")
    parser.add_argument("--log-format", choices=["console", "json"])


def _wait_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep trying this long while the database is unreachable (default 0)",
    )


def _pairs(values: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"cyphonic-as: expected key=value, got {item!r}")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render --help in the docs)."""
    parser = argparse.ArgumentParser(
        prog="cyphonic-as",
        description="CYPHONIC Authentication Service: node CA, enrolment, QUIC login.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init-pki", help="create (or complete) the CA hierarchy and service certs")
    _common(p)
    p.add_argument(
        "--services",
        default="as,nms,trs",
        help="service certificates to issue (default as,nms,trs)",
    )

    p = sub.add_parser(
        "pki-bootstrap",
        help="create the missing PKI Secrets in Kubernetes (the chart's hook Job; in-cluster)",
    )
    _common(p)
    p.add_argument("--prefix", required=True, help="Secret name prefix: <prefix>-{ca,as,nms,trs}")
    p.add_argument("--label", action="append", help="label of created Secrets, key=value")

    p = sub.add_parser("migrate", help="bring the registry database schema up to date")
    _common(p)
    _wait_flag(p)

    p = sub.add_parser("serve", help="run the QUIC endpoint and the admin REST API")
    _common(p)
    p.add_argument("--migrate", action="store_true", help="migrate the database first")
    p.add_argument("--http-host", help="admin REST address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="admin REST port (default 8081)")
    p.add_argument("--quic-host", help="QUIC bind address (default ::)")
    p.add_argument("--quic-port", type=int, help="QUIC UDP port (default 443)")
    p.add_argument(
        "--admin-token-file",
        type=Path,
        help="file with the admin bearer token (local default: <pki-dir>/admin-token,"
        " created if missing)",
    )
    p.add_argument(
        "--as-endpoint",
        action="append",
        dest="as_endpoints",
        help="AS QUIC endpoint told to enrolling nodes, host:port (repeatable)",
    )
    p.add_argument(
        "--nms-endpoint",
        action="append",
        dest="nms_endpoints",
        help="NMS QUIC endpoint answered at login, ip:port (repeatable)",
    )
    p.add_argument("--no-quic", action="store_true", help="admin REST only (no QUIC endpoint)")

    p = sub.add_parser("create-node", help="register a node (directly in the database)")
    _common(p)
    p.add_argument("name", help="node name, a DNS label")
    p.add_argument("--tag", action="append", help="owner/group tag key=value (repeatable)")
    p.add_argument("--device", action="append", help="device fact key=value (repeatable)")

    p = sub.add_parser("token", help="issue a one-time enrolment token for a node")
    _common(p)
    p.add_argument("name", help="node name")
    p.add_argument("--ttl", type=int, help="lifetime in seconds (default from settings)")

    p = sub.add_parser("revoke", help="revoke a node and all its certificates")
    _common(p)
    p.add_argument("name", help="node name")
    p.add_argument("--reason", default="unspecified", help="why (e.g. key_compromise)")
    return parser


def _settings(args: argparse.Namespace) -> AuthSettings:
    flags = (
        "database_url",
        "pki_dir",
        "domain",
        "log_level",
        "log_format",
        "http_host",
        "http_port",
        "quic_host",
        "quic_port",
        "admin_token_file",
        "as_endpoints",
        "nms_endpoints",
    )
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in flags if getattr(args, name, None) is not None
    }
    if args.command == "serve" and args.admin_token_file is not None:
        # The flag beats a token from the environment, as flags do.
        overrides["admin_token"] = SecretStr(args.admin_token_file.read_text().strip())
    return AuthSettings(**overrides)


def _ensure_admin_token(settings: AuthSettings) -> None:
    # Local convenience: with no token configured, keep one in the PKI directory (0600).
    if settings.admin_token is not None:
        return
    path = settings.pki_dir / ADMIN_TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    settings.admin_token = SecretStr(path.read_text().strip())
    settings.admin_token_file = path


async def serve(settings: AuthSettings, *, migrate: bool, quic: bool = True) -> None:
    """Run the AS until SIGTERM or SIGINT: admin REST and (when available) QUIC."""
    await service.serve(AsServer(settings, migrate=migrate, quic=quic))


async def _with_service(settings: AuthSettings, action: Any) -> Any:
    engine = db.create_engine(settings.database_url)
    try:
        return await action(build_service(settings, engine))
    finally:
        await engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cyphonic-as``."""
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ValueError as exc:  # pydantic's ValidationError included
        return service.print_settings_error("cyphonic-as", exc)
    log.configure(settings.log_level, settings.log_format)
    try:
        return _run(args, settings)
    except CyphonicError as exc:
        print(f"cyphonic-as: {exc.code_name}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # a busy port, an unreadable file
        print(f"cyphonic-as: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, settings: AuthSettings) -> int:
    now = datetime.now(UTC)
    if args.command == "init-pki":
        services = [s.strip() for s in args.services.split(",") if s.strip()]
        material = init_pki(settings.pki_dir, domain=settings.domain, now=now, services=services)
        for name in material.created:
            print(f"created {settings.pki_dir / name}")
        if not material.created:
            print(f"{settings.pki_dir}: complete, nothing created")
        return 0
    if args.command == "pki-bootstrap":
        from cyphonic_auth.kube_pki import KubernetesSecrets, bootstrap

        bootstrap(
            KubernetesSecrets(),
            prefix=args.prefix,
            domain=settings.domain,
            labels=_pairs(args.label),
            now=now,
        )
        return 0
    if args.command == "migrate":
        db.migrate(settings.database_url, wait_s=args.wait)
        print("registry database is up to date")
        return 0
    if args.command == "serve":
        _ensure_admin_token(settings)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(settings, migrate=args.migrate, quic=not args.no_quic))
        return 0
    if args.command == "create-node":
        tags, device = _pairs(args.tag), _pairs(args.device)

        async def create(service: AuthService) -> Any:
            return await service.create_node(args.name, tags=tags, device_info=device, actor="cli")

        node = asyncio.run(_with_service(settings, create))
        print(node.fqdn)
        return 0
    if args.command == "token":
        ttl = timedelta(seconds=args.ttl) if args.ttl else None

        async def token(service: AuthService) -> Any:
            return await service.issue_token(args.name, ttl=ttl, actor="cli")

        issued = asyncio.run(_with_service(settings, token))
        print(issued.token)
        print(f"for {issued.node.fqdn}, expires {issued.expires_at.isoformat()}", file=sys.stderr)
        return 0
    if args.command == "revoke":

        async def revoke(service: AuthService) -> Any:
            return await service.revoke_node(args.name, reason=args.reason, actor="cli")

        added = asyncio.run(_with_service(settings, revoke))
        print(f"revoked {args.name}: {len(added)} new revocation(s)")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
