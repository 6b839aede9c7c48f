"""``cyphonic-agent netcheck``: what this network lets the agent do.

    cyphonic-agent netcheck [--state-dir D] [--trs HOST:PORT[=NAME]] [--timeout 3] [--json]

    node     alice.cyphonic.internal (agent running, socket [::]:443)
    ipv4     route yes  udp/443 blocked  tcp/443 reachable
    ipv6     no route
    nat      behind NAT (port-preserving, 443 -> 443); whether the mapping depends on ...
    SERVICE  ENDPOINT                UDP 443              TCP 443            PATH MTU
    as       192.0.2.10:443          blocked (no answer)  closed (refused)   1500 (tunnel 1442)
    as       [2001:db8:100::10]:443  no route             no route           -
    nms      192.0.2.11:443          blocked (no answer)  closed (refused)   1500 (tunnel 1442)

Where the services are: the AS endpoints of ``agent.json`` (written by ``enroll``); the NMS
endpoints and the TRS replicas from the running agent (its status socket, request
``netinfo``: what its Login answered and which TRS its routes use), or, with no agent
running, from a Login at the AS made here; ``--trs`` adds TRS endpoints by hand.

Per endpoint, from a fresh ephemeral socket (the agent keeps its own):

- UDP 443: a mutual-TLS QUIC handshake (ALPN ``cyphonic-sig/1``, the service's name
  checked), so "ok" means the whole signalling path works; a TLS refusal still proves the
  port answers ("answered"); silence is "no answer" (blocked, or nothing there).
- TCP 443: a TCP connect to port 443 of the same address, then TLS with the node's
  certificate: "ok" (TLS done), "open" (TCP accepted, TLS failed: named), "closed"
  (refused: the path is open but nothing listens), "blocked" (no answer), "no route".
- Path MTU: what the kernel reports for the destination (``IP_MTU``/``IPV6_MTU`` of a
  connected UDP socket: the route's MTU, or a smaller one learnt from ICMP), and the largest
  tunnel packet that fits (58 bytes of UDP/IPv4 + QUIC overhead, 78 with IPv6).
- NAT: what the NMS saw at the agent's last registration (``NetworkInfo``: behind NAT,
  observed address:port) against the agent's own socket. The NMS is the only service that
  reports an observed address, so whether the mapping depends on the destination cannot
  be told from one observer; netcheck says so rather than guess.

The decisions (``tcp_state``, ``nat_report``, ``family_summary``, ``format_report``) are
pure; ``run_netcheck`` does the probing.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import json
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import (
    AuthError,
    CyphonicError,
    InvalidArgument,
    Timeout,
)
from cyphonic.hostport import format_host_port, parse_host_port

from cyphonic_agent.status import (
    DEFAULT_STATUS_SOCKET,
    STATUS_SOCKET_ENV,
    ask_agent,
)

TCP_PORT = 443
IP_MTU = 14
"""``IP_MTU`` (linux/in.h): the known path MTU of a connected socket."""
IPV6_MTU = 24
"""``IPV6_MTU`` (linux/in6.h)."""
TUNNEL_OVERHEAD = {4: 58, 6: 78}
"""Bytes a tunnel packet adds: UDP/IP + QUIC short header, AEAD tag, DATAGRAM frame."""
DEFAULT_TIMEOUT_S = 3.0


# --- results and decisions (pure) ---------------------------------------------------------


@dataclass(slots=True)
class ProbeResult:
    """One probe of one endpoint."""

    state: str
    """ok, answered, open, closed, blocked, no route, error."""
    ms: float | None = None
    detail: str = ""


@dataclass(slots=True)
class ServiceCheck:
    """Everything probed for one service endpoint."""

    service: str
    """as, nms, or the TRS's name."""
    endpoint: str
    family: int
    server_name: str
    udp443: ProbeResult | None = None
    tcp443: ProbeResult | None = None
    path_mtu: int | None = None
    tunnel_mtu: int | None = None


