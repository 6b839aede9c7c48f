"""``cyphonic-trs``: the Tunnel Relay Service command line.

    cyphonic-trs serve [--replica-id N] [--quic-port 443] [--redis-url URL] ...
    cyphonic-trs replicas [--redis-url URL]     # live replicas sharing the CID table
    cyphonic-trs cid HEX                        # decode a relay connection ID

Flags override the ``CYPHONIC_*`` environment. Exit status: 0 done, 1 refused or failed
(the reason on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cyphonic import log, service
from cyphonic.errors import CyphonicError

from cyphonic_trs.cid import parse_cid
from cyphonic_trs.config import TrsSettings
from cyphonic_trs.server import TrsServer
from cyphonic_trs.service import make_table

PROG = "cyphonic-trs"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        help="Redis URL of the shared CID table "
        "(CYPHONIC_REDIS_URL; none = in-process, one replica)",
    )
    parser.add_argument("--redis-prefix", help="prefix of every Redis key (default cyphonic:)")
    parser.add_argument("--log-level", help="debug, info, warning or error")
    parser.add_argument("--log-format", choices=["console", "json"])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render --help in the docs)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="CYPHONIC Tunnel Relay Service: blind relay of QUIC packets by "
        "connection ID (pattern 3).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="relay on UDP and serve the admin REST API")
    _common(p)
    p.add_argument(
        "--replica-id",
        type=int,
        help="this replica's number, 0..65535, unique per CID table (default 0)",
    )
    p.add_argument("--quic-host", help="UDP bind address (default :: dual-stack)")
    p.add_argument("--quic-port", type=int, help="UDP port for relay and control (default 443)")
    p.add_argument(
        "--public-endpoint",
        action="append",
        dest="public_endpoints",
        help="host:port nodes dial to reach this replica, registered for the NMS "
        "(repeatable; default: the bind address if it is not a wildcard)",
    )
    p.add_argument("--http-host", help="admin REST address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="admin REST port (default 8083)")
    p.add_argument("--no-http", action="store_true", help="no admin REST API")
    p.add_argument(
        "--idle-timeout",
        type=float,
        dest="idle_timeout_s",
        help="seconds without a packet before a session is removed (default 300)",
    )
    p.add_argument(
        "--cids-per-side",
        type=int,
        help="connection IDs issued to each side of a route (default 16)",
    )
    p.add_argument("--domain", help="overlay DNS domain (default cyphonic.internal)")
    p.add_argument(
        "--as-url",
        help="REST URL of the AS, whose CRL revokes node certificates "
        "in the TLS handshake (CYPHONIC_AS_URL)",
    )
    p.add_argument(
        "--pki-dir", type=Path, help="holds trs.crt/trs.key and the CA certificates (required)"
    )

    p = sub.add_parser("replicas", help="list the live replicas registered in the CID table")
    _common(p)

    p = sub.add_parser("cid", help="decode a relay connection ID (hex)")
    p.add_argument("hex", help="the connection ID, e.g. from a packet capture")
    return parser


def _settings(args: argparse.Namespace) -> TrsSettings:
    flags = (
        "redis_url",
        "redis_prefix",
        "log_level",
        "log_format",
        "replica_id",
        "quic_host",
        "quic_port",
        "public_endpoints",
        "http_host",
        "http_port",
        "idle_timeout_s",
        "cids_per_side",
        "domain",
        "pki_dir",
        "as_url",
    )
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in flags if getattr(args, name, None) is not None
    }
    return TrsSettings(**overrides)


async def serve(settings: TrsSettings, *, http: bool = True) -> None:
    """Run one replica until SIGTERM or SIGINT."""
    await service.serve(TrsServer(settings, http=http))


async def _replicas(settings: TrsSettings) -> list[dict[str, Any]]:
    table = make_table(settings)
    try:
        return [
            {
                "replica_id": f"trs-{r.replica}",
                "endpoints": list(r.endpoints),
                "server_name": r.server_name,
                "sessions": r.load,
                "forwarded_packets": r.forwarded_packets,
                "updated_ms": r.updated_ms,
            }
            for r in await table.replicas()
        ]
    finally:
        await table.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cyphonic-trs``."""
    args = build_parser().parse_args(argv)
    if args.command == "cid":
        try:
            fields = parse_cid(bytes.fromhex(args.hex.replace(":", "")))
        except ValueError as exc:  # bad hex, or CidError (an InvalidArgument, not ValueError)
            print(f"{PROG}: not hex: {exc}", file=sys.stderr)
            return 2
        except CyphonicError as exc:
            print(f"{PROG}: {exc.message}", file=sys.stderr)
            return 1
        print(
            json.dumps(
                {
                    "config": fields.config_id,
                    "replica": fields.replica_id,
                    "replica_id": f"trs-{fields.replica_id}",
                    "nonce": fields.nonce.hex(),
                }
            )
        )
        return 0
    try:
        settings = _settings(args)
    except ValueError as exc:  # pydantic's ValidationError included
        return service.print_settings_error(PROG, exc)
    log.configure(settings.log_level, settings.log_format)
    try:
        if args.command == "serve":
            asyncio.run(serve(settings, http=not args.no_http))
        elif args.command == "replicas":
            print(json.dumps(asyncio.run(_replicas(settings)), indent=2))
    except CyphonicError as exc:
        print(f"{PROG}: {exc.code_name}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
