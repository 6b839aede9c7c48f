"""``cyphonic-agent ping NAME``: probes through the overlay, and which way each one went.

    cyphonic-agent ping bob            (bob.<domain>, or a full name, or a virtual address)
    pong from bob.cyphonic.internal (100.64.0.2) seq 1: 0.84 ms direct [2001:db8::7]:443 udp
    pong from carol.cyphonic.internal (100.64.0.3) seq 1: 1.91 ms via TRS 192.0.2.9:443 (trs) udp

Protocol flow (one probe per exchange on the status socket, ``status.StatusServer``)::

    CLI   -> agent   {"version": 1, "request": "ping", "peer": "bob", "seq": 1, "timeout_s": 5}
    agent            name -> FQDN -> Peers.lookup (asks the NMS, sets the route up if needed)
                     ICMP echo from this node's virtual address to the peer's: through the
                     TUN, the tunnel (direct or relayed) and the peer's kernel, and back
    agent -> CLI     {"version": 1, "result": {"reply": true, "rtt_ms": ..., "pattern": ...,
                      "path": ..., "via_trs": ..., "transport": ..., "quic_rtt_ms": ...}}

The probe is an ICMP echo, so its RTT is what applications see (both agents and both TUN
devices included); ``quic_rtt_ms`` is the tunnel connection's own smoothed RTT. The first
probe to a peer with no tunnel yet includes the route set-up. A peer whose access policy
drops ICMP, or that is gone, gives no reply: the CLI exits 1 when no probe was answered.

The ICMP echo format (``echo_request``, ``echo_reply_matches``) is pure; ``Pinger`` is the
agent side, ``run_ping`` the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import secrets
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from cyphonic.errors import (
    CyphonicError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)

from cyphonic_agent.dns import PeerAddresses
from cyphonic_agent.status import (
    DEFAULT_STATUS_SOCKET,
    STATUS_SOCKET_ENV,
    AgentStatus,
    PeerStatus,
    ask_agent,
)

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
PING_PAYLOAD = b"cyphonic-agent ping"
MAX_PING_TIMEOUT_S = 30.0
MAX_NAME = 253

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- ICMP echo (pure) ----------------------------------------------------------------------
#
#   +--------+--------+-----------------+
#   |  type  | code 0 |    checksum     |   type 8/0 (ICMPv4), 128/129 (ICMPv6)
#   +--------+--------+-----------------+
#   |   identifier    |    sequence     |
#   +-----------------+-----------------+
#   | payload...


def echo_request(*, version: int, ident: int, seq: int, payload: bytes = PING_PAYLOAD) -> bytes:
    """An ICMP (``version`` 4) or ICMPv6 (6) echo request. The ICMPv6 checksum is left 0:
    the kernel fills it in on a raw ICMPv6 socket (it covers the pseudo-header)."""
    kind = ICMP_ECHO_REQUEST if version == 4 else ICMPV6_ECHO_REQUEST
    header = struct.pack("!BBHHH", kind, 0, 0, ident & 0xFFFF, seq & 0xFFFF)
    if version == 6:
        return header + payload
    from cyphonic_agent.packet import internet_checksum

    checksum = internet_checksum(header + payload)
    return header[:2] + struct.pack("!H", checksum) + header[4:] + payload


def echo_reply_matches(data: bytes, *, version: int, ident: int, seq: int) -> bool:
    """Whether ``data`` (as a raw socket returns it: with the IPv4 header, without the IPv6
    one) is the echo reply to (``ident``, ``seq``)."""
    if version == 4:
        if len(data) < 20 or data[0] >> 4 != 4:
            return False
        data = data[(data[0] & 0x0F) * 4 :]
    if len(data) < 8:
        return False
    kind, _code, _sum, got_ident, got_seq = struct.unpack_from("!BBHHH", data)
    expected = ICMP_ECHO_REPLY if version == 4 else ICMPV6_ECHO_REPLY
    return bool(kind == expected and got_ident == ident & 0xFFFF and got_seq == seq & 0xFFFF)


def fqdn_for(name: str, *, domain: str) -> str:
    """``bob`` -> ``bob.<domain>``; a name with a dot is taken as it is."""
    name = name.strip().lower().rstrip(".")
    if not name or len(name) > MAX_NAME:
        raise InvalidArgument("ping: a node name of 1-253 characters")
    return name if "." in name else f"{name}.{domain}"


@dataclass(slots=True)
class Probe:
    """One probe's outcome, as ``--json`` prints it."""

    seq: int
    peer: str
    address: str
    reply: bool
    rtt_ms: float | None = None
    pattern: str = "-"
    path: str = "-"
    """The real address the tunnel uses, or ``via <TRS address> (<TRS name>)``."""
    direct: bool = False
    via_trs: str | None = None
    """The TRS that relays this tunnel (``address (name)``), None when direct."""
    transport: str = "udp"
    """What carries the tunnel's QUIC packets (udp; tcp for the TCP 443 fallback)."""
    quic_rtt_ms: float | None = None
    state: str = "-"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_path(row: PeerStatus | None) -> dict[str, Any]:
    """The path fields of a probe from the peer's status row."""
    if row is None:
        return {}
    path = row.path
    via = path[len("via ") :] if path.startswith("via ") else None
    transport = getattr(row, "transport", None) or "udp"
    return {
        "pattern": row.pattern,
        "path": path,
        "via_trs": via,
        "direct": via is None and row.state == "up",
        "transport": transport,
        "quic_rtt_ms": row.rtt_ms,
        "state": row.state,
    }


