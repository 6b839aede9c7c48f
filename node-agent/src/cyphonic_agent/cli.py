"""``cyphonic-agent``: the node agent command line.

    cyphonic-agent enroll --as https://as.example:8081 --token-file T --state-dir /var/lib/cyphonic
    cyphonic-agent status [--json]

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

from cyphonic_agent.status import add_status_parser, run_status

DEFAULT_STATE_DIR = Path("/var/lib/cyphonic-agent")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand is one ``sub.add_parser``."""
    parser = argparse.ArgumentParser(prog="cyphonic-agent",
                                     description="CYPHONIC node agent.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("enroll", help="enrol this host with the AS (key made here)")
    p.add_argument("--as", dest="as_url", required=True,
                   help="AS admin REST URL, e.g. https://as.example.net:8081")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", help="one-time enrolment token (visible to ps; prefer "
                                       "--token-file or CYPHONIC_ENROL_TOKEN)")
    token.add_argument("--token-file", type=Path, help="file holding the enrolment token")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help=f"key, certificates and agent.json (default {DEFAULT_STATE_DIR})")
    p.add_argument("--root-ca-sha256", help="expected SHA-256 fingerprint of the root CA (hex)")
    p.add_argument("--ca-file", type=Path, help="CA bundle to verify an https AS URL")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the AS's https certificate")
    p.add_argument("--force", action="store_true", help="enrol again over an existing state")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")

    add_status_parser(sub)
    return parser


def _enroll(args: argparse.Namespace) -> int:
    from cyphonic_agent.enroll import enroll, is_plaintext_remote

    if args.token is not None:
        token = args.token
    elif args.token_file is not None:
        token = args.token_file.read_text()
    else:
        token = os.environ.get("CYPHONIC_ENROL_TOKEN", "")
    if not token.strip():
        print("cyphonic-agent: no token (--token, --token-file or CYPHONIC_ENROL_TOKEN)",
              file=sys.stderr)
        return 2
    if is_plaintext_remote(args.as_url):
        print("cyphonic-agent: warning: the token travels unencrypted over http; "
              "use https or --root-ca-sha256", file=sys.stderr)
    verify: bool | str = False if args.insecure else (str(args.ca_file) if args.ca_file else True)
    state = asyncio.run(enroll(
        as_url=args.as_url, token=token, state_dir=args.state_dir, verify=verify,
        root_ca_sha256=args.root_ca_sha256, force=args.force, request_timeout=args.timeout,
    ))
    print(state.fqdn)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cyphonic-agent``."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "enroll":
            return _enroll(args)
        if args.command == "status":
            return run_status(args)
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