@dataclass(slots=True)
class Report:
    """What ``--json`` prints."""

    node: str
    agent: str
    """``running`` or why the running agent could not be asked."""
    local: str | None = None
    services: list[ServiceCheck] = field(default_factory=list)
    ipv4: dict[str, Any] = field(default_factory=dict)
    ipv6: dict[str, Any] = field(default_factory=dict)
    nat: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tcp_state(error: BaseException | None, *, tls_error: str | None = None) -> ProbeResult:
    """Name the outcome of a TCP connect (``error`` None: connected) and TLS after it."""
    if error is None:
        if tls_error is None:
            return ProbeResult("ok", detail="TLS done")
        return ProbeResult("open", detail=f"TCP accepted, TLS failed: {tls_error}")
    if isinstance(error, ConnectionRefusedError):
        return ProbeResult("closed", detail="refused: the path is open, nothing listens")
    if isinstance(error, TimeoutError):
        return ProbeResult("blocked", detail="no answer")
    if isinstance(error, OSError) and error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return ProbeResult("no route", detail=error.strerror or "unreachable")
    return ProbeResult("error", detail=str(error))


def nat_report(network: dict[str, Any] | None, *, local: str | None) -> dict[str, Any]:
    """The NAT seen from the NMS's ``NetworkInfo`` and the agent's own socket address."""
    if network is None:
        return {
            "known": False,
            "detail": "the agent is not registered (or not running): the NMS's view of "
            "this node is unknown",
        }
    observed = list(network.get("observed", []))
    local_port = parse_host_port(local)[1] if local else None
    out: dict[str, Any] = {
        "known": True,
        "behind_nat": bool(network.get("behind_nat")),
        "observed": observed,
        "local": local,
    }
    if not network.get("behind_nat"):
        out["kind"] = "none"
        out["detail"] = "the NMS sees the address the node reports"
        return out
    v4 = [o for o in observed if not o.startswith("[")]
    observed_port = parse_host_port(v4[0])[1] if v4 else None
    if observed_port is not None and observed_port == local_port:
        out["kind"] = "port-preserving"
    elif observed_port is not None:
        out["kind"] = "port-translating"
    else:
        out["kind"] = "unknown"
    out["detail"] = (
        f"behind NAT ({out['kind']}, {local_port} -> {observed_port}); whether the mapping "
        "depends on the destination is unknown: only the NMS reports the address it sees"
    )
    out["mapping"] = "unknown"
    return out


def family_summary(checks: Sequence[ServiceCheck], *, family: int, route: bool) -> dict[str, Any]:
    """Per address family: a route out, and whether UDP/TCP 443 worked anywhere."""
    mine = [c for c in checks if c.family == family]
    udp = [c.udp443.state for c in mine if c.udp443 is not None]
    tcp = [c.tcp443.state for c in mine if c.tcp443 is not None]

    def verdict(states: list[str], good: tuple[str, ...]) -> str:
        if not states:
            return "untested"
        if any(s in good for s in states):
            return "ok"
        if "closed" in states:
            return "reachable"  # the path passes, but no service listens there
        if all(s == "no route" for s in states):
            return "no route"
        return "blocked"

    return {
        "route": route,
        "endpoints": len(mine),
        "udp443": verdict(udp, ("ok", "answered")),
        "tcp443": verdict(tcp, ("ok", "open")),
    }


def tunnel_mtu(path_mtu: int | None, family: int) -> int | None:
    """Largest inner packet a tunnel over a path of ``path_mtu`` carries in one datagram."""
    return None if path_mtu is None else path_mtu - TUNNEL_OVERHEAD[family]


def _cell(result: ProbeResult | None) -> str:
    if result is None:
        return "-"
    ms = f" {result.ms:.1f} ms" if result.ms is not None and result.state == "ok" else ""
    detail = f" ({result.detail})" if result.detail and result.state != "ok" else ""
    return f"{result.state}{ms}{detail}"


