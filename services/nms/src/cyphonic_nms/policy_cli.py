"""``cyphonic-nms policy`` and ``cyphonic-nms tags``: the access policy from a shell, through the
NMS admin REST API (docs/policy.md)::

    cyphonic-nms policy get                         # the document in force (JSON) and revision
    cyphonic-nms policy set FILE [--expect-revision N]   # replace it ('-' reads stdin)
    cyphonic-nms policy delete                      # back to the NMS default
    cyphonic-nms policy check A B tcp/22            # dry run; exit 0 allowed, 3 denied
    cyphonic-nms policy history [--limit N]
    cyphonic-nms tags get FQDN
    cyphonic-nms tags set FQDN group=eng,ops role=db

Where: ``--url`` (``CYPHONIC_NMS_URL``, default http://127.0.0.1:8082); the admin token from
``--token-file`` or ``CYPHONIC_ADMIN_TOKEN`` / ``CYPHONIC_ADMIN_TOKEN_FILE`` (the variables the
NMS itself reads). Exit status: 0 done, 1 refused or failed (the reason on stderr, with every
problem of a refused document and where it is), 2 bad usage, 3 a dry run that is denied.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8082"
EXIT_DENIED = 3


class CliError(Exception):
    """A refused or failed call; ``str`` is what the operator reads."""


def add_parsers(sub: Any) -> None:
    """Add ``policy`` and ``tags`` to ``cyphonic-nms``'s sub-commands."""

    def remote(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help=f"NMS admin API (CYPHONIC_NMS_URL, default {DEFAULT_URL})")
        p.add_argument("--token-file", type=Path, help="file with the admin bearer token")

    p = sub.add_parser("policy", help="read, replace, check the access policy (admin API)")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    q = psub.add_parser("get", help="print the policy in force")
    remote(q)
    q = psub.add_parser("set", help="replace the policy with a JSON document")
    remote(q)
    q.add_argument("file", help="the JSON document ('-' for stdin)")
    q.add_argument("--expect-revision", type=int, help="refuse if the policy changed since")
    q = psub.add_parser("delete", help="remove the policy (the NMS default applies)")
    remote(q)
    q = psub.add_parser("check", help="dry run: may A reach B on tcp/22?")
    remote(q)
    q.add_argument("source", help="FQDN of the node that starts the traffic")
    q.add_argument("destination", help="FQDN of the node it goes to")
    q.add_argument("traffic", nargs="?", default="any", help="tcp/PORT, udp/PORT, icmp or any")
    q = psub.add_parser("history", help="who changed the policy, when, and how")
    remote(q)
    q.add_argument("--limit", type=int, default=20)

    p = sub.add_parser("tags", help="a node's tags, which make its groups (admin API)")
    tsub = p.add_subparsers(dest="tags_command", required=True, metavar="ACTION")
    q = tsub.add_parser("get", help="print a node's tags")
    remote(q)
    q.add_argument("fqdn")
    q = tsub.add_parser("set", help="replace a node's tags (KEY=VALUE ...; none clears them)")
    remote(q)
    q.add_argument("fqdn")
    q.add_argument("tags", nargs="*", metavar="KEY=VALUE")


def _token(args: argparse.Namespace) -> str:
    path = args.token_file or os.environ.get("CYPHONIC_ADMIN_TOKEN_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read the token file: {exc.strerror}") from exc
    token = os.environ.get("CYPHONIC_ADMIN_TOKEN", "")
    if not token:
        raise CliError("no admin token (--token-file, CYPHONIC_ADMIN_TOKEN_FILE or _TOKEN)")
    return token


def _call(args: argparse.Namespace, method: str, path: str, **kw: Any) -> Any:
    url = (args.url or os.environ.get("CYPHONIC_NMS_URL") or DEFAULT_URL).rstrip("/")
    headers = {"Authorization": f"Bearer {_token(args)}"}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=10.0) as client:
            response = client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the NMS at {url}: {exc}") from exc
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        error = (body or {}).get("error", {}) if isinstance(body, dict) else {}
        lines = [f"{error.get('code', response.status_code)}: {error.get('message', '')}"]
        for detail in error.get("details") or ():
            where = detail.get("where") or ".".join(str(p) for p in detail.get("loc", ()))
            lines.append(f"  {where}: {detail.get('msg', '')}")
        raise CliError("\n".join(lines))
    return body


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def run(args: argparse.Namespace) -> int:
    """Run a ``policy`` or ``tags`` command; the exit status."""
    try:
        return _run(args)
    except CliError as exc:
        print(f"cyphonic-nms: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "tags":
        if args.tags_command == "get":
            _print(_call(args, "GET", f"/v1/nodes/{args.fqdn}/tags")["tags"])
            return 0
        tags: dict[str, str] = {}
        for item in args.tags:
            key, eq, value = item.partition("=")
            if not eq:
                print(f"cyphonic-nms: {item!r} is not KEY=VALUE", file=sys.stderr)
                return 2
            tags[key] = value
        _print(_call(args, "PUT", f"/v1/nodes/{args.fqdn}/tags", json={"tags": tags})["tags"])
        return 0
    action = args.policy_command
    if action == "get":
        _print(_call(args, "GET", "/v1/policy"))
        return 0
    if action == "set":
        try:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        except OSError as exc:
            raise CliError(f"cannot read {args.file}: {exc.strerror}") from exc
        try:
            json.loads(text)
        except ValueError as exc:
            raise CliError(f"{args.file} is not JSON: {exc}") from exc
        params = {"expected_revision": args.expect_revision} if args.expect_revision else {}
        result = _call(
            args,
            "PUT",
            "/v1/policy",
            content=text.encode(),
            params=params,
            headers={"Content-Type": "application/json"},
        )
        print(f"policy revision {result['revision']} in force")
        return 0
    if action == "delete":
        result = _call(args, "DELETE", "/v1/policy")
        print(f"policy removed (revision {result['revision']}): {result['in_force']}")
        return 0
    if action == "check":
        params = {"from": args.source, "to": args.destination, "traffic": args.traffic}
        result = _call(args, "GET", "/v1/policy/check", params=params)
        verdict = "allowed" if result["allowed"] else "denied"
        print(
            f"{result['source']} -> {result['destination']} {result['traffic']}: {verdict}"
            f" ({result['reason']}; revision {result['revision']})"
        )
        return 0 if result["allowed"] else EXIT_DENIED
    if action == "history":
        _print(_call(args, "GET", "/v1/policy/history", params={"limit": args.limit}))
        return 0
    raise AssertionError(action)
