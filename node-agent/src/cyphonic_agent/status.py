"""The agent's local status API: a unix socket only root (the agent's user) can reach.

Protocol flow (one exchange per connection, UTF-8 JSON lines)::

    client -> server   {"version": 1, "request": "status"}\\n
    server -> client   {"version": 1, "status": {...AgentStatus...}}\\n   (then closes)
                   or  {"version": 1, "error": {"code": "<code_name>", "message": "..."}}\\n

Other request kinds (``"ping"``, ``"netinfo"``...) are answered by handlers the agent
registers (``StatusServer(handlers=...)``), same envelope::

    client -> server   {"version": 1, "request": "ping", ...arguments}\\n
    server -> client   {"version": 1, "result": {...}}\\n   or the error above

The socket is created 0600 (umask at bind time, so there is no window) inside a 0700
directory, and the server also checks the caller's uid with SO_PEERCRED. ``cyphonic-agent
status`` is the client: a human table by default, ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import stat
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cyphonic.errors import (
    AlreadyExists,
    CyphonicError,
    InternalError,
    InvalidArgument,
    MalformedMessage,
    PermissionDenied,
    RemoteError,
    Unavailable,
    UnsupportedVersion,
)
from cyphonic.hostport import format_host_port
from cyphonic.log import get_logger
from cyphonic.v1 import signalling_pb2 as pb

from cyphonic_agent.mobility import Handover
from cyphonic_agent.routes import PeerRoute, RouteState, address_text

STATUS_API_VERSION = 1
DEFAULT_STATUS_SOCKET = Path("/run/cyphonic-agent/status.sock")
STATUS_SOCKET_ENV = "CYPHONIC_STATUS_SOCKET"
MAX_REQUEST = 4096


@dataclass(slots=True)
class PeerStatus:
    """One peer of this node, as ``cyphonic-agent status`` shows it."""

    fqdn: str
    virtual_ipv4: str | None = None
    virtual_ipv6: str | None = None
    state: str = "establishing"
    """establishing, up or down."""
    pattern: str = "-"
    """direct (pattern 1), nat_connects (2), relay (3), or - before the NMS decided."""
    path: str = "-"
    """Real address in use, e.g. ``[2001:db8::7]:443`` or ``via 198.51.100.9:443 (trs)``."""
    transport: str = "udp"
    """What carries the QUIC packets: ``udp`` (a TCP 443 / HTTPS-proxy transport says
    ``tcp`` or ``proxy``)."""
    direct: bool | None = None
    """True: straight to the peer; False: through the TRS named in ``via``; None: no tunnel."""
    via: str | None = None
    """The TRS carrying a relayed tunnel (``198.51.100.9:443 (trs)``)."""
    reason_code: str = ""
    reason: str = ""
    """Why the path is what it is, in words: the NMS's reason for the pattern
    (``cyphonic_nms.route_reason``), or what happened since (hole punching)."""
    route_reason_code: str = ""
    """The NMS's reason code for the pattern (``reason_code`` may say what came after)."""
    punch: str | None = None
    """Hole punching of a relayed route: probing, direct, gave_up, relayed (fell back), or
    None when the NMS asked for none."""
    direct_after_ms: float | None = None
    """Time from the relayed tunnel being up to the direct path (hole punching)."""
    rtt_ms: float | None = None
    """Smoothed RTT of the end-to-end QUIC connection."""
    mtu: int | None = None
    """Largest inner packet this tunnel carries."""
    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    rx_packets: int = 0


