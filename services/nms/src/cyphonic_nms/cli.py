"""``cyphonic-nms``: the Node Management Service command line.

    cyphonic-nms serve [--migrate] [--replica-id nms-0] [--redis-url redis://...] ...
    cyphonic-nms migrate [--database-url URL]
    cyphonic-nms settings            # the effective settings, secrets hidden
    cyphonic-nms policy get|set FILE|delete|check A B tcp/22|history   (docs/policy.md)
    cyphonic-nms tags get FQDN | tags set FQDN KEY=VALUE...

Flags override the ``CYPHONIC_*`` environment. Exit status: 0 done, 1 refused or failed
(the reason on stderr), 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cyphonic import log, service
from cyphonic.config import hide_password
from cyphonic.errors import CyphonicError

from cyphonic_nms import policy_cli
from cyphonic_nms.config import NmsSettings


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="registry database URL (CYPHONIC_DATABASE_URL)")
    parser.add_argument("--log-level", help="debug, info, warning or error")
    parser.add_argument("--log-format", choices=["console", "json"])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render --help in the docs)."""
    parser = argparse.ArgumentParser(
        prog="cyphonic-nms",
        description="CYPHONIC Node Management Service: registration, NAT detection, virtual "
        "addresses, route decisions and pushes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the QUIC endpoint and the admin REST API")
    _common(p)
    p.add_argument("--migrate", action="store_true", help="migrate the database first")
    p.add_argument("--pki-dir", type=Path, help="directory with root-ca.crt, nms.crt, nms.key")
    p.add_argument("--domain", help="overlay DNS domain (default cyphonic.internal)")
    p.add_argument("--redis-url", help="Redis for presence, pub/sub and routes (replicas)")
    p.add_argument("--replica-id", help="this replica's name (default host-pid)")
    p.add_argument("--http-host", help="admin REST address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="admin REST port (default 8082)")
    p.add_argument("--quic-host", help="QUIC bind address (default ::)")
    p.add_argument("--quic-port", type=int, help="QUIC UDP port (default 443)")
    p.add_argument("--admin-token-file", type=Path, help="file with the admin bearer token")
    p.add_argument("--ipv4-pool", help="virtual IPv4 pool, CIDR (default 100.64.0.0/16)")
    p.add_argument("--ipv6-pool", help="virtual IPv6 pool, CIDR (default ULA /48 of the domain)")
    p.add_argument(
        "--keepalive-interval",
        type=float,
        dest="keepalive_interval_s",
        help="seconds between Keepalives of agents that do not PING (default 15)",
    )
    p.add_argument(
        "--ping-interval",
        type=float,
        dest="ping_interval_s",
        help="QUIC PING interval told to agents (default 25; 0: Keepalive requests)",
    )
    p.add_argument(
        "--offline-timeout",
        type=float,
        dest="offline_timeout_s",
        help="seconds of silence before a node is offline (default 45)",
    )
    p.add_argument(
        "--reach-probe-port",
        type=int,
        dest="reach_probe_port",
        help="UDP port of the reachability probes (default 0: any free port; -1: no probes)",
    )
    p.add_argument("--no-quic", action="store_true", help="admin REST only (no QUIC endpoint)")

    p = sub.add_parser("migrate", help="bring the registry database schema up to date")
    _common(p)
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep trying this long while the database is unreachable (default 0)",
    )

    p = sub.add_parser("settings", help="print the effective settings (secrets hidden)")
    _common(p)
    policy_cli.add_parsers(sub)
    return parser


_FLAGS = (
    "database_url",
    "log_level",
    "log_format",
    "pki_dir",
    "domain",
    "redis_url",
    "replica_id",
    "http_host",
    "http_port",
    "quic_host",
    "quic_port",
    "admin_token_file",
    "ipv4_pool",
    "ipv6_pool",
    "keepalive_interval_s",
    "ping_interval_s",
    "offline_timeout_s",
    "reach_probe_port",
)


def settings_from(args: argparse.Namespace) -> NmsSettings:
    """Settings from the environment, overridden by the flags given."""
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None
    }
    if getattr(args, "migrate", False):
        overrides["migrate"] = True
    return NmsSettings(**overrides)


def printable_settings(settings: NmsSettings) -> dict[str, Any]:
    """The settings as JSON-ready data with every secret hidden (tokens and URL passwords)."""
    data = settings.model_dump(mode="json")  # SecretStr fields come out as "**********"
    for key in ("database_url", "redis_url"):
        data[key] = hide_password(data[key])
    return data


async def serve(settings: NmsSettings, *, quic: bool = True) -> None:
    """Run one NMS replica until SIGTERM or SIGINT."""
    from cyphonic_nms.server import NmsServer  # the whole service: not for the admin commands

    await service.serve(NmsServer(settings, quic=quic))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cyphonic-nms``."""
    args = build_parser().parse_args(argv)
    if args.command in ("policy", "tags"):
        return policy_cli.run(args)  # a client of the admin API: no service settings
    try:
        settings = settings_from(args)
    except ValueError as exc:  # pydantic's ValidationError included
        return service.print_settings_error("cyphonic-nms", exc)
    log.configure(settings.log_level, settings.log_format)
    try:
        if args.command == "migrate":
            from cyphonic.registry import migrate

            migrate(settings.database_url, wait_s=args.wait)
            print("registry database is up to date")
            return 0
        if args.command == "settings":
            print(json.dumps(printable_settings(settings), indent=2, sort_keys=True))
            return 0
        if args.command == "serve":
            settings.relay_secret()  # refuse a missing secret before binding anything
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(serve(settings, quic=not args.no_quic))
            return 0
    except CyphonicError as exc:
        print(f"cyphonic-nms: {exc.code_name}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cyphonic-nms: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