def format_report(report: Report) -> str:
    """The human form of a report."""
    local = f", socket {report.local}" if report.local else ""
    lines = [f"node     {report.node} (agent {report.agent}{local})"]
    for name, fam in (("ipv4", report.ipv4), ("ipv6", report.ipv6)):
        if not fam.get("route"):
            lines.append(f"{name}     no route")
            continue
        lines.append(
            f"{name}     route yes  udp/443 {fam.get('udp443')}  tcp/443 {fam.get('tcp443')}"
        )
    lines.append(f"nat      {report.nat.get('detail', '-')}")
    for note in report.notes:
        lines.append(f"note     {note}")
    lines.append("")
    header = ("SERVICE", "ENDPOINT", "UDP 443", "TCP 443", "PATH MTU")
    rows = [header]
    for c in report.services:
        mtu = f"{c.path_mtu} (tunnel {c.tunnel_mtu})" if c.path_mtu is not None else "-"
        rows.append((c.service, c.endpoint, _cell(c.udp443), _cell(c.tcp443), mtu))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


# --- probing (I/O) -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    service: str
    host: str
    port: int
    server_name: str

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.host).version


def expand(service: str, endpoint: str, server_name: str) -> list[Target]:
    """``host:port`` (a name is looked up, every address kept) -> targets."""
    host, port = parse_host_port(endpoint, default_port=443)
    try:
        ipaddress.ip_address(host)
        hosts = [host]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError:
            return []
        hosts = list(dict.fromkeys(str(i[4][0]) for i in infos))
    return [Target(service, h, port, server_name) for h in hosts]


def route_exists(family: int) -> bool:
    """Whether the host has a route to the public internet in ``family`` (sends nothing)."""
    probe = ("192.0.2.1", 443) if family == 4 else ("2001:db8::1", 443)
    with socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM) as s:
        try:
            s.connect(probe)
        except OSError:
            return False
    return True


def kernel_path_mtu(target: Target) -> int | None:
    """The kernel's path MTU towards ``target`` (route MTU or a learnt smaller one)."""
    family = socket.AF_INET if target.family == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((target.host, target.port))
            if target.family == 4:
                return int(s.getsockopt(socket.IPPROTO_IP, IP_MTU))
            return int(s.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU))
        except OSError:
            return None