@dataclass(slots=True)
class AgentStatus:
    """A snapshot of the agent."""

    fqdn: str
    virtual_ipv4: str | None = None
    virtual_ipv6: str | None = None
    nms_state: str = "disconnected"
    """connecting, connected, or disconnected (with ``nms_detail`` saying why)."""
    nms_detail: str = ""
    tun: str | None = None
    mtu: int | None = None
    uptime_s: float = 0.0
    peers: list[PeerStatus] = field(default_factory=list)
    handovers: int = 0
    """Moves of this host (real address or default route changed) since the agent started."""
    last_handover: dict[str, Any] | None = None
    """The last move: ``at`` (ISO 8601 UTC), ``old`` and ``new`` paths (``addresses``,
    ``default_routes``), ``nms_network`` (what the NMS saw after it)."""
    policy: dict[str, Any] | None = None
    """The access-policy filter in force (``cyphonic_agent.access``): ``revision``, ``mode``
    (allow_all or filter), ``entries``, ``flows`` opened by this node, ``passed`` and
    ``dropped`` packets by reason."""
    split_dns: dict[str, Any] | None = None
    """The overlay domain in the host's resolver (``cyphonic_agent.splitdns``): ``manager``
    (resolved, resolv.conf or None) and ``detail``."""
    transport: dict[str, Any] | None = None
    """What carries QUIC to the services (docs/tcp-transport.md): ``carrier`` (udp, tcp
    or proxy), ``udp_blocked_since``, ``proxy``, open ``streams``, ``udp_probes``,
    ``moves_to_udp``."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (what ``--json`` prints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentStatus:
        """Rebuild from ``to_dict`` output; unknown keys (a newer agent) are ignored."""
        try:
            peers = [
                PeerStatus(**{k: v for k, v in p.items() if k in PeerStatus.__dataclass_fields__})
                for p in data.get("peers", [])
            ]
            fields = {
                k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "peers"
            }
            return cls(peers=peers, **fields)
        except (TypeError, AttributeError) as exc:
            raise MalformedMessage(f"status snapshot malformed: {exc}") from exc


# --- building a snapshot from the agent's parts ----------------------------------------------


class ShowsStatus(Protocol):
    """A data-path tunnel as the status needs it (``datapath.Tunnel``)."""

    def status(self) -> PeerStatus: ...


class HoldsTunnel(Protocol):
    """What a route holds while UP (``peers.LiveTunnel``)."""

    @property
    def tunnel(self) -> ShowsStatus: ...


L = TypeVar("L", bound=HoldsTunnel)


@dataclass(frozen=True, slots=True)
class PathFacts:
    """What the glue knows of a live relayed tunnel's path now (``peers.LiveTunnel``)."""

    direct_now: bool
    """The connection left the TRS for the peer's address (hole punching)."""
    punch: str | None = None
    direct_after_ms: float | None = None
    transport: str = "udp"
    """What carries the connection's packets now: ``udp``, ``tcp`` or ``proxy`` (a relayed
    tunnel of a node whose UDP 443 is blocked goes to the TRS over TLS on TCP 443)."""


def peer_rows(
    routes: Iterable[PeerRoute[L]],
    *,
    relayed_label: Callable[[str], str | None],
    path_facts: Callable[[L], PathFacts | None] | None = None,
) -> list[PeerStatus]:
    """One row per route, by FQDN: a live tunnel's own row (its path replaced by the TRS's
    label when ``relayed_label(route_id)`` names one and the connection still goes through
    it), else an "establishing" row; each with why (``explain_row``)."""
    rows: list[PeerStatus] = []
    for route in sorted(routes, key=lambda r: r.fqdn):
        live = route.tunnel
        if route.state is RouteState.UP and live is not None:
            row = live.tunnel.status()
            facts = path_facts(live) if path_facts is not None else None
            label = relayed_label(route.route_id)
            explain_row(row, route, label=label, facts=facts)
            rows.append(row)
            continue
        v4, v6 = _first_of_each(route.addresses)
        rows.append(
            PeerStatus(
                fqdn=route.fqdn,
                state="establishing",
                pattern=route.pattern_name,
                virtual_ipv4=v4,
                virtual_ipv6=v6,
                reason_code=route.reason_code,
                reason=route.reason,
                route_reason_code=route.reason_code,
            )
        )
    return rows


