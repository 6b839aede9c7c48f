"""``cyphonic-agent``: the node agent command line.

    cyphonic-agent enroll --as https://as.example:8081 --token-file T --state-dir /var/lib/cyphonic
    cyphonic-agent up [--state-dir D] [--config agent.toml] [--quic-port 443] ...
    cyphonic-agent status [--json]
    cyphonic-agent ping NAME [-c N] [--json]
    cyphonic-agent netcheck [--state-dir D] [--json]

Exit status: 0 done, 1 refused or failed (the reason on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cyphonic.errors import CyphonicError

from cyphonic_agent.netcheck import add_netcheck_parser, run_netcheck
from cyphonic_agent.ping import add_ping_parser, run_ping
from cyphonic_agent.status import add_status_parser, run_status

DEFAULT_STATE_DIR = Path("/var/lib/cyphonic-agent")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand is one ``sub.add_parser``."""
    parser = argparse.ArgumentParser(prog="cyphonic-agent", description="CYPHONIC node agent.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("enroll", help="enrol this host with the AS (key made here)")
    p.add_argument(
        "--as",
        dest="as_url",
        required=True,
        help="AS admin REST URL, e.g. https://as.example.net:8081",
    )
    token = p.add_mutually_exclusive_group()
    token.add_argument(
        "--token",
        help="one-time enrolment token (visible to ps; prefer "
        "--token-file or CYPHONIC_ENROL_TOKEN)",
    )
    token.add_argument("--token-file", type=Path, help="file holding the enrolment token")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"key, certificates and agent.json (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument("--root-ca-sha256", help="expected SHA-256 fingerprint of the root CA (hex)")
    p.add_argument("--ca-file", type=Path, help="CA bundle to verify an https AS URL")
    p.add_argument(
        "--insecure", action="store_true", help="do not verify the AS's https certificate"
    )
    p.add_argument("--force", action="store_true", help="enrol again over an existing state")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")

    _add_up_parser(sub)
    add_status_parser(sub)
    add_ping_parser(sub)
    add_netcheck_parser(sub)
    return parser


def _add_up_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "up",
        help="join the overlay: login, register, TUN, DNS stub, tunnels (root)",
        description="Run the node agent in the foreground until SIGTERM/SIGINT. Each flag "
        "overrides its CYPHONIC_* variable (e.g. --quic-port: CYPHONIC_QUIC_PORT), which "
        "overrides the --config file (TOML, same keys: quic_port = 443).",
    )
    p.add_argument(
        "--state-dir", type=Path, help=f"written by enroll (default {DEFAULT_STATE_DIR})"
    )
    p.add_argument("--config", type=Path, help="TOML file of agent settings")
    p.add_argument("--quic-host", help="address of the one UDP socket (default ::)")
    p.add_argument("--quic-port", type=int, help="its UDP port (default 443; 0: ephemeral)")
    p.add_argument(
        "--as-endpoint",
        action="append",
        dest="as_endpoints",
        help="AS QUIC endpoint host:port, overriding agent.json's (repeatable)",
    )
    p.add_argument("--tun-name", help="TUN device name (default cyphonic0)")
    p.add_argument("--mtu", type=int, help="TUN MTU (default 1420)")
    p.add_argument("--dns-listen", help="DNS stub address:port (default 127.0.0.1:53; off)")
    p.add_argument(
        "--dns-upstream",
        action="append",
        dest="dns_upstreams",
        help="resolver for names outside the overlay (repeatable; default /etc/resolv.conf's)",
    )
    p.add_argument(
        "--accept-dns",
        type=_boolean,
        metavar="true|false",
        help="put the overlay domain into the host's resolver and back on exit (default true)",
    )
    p.add_argument(
        "--dns-manager",
        choices=["auto", "resolved", "resolv.conf"],
        help="systemd-resolved or /etc/resolv.conf (default auto: resolved where it runs)",
    )
    p.add_argument("--status-socket", type=Path, help="status API socket")
    p.add_argument(
        "--metrics-listen",
        help="address:port of a Prometheus endpoint GET /metrics (default off; "
        "keep it on loopback, e.g. 127.0.0.1:9464)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        dest="connect_timeout_s",
        help="seconds per QUIC handshake attempt (default 5)",
    )
    p.add_argument(
        "--peer-timeout",
        type=float,
        dest="peer_timeout_s",
        help="QUIC idle timeout: a silent peer or NMS is gone (default 30)",
    )
    p.add_argument(
        "--tunnel-keepalive",
        type=float,
        dest="tunnel_keepalive_s",
        help="PING interval on tunnels (default 10)",
    )
    p.add_argument(
        "--give-up-after",
        type=float,
        dest="give_up_after_s",
        help="exit 1 if not registered after this many seconds (default: never)",
    )
    p.add_argument(
        "--https-proxy",
        help="HTTPS proxy for QUIC over TCP 443 (default: $HTTPS_PROXY)",
    )
    p.add_argument(
        "--no-tcp",
        dest="tcp_fallback",
        action="store_false",
        default=None,
        help="UDP only: never carry QUIC over TLS on TCP 443",
    )
    p.add_argument("--log-level", help="debug, info, warning or error")
    p.add_argument("--log-format", choices=["console", "json"])


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