class Prober:
    """Probes with the node's identity (its key never leaves the state directory)."""

    def __init__(self, *, state_dir: Path, timeout: float) -> None:
        from cyphonic.pki import TrustStore, load_certificates, load_identity

        from cyphonic_agent.enroll import StatePaths, read_agent_state

        self.paths = StatePaths(state_dir)
        self.state = read_agent_state(state_dir)
        try:
            self.identity = load_identity(self.paths.cert, self.paths.key)
            root = load_certificates(self.paths.root_ca)[0]
        except (OSError, ValueError, IndexError) as exc:
            raise InvalidArgument(f"{state_dir}: cannot load the node's key ({exc})") from exc
        node_ca = self.identity.chain[0] if self.identity.chain else None
        self.trust = TrustStore(root=root, node_ca=node_ca)
        self.timeout = timeout
        self.endpoints: dict[int, Any] = {}

    async def close(self) -> None:
        for ep in self.endpoints.values():
            await ep.close("netcheck done")

    async def _endpoint(self, family: int) -> Any:
        from cyphonic.quic import QuicEndpoint

        if family not in self.endpoints:
            self.endpoints[family] = await QuicEndpoint.open(
                host="0.0.0.0" if family == 4 else "::",
                port=0,
                identity=self.identity,
                trust=self.trust,
                idle_timeout=max(5.0, self.timeout * 2),
            )
        return self.endpoints[family]

    async def udp(self, target: Target) -> tuple[ProbeResult, Any]:
        """A QUIC handshake; the result and the open connection (or None)."""
        from cyphonic.session import SignallingSession

        if not _routable(target):
            return ProbeResult("no route"), None
        ep = await self._endpoint(target.family)
        started = time.monotonic()
        try:
            conn = await ep.connect(
                (target.host, target.port),
                alpn=ALPN_SIGNALLING,
                expect="service",
                expected_name=target.server_name,
                timeout=self.timeout,
                handler_factory=SignallingSession.factory(),
            )
        except Timeout:
            return ProbeResult("blocked", detail="no answer"), None
        except AuthError as exc:
            return ProbeResult("answered", detail=f"TLS refused: {exc.message}"), None
        except CyphonicError as exc:
            return ProbeResult("error", detail=exc.message), None
        return ProbeResult("ok", ms=round((time.monotonic() - started) * 1000, 2)), conn

    async def tcp(self, target: Target) -> ProbeResult:
        """TCP connect to port 443, then TLS with the node's certificate."""
        if not _routable(target):
            return ProbeResult("no route")
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(target.host, TCP_PORT)
        except (OSError, TimeoutError) as exc:
            return tcp_state(exc)
        connected = round((time.monotonic() - started) * 1000, 2)
        tls_error: str | None = None
        try:
            async with asyncio.timeout(self.timeout):
                await writer.start_tls(
                    self._tls_context(), server_hostname=target.server_name or None
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            tls_error = "no TLS answer" if isinstance(exc, TimeoutError) else str(exc)
        finally:
            writer.close()
            try:
                async with asyncio.timeout(1):
                    await writer.wait_closed()
            except (OSError, TimeoutError, ssl.SSLError):
                pass
        del reader
        result = tcp_state(None, tls_error=tls_error)
        result.ms = connected
        return result

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.paths.root_ca))
        context.load_cert_chain(str(self.paths.cert), str(self.paths.key))
        return context

    async def login_nms(self, as_targets: Sequence[Target]) -> tuple[list[str], str | None]:
        """A Login at the first AS that answers: the NMS endpoints and name it gives."""
        from cyphonic.v1 import signalling_pb2 as pb
        from cyphonic.wire.messages import expect, wrap

        from cyphonic_agent.nms import AGENT_VERSION
        from cyphonic_agent.routes import Candidate

        for target in as_targets:
            result, conn = await self.udp(target)
            if conn is None:
                continue
            try:
                answer = await conn.handler.request(
                    wrap(pb.LoginRequest(agent_version=AGENT_VERSION)), timeout=self.timeout
                )
                login = expect(answer, pb.LoginResponse)
            except CyphonicError:
                continue
            finally:
                conn.handler.close()
            del result
            return [str(Candidate.from_pb(e)) for e in login.nms], login.nms_server_name or None
        return [], None


def _routable(target: Target) -> bool:
    family = socket.AF_INET if target.family == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((target.host, target.port))
        except OSError:
            return False
    return True


def parse_trs(text: str) -> tuple[str, str]:
    """``--trs host:port[=name]`` -> (endpoint, certificate name or "" for the default)."""
    endpoint, _, name = text.partition("=")
    parse_host_port(endpoint, default_port=443)
    return endpoint, name