def explain_row(
    row: PeerStatus, route: PeerRoute[Any], *, label: str | None, facts: PathFacts | None
) -> None:
    """Fill ``row``'s path columns: direct or via which TRS, and why in words."""
    row.reason_code, row.reason = route.reason_code, route.reason
    row.route_reason_code = route.reason_code
    if facts is not None:
        row.transport = facts.transport
        row.punch = facts.punch
        row.direct_after_ms = facts.direct_after_ms
    if label is not None and not (facts is not None and facts.direct_now):
        row.path = label  # "via <TRS address> (<TRS name>)"
        row.direct = False
        row.via = label.removeprefix("via ")
        if facts is not None and facts.punch == "gave_up":
            row.reason_code = "punch_failed"
            row.reason = "hole punching found no direct path: relayed through the TRS"
        elif facts is not None and facts.punch == "relayed":
            row.reason_code = "direct_path_lost"
            row.reason = "the direct path stopped answering: back on the TRS"
        return
    row.direct = True
    if facts is not None and facts.direct_now:
        row.reason_code = "hole_punched"
        after = (
            f" ({facts.direct_after_ms:.0f} ms after the relay)" if facts.direct_after_ms else ""
        )
        row.reason = f"direct after hole punching{after}"


def handover_status(
    handover: Handover | None, network: pb.NetworkInfo | None
) -> dict[str, Any] | None:
    """``AgentStatus.last_handover``: the last move, and what the NMS saw after it."""
    if handover is None:
        return None
    at = datetime.fromtimestamp(handover.at, UTC).isoformat(timespec="milliseconds")
    out: dict[str, Any] = {
        "at": at,
        "old": handover.old.describe(),
        "new": handover.new.describe(),
    }
    if network is not None:
        out["nms_network"] = network_status(network)
    return out


def network_status(network: pb.NetworkInfo) -> dict[str, Any]:
    """What the NMS saw of this node at its last registration, JSON-ready."""
    return {
        "behind_nat": network.behind_nat,
        "has_ipv4": network.has_ipv4,
        "has_ipv6": network.has_ipv6,
        "observed": [
            format_host_port(address_text(e.ip), e.port)
            for e in (network.observed_ipv4, network.observed_ipv6)
            if e.ip
        ],
    }


def registered_addresses(reg: pb.RegisterResponse | None) -> tuple[str | None, str | None]:
    """This node's virtual IPv4 and IPv6 address as text, from its registration."""
    if reg is None:
        return None, None
    v4 = address_text(reg.virtual_ipv4) if reg.virtual_ipv4 else None
    v6 = address_text(reg.virtual_ipv6) if reg.virtual_ipv6 else None
    return v4, v6


def _first_of_each(addresses: Iterable[bytes]) -> tuple[str | None, str | None]:
    v4 = [a for a in addresses if len(a) == 4]
    v6 = [a for a in addresses if len(a) == 16]
    return (address_text(v4[0]) if v4 else None, address_text(v6[0]) if v6 else None)


SnapshotFn = Callable[[], AgentStatus]
RequestHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
"""Answers one request kind: the request object in, the ``result`` object out (raises a
``CyphonicError`` to refuse)."""


def default_socket_path() -> Path:
    """``$CYPHONIC_STATUS_SOCKET`` or /run/cyphonic-agent/status.sock."""
    return Path(os.environ.get(STATUS_SOCKET_ENV, str(DEFAULT_STATUS_SOCKET)))


# --- server --------------------------------------------------------------------------------