_UP_FLAGS = (
    "https_proxy",
    "tcp_fallback",
    "state_dir",
    "quic_host",
    "quic_port",
    "as_endpoints",
    "tun_name",
    "mtu",
    "dns_listen",
    "dns_upstreams",
    "accept_dns",
    "dns_manager",
    "status_socket",
    "metrics_listen",
    "connect_timeout_s",
    "peer_timeout_s",
    "tunnel_keepalive_s",
    "give_up_after_s",
    "log_level",
    "log_format",
)


def _up(args: argparse.Namespace) -> int:
    from cyphonic import log

    from cyphonic_agent.agent import AgentFailed, run_agent
    from cyphonic_agent.config import AgentSettings

    settings = AgentSettings.load(
        config_file=args.config, **{name: getattr(args, name) for name in _UP_FLAGS}
    )
    log.configure(level=settings.log_level, fmt=settings.log_format)
    try:
        asyncio.run(run_agent(settings))
    except AgentFailed as exc:
        print(f"cyphonic-agent: {exc}", file=sys.stderr)
        return 1
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from cyphonic_agent.enroll import enroll, is_plaintext_remote

    if args.token is not None:
        token = args.token
    elif args.token_file is not None:
        token = args.token_file.read_text()
    else:
        token = os.environ.get("CYPHONIC_ENROL_TOKEN", "")
    if not token.strip():
        print(
            "cyphonic-agent: no token (--token, --token-file or CYPHONIC_ENROL_TOKEN)",
            file=sys.stderr,
        )
        return 2
    if is_plaintext_remote(args.as_url):
        print(
            "cyphonic-agent: warning: the token travels unencrypted over http; "
            "use https or --root-ca-sha256",
            file=sys.stderr,
        )
    verify: bool | str = False if args.insecure else (str(args.ca_file) if args.ca_file else True)
    state = asyncio.run(
        enroll(
            as_url=args.as_url,
            token=token,
            state_dir=args.state_dir,
            verify=verify,
            root_ca_sha256=args.root_ca_sha256,
            force=args.force,
            request_timeout=args.timeout,
        )
    )
    print(state.fqdn)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cyphonic-agent``."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "enroll":
            return _enroll(args)
        if args.command == "up":
            return _up(args)
        if args.command == "status":
            return run_status(args)
        if args.command == "ping":
            return run_ping(args)
        if args.command == "netcheck":
            return run_netcheck(args)
    except CyphonicError as exc:
        print(f"cyphonic-agent: {exc.code_name}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cyphonic-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