async def netcheck(
    *,
    state_dir: Path,
    socket_path: Path | None,
    extra_trs: Sequence[tuple[str, str]] = (),
    probe_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Report:
    """Probe every service endpoint known; the report."""
    prober = Prober(state_dir=state_dir, timeout=probe_timeout_s)
    state = prober.state
    report = Report(node=state.fqdn, agent="running")
    info: dict[str, Any] = {}
    try:
        info = await asyncio.to_thread(ask_agent, "netinfo", socket_path, timeout=5.0)
    except CyphonicError as exc:
        report.agent = f"not asked ({exc.message})"
    report.local = info.get("local")
    try:
        as_targets = [
            t for ep in state.as_endpoints for t in expand("as", ep, state.as_server_name)
        ]
        nms_eps: list[str] = list(info.get("nms", []))
        nms_name: str | None = info.get("nms_server_name")
        if not nms_eps:
            nms_eps, nms_name = await prober.login_nms(as_targets)
            if nms_eps:
                report.notes.append("NMS endpoints from a Login at the AS made by netcheck")
            else:
                report.notes.append("no NMS endpoint known (no agent, and no AS answered)")
        nms_name = nms_name or f"nms.svc.{state.domain}"
        nms_targets = [t for ep in nms_eps for t in expand("nms", ep, nms_name)]
        trs_list = [(t["endpoint"], t["name"]) for t in info.get("trs", [])] + list(extra_trs)
        default_trs = f"trs.svc.{state.domain}"
        trs_targets = [t for ep, name in trs_list for t in expand("trs", ep, name or default_trs)]
        if not trs_targets:
            report.notes.append(
                "no TRS known (the agent learns them from relayed routes; add --trs)"
            )
        targets = list(dict.fromkeys(as_targets + nms_targets + trs_targets))

        async def check(target: Target) -> ServiceCheck:
            (udp, conn), tcp = await asyncio.gather(prober.udp(target), prober.tcp(target))
            if conn is not None:
                conn.close("netcheck done")
            mtu = await asyncio.to_thread(kernel_path_mtu, target)
            return ServiceCheck(
                service=target.service,
                endpoint=format_host_port(target.host, target.port),
                family=target.family,
                server_name=target.server_name,
                udp443=udp,
                tcp443=tcp,
                path_mtu=mtu,
                tunnel_mtu=tunnel_mtu(mtu, target.family),
            )

        report.services = list(await asyncio.gather(*(check(t) for t in targets)))
    finally:
        await prober.close()
    report.ipv4 = family_summary(report.services, family=4, route=route_exists(4))
    report.ipv6 = family_summary(report.services, family=6, route=route_exists(6))
    report.nat = nat_report(info.get("network"), local=report.local)
    return report


# --- command line --------------------------------------------------------------------------


def add_netcheck_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``netcheck`` to the ``cyphonic-agent`` subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "netcheck",
        help="what this network allows: UDP/TCP 443 to each service, IPv4/IPv6, NAT, MTU",
        description="Probe the AS, NMS and TRS endpoints from a fresh socket with the "
        "node's identity (root: it reads the node key). Asks the running agent which NMS "
        "and TRS it uses and what the NMS sees of it.",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="written by enroll (default as for up)"
    )
    parser.add_argument(
        "--trs",
        action="append",
        default=[],
        metavar="HOST:PORT[=NAME]",
        help="also probe this TRS (its certificate name after =, default trs.svc.<domain>; "
        "repeatable)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds per probe (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--socket",
        type=Path,
        default=None,
        help=f"status socket (default ${STATUS_SOCKET_ENV} or {DEFAULT_STATUS_SOCKET})",
    )
    return parser


def run_netcheck(args: argparse.Namespace) -> int:
    """``cyphonic-agent netcheck``: 0 when every family with a route reaches a service over
    UDP or TCP 443, 1 otherwise."""
    from cyphonic import log

    from cyphonic_agent.config import DEFAULT_STATE_DIR

    log.configure(level="error")  # the report is the output; the probes' logs are noise
    if not 0 < args.timeout <= 60:
        print("cyphonic-agent netcheck: --timeout must be in (0, 60]", file=sys.stderr)
        return 2
    try:
        extra = [parse_trs(t) for t in args.trs]
        report = asyncio.run(
            netcheck(
                state_dir=args.state_dir or DEFAULT_STATE_DIR,
                socket_path=args.socket,
                extra_trs=extra,
                probe_timeout_s=args.timeout,
            )
        )
    except CyphonicError as exc:
        print(f"cyphonic-agent netcheck: {exc.code_name}: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    reachable = [
        f
        for f in (report.ipv4, report.ipv6)
        if f.get("route") and f.get("endpoints") and "ok" in (f.get("udp443"), f.get("tcp443"))
    ]
    return 0 if reachable else 1