class StatusServer:
    """Serves ``snapshot()`` on a root-only unix socket."""

    def __init__(
        self,
        *,
        path: Path,
        snapshot: SnapshotFn,
        handlers: Mapping[str, RequestHandler] | None = None,
    ) -> None:
        self.path = path
        self.snapshot = snapshot
        self.handlers = dict(handlers or {})
        self._server: asyncio.Server | None = None
        self._log = get_logger("agent.status", socket=str(path))

    @classmethod
    async def start(
        cls,
        *,
        path: Path,
        snapshot: SnapshotFn,
        handlers: Mapping[str, RequestHandler] | None = None,
    ) -> StatusServer:
        """Create the directory (0700) and socket (0600) and start serving."""
        server = cls(path=path, snapshot=snapshot, handlers=handlers)
        await server._listen()
        return server

    async def _listen(self) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
        if info.st_uid != os.geteuid():
            raise PermissionDenied(f"{directory} belongs to uid {info.st_uid}, not to us")
        if stat.S_IMODE(info.st_mode) != 0o700:
            directory.chmod(0o700)
        if self.path.exists() or self.path.is_symlink():
            if _socket_answers(self.path):
                raise AlreadyExists(f"another agent serves {self.path}")
            self.path.unlink()  # stale, from an agent that did not exit cleanly
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old_umask)
        self.path.chmod(0o600)
        self._log.info("status api listening")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._reply(reader, writer)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _reply(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, Any]:
        try:
            # Read the (bounded) request first even from a caller about to be refused, so
            # the refusal is an answer it can read rather than a reset.
            async with asyncio.timeout(5):
                line = await reader.readuntil(b"\n")
            uid = _peer_uid(writer.get_extra_info("socket"))
            if uid not in (0, os.geteuid()):
                raise PermissionDenied("the status API is for root only")
            try:
                request = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise MalformedMessage("request is not JSON") from exc
            if not isinstance(request, dict):
                raise MalformedMessage("request must be a JSON object")
            if request.get("version") != STATUS_API_VERSION:
                raise UnsupportedVersion(f"status API version {request.get('version')!r}")
            kind = request.get("request")
            if kind == "status":
                return {"version": STATUS_API_VERSION, "status": self.snapshot().to_dict()}
            handler = self.handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise InvalidArgument(f"unknown request {kind!r}")
            try:
                result = await handler(request)
            except CyphonicError:
                raise
            except Exception as exc:  # a bug in a handler: an answer, not a hang-up
                self._log.exception("status_request_failed", request=kind)
                raise InternalError(f"{kind} failed: {exc!r}") from exc
            return {"version": STATUS_API_VERSION, "result": result}
        except asyncio.LimitOverrunError:
            return _error(MalformedMessage("request too long"))
        except asyncio.IncompleteReadError:
            return _error(MalformedMessage("request not terminated by a newline"))
        except CyphonicError as exc:
            return _error(exc)

    async def close(self) -> None:
        """Stop serving and remove the socket file."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _error(exc: CyphonicError) -> dict[str, Any]:
    return {
        "version": STATUS_API_VERSION,
        "error": {"code": exc.code_name, "message": exc.message},
    }


def _peer_uid(sock: socket.socket | None) -> int:
    if sock is None:
        raise PermissionDenied("cannot identify the caller")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


# --- client --------------------------------------------------------------------------------


def fetch_status(path: Path | None = None, *, timeout: float = 5.0) -> AgentStatus:
    """Ask the running agent for its status (synchronous; for the CLI)."""
    reply = _exchange(path, {"request": "status"}, timeout=timeout)
    if "error" in reply:
        error = reply["error"]
        raise Unavailable(f"the agent refused: {error.get('code')}: {error.get('message')}")
    return AgentStatus.from_dict(reply.get("status", {}))


def ask_agent(
    request: str, path: Path | None = None, *, timeout: float = 5.0, **arguments: Any
) -> dict[str, Any]:
    """One request of another kind (``ping``...) to the running agent: its ``result``.

    A refusal is raised as ``RemoteError`` with the agent's error code."""
    reply = _exchange(path, {"request": request, **arguments}, timeout=timeout)
    if "error" in reply:
        error = reply["error"] if isinstance(reply["error"], dict) else {}
        code = str(error.get("code", "internal"))
        try:
            number = pb.ErrorCode.Value("ERROR_CODE_" + code.upper())
        except ValueError:
            number = pb.ERROR_CODE_INTERNAL
        raise RemoteError(number, str(error.get("message", "")))
    result = reply.get("result")
    if not isinstance(result, dict):
        raise MalformedMessage("the agent's answer has no result")
    return result