def format_probe(probe: Probe) -> str:
    """One line per probe, as ``ping`` prints it."""
    who = f"{probe.peer} ({probe.address})"
    if not probe.reply:
        return f"no reply from {who} seq {probe.seq}"
    rtt = f"{probe.rtt_ms:.2f} ms" if probe.rtt_ms is not None else "?"
    if probe.via_trs:
        way = f"via TRS {probe.via_trs}"
    elif probe.direct:
        way = f"direct {probe.path}"
    else:
        way = probe.path
    return f"pong from {who} seq {probe.seq}: {rtt} {way} {probe.transport} ({probe.pattern})"


# --- the agent side ------------------------------------------------------------------------


class PeerLookup(Protocol):
    """What the pinger needs of ``peers.Peers``."""

    async def lookup(self, fqdn: str) -> PeerAddresses | None: ...


class Pinger:
    """Answers ``ping`` requests on the status socket (``handle``)."""

    def __init__(
        self,
        *,
        peers: PeerLookup,
        domain: str,
        snapshot: Callable[[], AgentStatus],
        fqdn_of: Callable[[IPAddress], Awaitable[str | None]],
    ) -> None:
        self.peers = peers
        self.domain = domain
        self.snapshot = snapshot
        self.fqdn_of = fqdn_of

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One probe: ``peer`` (name or virtual address), ``seq``, ``timeout_s``."""
        name = request.get("peer")
        seq = request.get("seq", 1)
        timeout = request.get("timeout_s", 5.0)
        if not isinstance(name, str) or not isinstance(seq, int) or isinstance(seq, bool):
            raise InvalidArgument("ping needs a peer name and an integer seq")
        if not isinstance(timeout, int | float) or not 0 < timeout <= MAX_PING_TIMEOUT_S:
            raise InvalidArgument(f"ping timeout must be in (0, {MAX_PING_TIMEOUT_S:g}] s")
        deadline = time.monotonic() + float(timeout)
        fqdn, address = await self._target(name)
        probe = Probe(seq=seq, peer=fqdn, address=str(address), reply=False)
        remaining = max(0.05, deadline - time.monotonic())
        rtt = await self._echo(address, seq=seq, wait_s=remaining)
        if rtt is not None:
            probe.reply, probe.rtt_ms = True, round(rtt * 1000, 3)
        rows = {p.fqdn: p for p in self.snapshot().peers}
        for key, value in describe_path(rows.get(fqdn)).items():
            setattr(probe, key, value)
        return probe.to_dict()

    async def _target(self, name: str) -> tuple[str, IPAddress]:
        try:
            literal: IPAddress | None = ipaddress.ip_address(name.strip())
        except ValueError:
            literal = None
        if literal is not None:
            fqdn = await self.fqdn_of(literal)
            if fqdn is None:
                raise NotFound(f"no node has the virtual address {literal}")
            return fqdn, literal
        fqdn = fqdn_for(name, domain=self.domain)
        addresses = await self.peers.lookup(fqdn)
        if addresses is None or (addresses.ipv4 is None and addresses.ipv6 is None):
            raise NotFound(f"no node {fqdn}")
        address: IPAddress = addresses.ipv4 if addresses.ipv4 is not None else addresses.ipv6  # type: ignore[assignment]
        return fqdn, address

    async def _echo(self, address: IPAddress, *, seq: int, wait_s: float) -> float | None:
        """Send one echo request and wait for its reply; the RTT in seconds or None."""
        version = address.version
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        proto = socket.IPPROTO_ICMP if version == 4 else socket.IPPROTO_ICMPV6
        loop = asyncio.get_running_loop()
        ident = secrets.randbits(16)  # concurrent pings to one peer must not share replies
        try:
            sock = socket.socket(family, socket.SOCK_RAW, proto)
        except OSError as exc:
            raise PermissionDenied(
                f"cannot open an ICMP socket ({exc.strerror}): the agent needs CAP_NET_RAW"
            ) from exc
        with sock:
            sock.setblocking(False)
            packet = echo_request(version=version, ident=ident, seq=seq)
            started = time.monotonic()
            try:
                await loop.sock_sendto(sock, packet, (str(address), 0))
            except OSError as exc:
                raise Unavailable(f"cannot send to {address}: {exc.strerror}") from exc
            try:
                async with asyncio.timeout(wait_s):
                    while True:
                        data, source = await loop.sock_recvfrom(sock, 65535)
                        if ipaddress.ip_address(source[0].split("%")[0]) != address:
                            continue
                        if echo_reply_matches(data, version=version, ident=ident, seq=seq):
                            return time.monotonic() - started
            except TimeoutError:
                return None


# --- command line --------------------------------------------------------------------------


def add_ping_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``ping`` to the ``cyphonic-agent`` subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "ping",
        help="probe a peer through the overlay: RTT, direct or via which TRS, transport",
        description="Ask the running agent (its status socket, root only) to send ICMP "
        "echo probes to NAME through the overlay; one line per probe. Exit 1 when no probe "
        "was answered.",
    )
    parser.add_argument("name", help="peer: bob, bob.<domain> or a virtual address")
    parser.add_argument("-c", "--count", type=int, default=4, help="probes (default 4)")
    parser.add_argument(
        "-i", "--interval", type=float, default=1.0, help="seconds between probes (default 1)"
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for each reply (default 5)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per probe")
    parser.add_argument(
        "--socket",
        type=Path,
        default=None,
        help=f"status socket (default ${STATUS_SOCKET_ENV} or {DEFAULT_STATUS_SOCKET})",
    )
    return parser


def run_ping(args: argparse.Namespace) -> int:
    """``cyphonic-agent ping``: 0 if any probe was answered, 1 otherwise."""
    if args.count < 1 or not 0 < args.timeout <= MAX_PING_TIMEOUT_S or args.interval < 0:
        print("cyphonic-agent ping: bad --count, --timeout or --interval", file=sys.stderr)
        return 2
    answered = 0
    for seq in range(1, args.count + 1):
        try:
            result = ask_agent(
                "ping",
                args.socket,
                timeout=args.timeout + 20.0,  # a first probe may wait for the route
                peer=args.name,
                seq=seq,
                timeout_s=args.timeout,
            )
        except CyphonicError as exc:
            print(f"cyphonic-agent ping: {exc.code_name}: {exc.message}", file=sys.stderr)
            return 1
        probe = Probe(**{k: v for k, v in result.items() if k in Probe.__dataclass_fields__})
        answered += probe.reply
        print(json.dumps(probe.to_dict()) if args.json else format_probe(probe), flush=True)
        if seq < args.count and args.interval:
            time.sleep(args.interval)
    return 0 if answered else 1