def _exchange(path: Path | None, request: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    path = path or default_socket_path()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except FileNotFoundError as exc:
            raise Unavailable(f"the agent is not running (no socket at {path})") from exc
        except PermissionError as exc:
            raise PermissionDenied(f"{path}: permission denied (run as root)") from exc
        except ConnectionRefusedError as exc:
            raise Unavailable(f"the agent is not running (stale socket {path})") from exc
        except OSError as exc:
            raise Unavailable(f"cannot reach the agent at {path}: {exc}") from exc
        request = {"version": STATUS_API_VERSION, **request}
        try:
            s.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError as exc:
            raise Unavailable(f"the agent did not answer within {timeout} s") from exc
        except OSError as exc:
            raise Unavailable(f"status request failed: {exc}") from exc
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise MalformedMessage("the agent's answer is not JSON") from exc
    if not isinstance(reply, dict):
        raise MalformedMessage("the agent's answer is not a JSON object")
    return reply


def format_status(status: AgentStatus) -> str:
    """The human form of a snapshot: a header block and one table row per peer."""
    addresses = ", ".join(a for a in (status.virtual_ipv4, status.virtual_ipv6) if a) or "-"
    nms = status.nms_state + (f" ({status.nms_detail})" if status.nms_detail else "")
    tun = f"{status.tun} mtu {status.mtu}" if status.tun else "-"
    lines = [
        f"node       {status.fqdn}",
        f"addresses  {addresses}",
        f"nms        {nms}",
        f"tun        {tun}",
        f"uptime     {_duration(status.uptime_s)}",
    ]
    if status.last_handover:
        h = status.last_handover
        old = ", ".join(h.get("old", {}).get("addresses", [])) or "-"
        new = ", ".join(h.get("new", {}).get("addresses", [])) or "-"
        lines.append(f"moved      {h.get('at', '?')} ({status.handovers} moves): {old} -> {new}")
    if status.policy:
        pol = status.policy
        dropped = pol.get("dropped", {})
        total = sum(dropped.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()) if v)
        rev = pol.get("revision")
        lines.append(
            f"policy     {'revision ' + str(rev) if rev is not None else 'none received'}, "
            f"{pol.get('mode')} ({pol.get('entries', 0)} entries, {pol.get('flows', 0)} flows); "
            f"dropped {total}" + (f" ({detail})" if detail else "")
        )
    if status.split_dns:
        lines.append(f"dns        {status.split_dns.get('detail', '-')}")
    if status.transport and status.transport.get("carrier") not in (None, "udp"):
        t = status.transport
        via = f" via proxy {t['proxy']}" if t.get("proxy") else ""
        lines.append(
            f"transport  {t['carrier']} 443{via} (UDP 443 blocked since "
            f"{t.get('udp_blocked_since') or '?'})"
        )
    lines.append("")
    if not status.peers:
        lines.append("no peers")
        return "\n".join(lines)
    header = ("PEER", "STATE", "PATTERN", "TRANSPORT", "PATH", "RTT", "TX", "RX", "WHY")
    rows = [header]
    for p in sorted(status.peers, key=lambda p: p.fqdn):
        rows.append(
            (
                p.fqdn,
                p.state,
                p.pattern,
                p.transport,
                p.path,
                f"{p.rtt_ms:.2f} ms" if p.rtt_ms is not None else "-",
                f"{_bytes(p.tx_bytes)} / {p.tx_packets} pkt",
                f"{_bytes(p.rx_bytes)} / {p.rx_packets} pkt",
                p.reason or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# --- command line --------------------------------------------------------------------------


def add_status_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``status`` to the ``cyphonic-agent`` subcommands; it runs ``run_status``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="show the running agent's peers, paths and counters",
        description="Ask the running agent over its local unix socket (root only).",
    )
    parser.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    parser.add_argument(
        "--socket",
        type=Path,
        default=None,
        help=f"status socket (default ${STATUS_SOCKET_ENV} or {DEFAULT_STATUS_SOCKET})",
    )
    parser.set_defaults(func=run_status)
    return parser


def run_status(args: argparse.Namespace) -> int:
    """``cyphonic-agent status``: 0 on success, 1 if the agent cannot be asked."""
    try:
        status = fetch_status(args.socket)
    except CyphonicError as exc:
        print(f"cyphonic-agent status: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status.to_dict(), indent=2))
    else:
        print(format_status(status))
    return 0
