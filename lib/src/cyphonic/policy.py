"""Group access policy: who may reach whom, on which protocol and ports (sans-I/O).

One document, kept by the NMS, says which traffic may *start*; everything else is dropped::

    {"rules": [
        {"from": ["group:eng"], "to": ["group:servers"], "proto": "tcp",
         "ports": ["22", "8000-8100"]},
        {"from": ["node:ci.corp.example"], "to": ["tag:role=db"], "proto": "tcp", "ports": [5432]},
        {"from": ["*"], "to": ["group:servers"], "proto": "icmp"}
    ]}

Selectors: ``*`` (every node), ``node:FQDN``, ``group:NAME`` (a node whose ``group`` tag lists
NAME, comma-separated: ``group=eng,ops``) and ``tag:KEY=VALUE`` / ``tag:KEY`` (a node's tags are
the key/value pairs the AS records at enrolment and the NMS admin API edits). ``proto`` is
``tcp``, ``udp``, ``icmp`` (ICMP and ICMPv6) or ``any`` (the default); ``ports`` (tcp/udp only)
lists ports and ranges, absent meaning all. Rules only allow; there is no deny rule, so the
order of rules never matters. Without a document the NMS applies its default (``ALLOW_ALL``, or
``DENY_ALL`` when the operator starts deny-by-default).

Pieces, each pure (time passed in, no I/O):

- ``parse_policy(document) -> Policy`` validates; ``PolicyInvalid`` lists every problem with its
  place (``rules[1].ports[0]``).
- ``can(policy, a, b, proto, port)`` is the dry run; ``reachable(policy, a, b)`` says whether a
  route from ``a`` to ``b`` may exist at all.
- ``compile_filter(policy, node, peers)`` gives the node's ``CompiledFilter``: for each rule
  naming the node as destination, the peers' virtual addresses that may start traffic to it.
  ``filter_to_pb`` / ``filter_from_pb`` carry it in ``PolicyFilter`` on the signalling wire.
- ``PacketFilter`` is the agent's stateful filter over a ``CompiledFilter``: a packet arriving
  from a tunnel passes when a rule allows it or when it belongs to a flow this node opened
  (``outbound`` records those, with idle expiry and a bounded table).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from cyphonic.errors import InvalidArgument, MalformedMessage
from cyphonic.v1 import signalling_pb2 as pb

MAX_RULES: Final = 1000
MAX_SELECTORS: Final = 256
MAX_PORT_RANGES: Final = 64
MAX_DESCRIPTION: Final = 200
MAX_DOCUMENT_BYTES: Final = 1 << 20
MAX_FILTER_SOURCES: Final = 1 << 20
"""Most source addresses one pushed filter may carry (wire check)."""

IPPROTO_ICMP: Final = 1
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
IPPROTO_ICMPV6: Final = 58

_FQDN = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,63}$")
_VALUE = re.compile(r"^[A-Za-z0-9_.@:/ -]{1,253}$")


# ---------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class PolicyIssue:
    """One problem in a policy document: where (``rules[2].ports[0]``) and what."""

    where: str
    message: str


class PolicyInvalid(InvalidArgument):
    """A policy document that cannot be accepted; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[PolicyIssue]) -> None:
        self.issues = tuple(issues)
        first = self.issues[0] if self.issues else PolicyIssue("", "invalid policy")
        more = f" (and {len(self.issues) - 1} more)" if len(self.issues) > 1 else ""
        super().__init__(f"{first.where or 'document'}: {first.message}{more}")

    @property
    def details(self) -> list[dict[str, Any]]:
        """Every problem, in the admin API's error ``details`` form."""
        return [
            {
                "loc": [p for p in re.split(r"[.\[\]]+", i.where) if p],
                "where": i.where,
                "msg": i.message,
            }
            for i in self.issues
        ]


# ---------------------------------------------------------------------------- model


class Protocol(enum.StrEnum):
    """What a rule allows; ``ICMP`` covers ICMP and ICMPv6."""

    ANY = "any"
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"


_WIRE_PROTOCOL: Final = {
    Protocol.ANY: pb.FILTER_PROTOCOL_ANY,
    Protocol.TCP: pb.FILTER_PROTOCOL_TCP,
    Protocol.UDP: pb.FILTER_PROTOCOL_UDP,
    Protocol.ICMP: pb.FILTER_PROTOCOL_ICMP,
}
_FROM_WIRE_PROTOCOL: Final = {int(v): k for k, v in _WIRE_PROTOCOL.items()}


@dataclass(frozen=True, order=True)
class PortRange:
    """Ports ``first``..``last`` inclusive (1..65535)."""

    first: int
    last: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


class SelectorKind(enum.StrEnum):
    ANY = "*"
    NODE = "node"
    GROUP = "group"
    TAG = "tag"


@dataclass(frozen=True)
class Selector:
    """Which nodes a rule side names; ``str()`` gives the document form back."""

    kind: SelectorKind
    name: str = ""
    value: str | None = None  # tag:KEY=VALUE

    def matches(self, node: NodeInfo) -> bool:
        if self.kind is SelectorKind.ANY:
            return True
        if self.kind is SelectorKind.NODE:
            return node.fqdn == self.name
        if self.kind is SelectorKind.GROUP:
            return self.name in node.groups
        if self.name not in node.tags:
            return False
        return self.value is None or node.tags[self.name] == self.value

    def __str__(self) -> str:
        if self.kind is SelectorKind.ANY:
            return "*"
        if self.kind is SelectorKind.TAG and self.value is not None:
            return f"tag:{self.name}={self.value}"
        return f"{self.kind.value}:{self.name}"


@dataclass(frozen=True)
class Rule:
    """Traffic from any ``sources`` node to any ``destinations`` node may start on
    ``protocol`` (and, for tcp/udp, to one of ``ports``; empty means every port)."""

    sources: tuple[Selector, ...]
    destinations: tuple[Selector, ...]
    protocol: Protocol = Protocol.ANY
    ports: tuple[PortRange, ...] = ()
    description: str = ""

    def allows(self, proto: Protocol, port: int | None) -> bool:
        """Whether this rule's protocol/ports allow ``proto``/``port`` (nodes aside)."""
        if self.protocol is not Protocol.ANY and self.protocol is not proto:
            return False
        if not self.ports or proto not in (Protocol.TCP, Protocol.UDP):
            return True
        return port is not None and any(port in r for r in self.ports)

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "from": [str(s) for s in self.sources],
            "to": [str(s) for s in self.destinations],
            "proto": self.protocol.value,
        }
        if self.ports:
            doc["ports"] = [str(r) for r in self.ports]
        if self.description:
            doc["description"] = self.description
        return doc


@dataclass(frozen=True)
class Policy:
    """The rules in force; ``allow_all`` stands for "no policy set" under the allow default."""

    rules: tuple[Rule, ...] = ()
    allow_all: bool = False

    def to_document(self) -> dict[str, Any]:
        return {"rules": [r.to_document() for r in self.rules]}


ALLOW_ALL: Final = Policy(allow_all=True)
DENY_ALL: Final = Policy()


@dataclass(frozen=True)
class NodeInfo:
    """What the policy needs of a node: its name and tags."""

    fqdn: str
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def groups(self) -> frozenset[str]:
        raw = self.tags.get("group", "")
        return frozenset(g.strip() for g in str(raw).split(",") if g.strip())


@dataclass(frozen=True)
class PeerInfo:
    """A node and its virtual addresses (filters name peers by address)."""

    node: NodeInfo
    ipv4: IPv4Address
    ipv6: IPv6Address


# ---------------------------------------------------------------------------- parsing


def _selector(text: object, where: str, issues: list[PolicyIssue]) -> Selector | None:
    if not isinstance(text, str):
        issues.append(PolicyIssue(where, "a selector is a string"))
        return None
    if text == "*":
        return Selector(SelectorKind.ANY)
    kind, sep, rest = text.partition(":")
    if not sep:
        issues.append(
            PolicyIssue(
                where, f"{text!r}: expected '*', 'node:FQDN', 'group:NAME' or 'tag:KEY=VALUE'"
            )
        )
        return None
    if kind == "node":
        fqdn = rest.lower().rstrip(".")
        if not _FQDN.match(fqdn):
            issues.append(PolicyIssue(where, f"{rest!r} is not a node name (FQDN)"))
            return None
        return Selector(SelectorKind.NODE, fqdn)
    if kind == "group":
        if not _NAME.match(rest):
            issues.append(
                PolicyIssue(where, f"{rest!r} is not a group name ([A-Za-z0-9_.@-], 1-63)")
            )
            return None
        return Selector(SelectorKind.GROUP, rest)
    if kind == "tag":
        key, eq, value = rest.partition("=")
        if not _NAME.match(key) or (eq and not _VALUE.match(value)):
            issues.append(PolicyIssue(where, f"{rest!r} is not KEY or KEY=VALUE"))
            return None
        return Selector(SelectorKind.TAG, key, value if eq else None)
    issues.append(PolicyIssue(where, f"unknown selector kind {kind!r} (node, group, tag)"))
    return None


def _port(value: object, where: str, issues: list[PolicyIssue]) -> PortRange | None:
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        first = last = value
    elif isinstance(value, str) and re.fullmatch(r"\d{1,5}(-\d{1,5})?", value):
        a, _, b = value.partition("-")
        first, last = int(a), int(b or a)
    else:
        issues.append(PolicyIssue(where, f"{value!r}: a port is 1..65535 or a range 'FIRST-LAST'"))
        return None
    if not 1 <= first <= last <= 65535:
        issues.append(PolicyIssue(where, f"{value!r}: ports are 1..65535, FIRST <= LAST"))
        return None
    return PortRange(first, last)


def _selectors(raw: object, where: str, issues: list[PolicyIssue]) -> tuple[Selector, ...]:
    if not isinstance(raw, list) or not raw:
        issues.append(PolicyIssue(where, "a non-empty list of selectors"))
        return ()
    if len(raw) > MAX_SELECTORS:
        issues.append(PolicyIssue(where, f"at most {MAX_SELECTORS} selectors"))
        return ()
    out = [_selector(s, f"{where}[{i}]", issues) for i, s in enumerate(raw)]
    return tuple(s for s in out if s is not None)


_RULE_KEYS: Final = frozenset({"from", "to", "proto", "ports", "description"})


def _rule(raw: object, where: str, issues: list[PolicyIssue]) -> Rule | None:
    if not isinstance(raw, dict):
        issues.append(PolicyIssue(where, "a rule is an object"))
        return None
    before = len(issues)
    for key in sorted(set(raw) - _RULE_KEYS, key=str):
        issues.append(PolicyIssue(f"{where}.{key}", "unknown field"))
    sources = _selectors(raw.get("from"), f"{where}.from", issues)
    destinations = _selectors(raw.get("to"), f"{where}.to", issues)
    proto_raw = raw.get("proto", "any")
    try:
        protocol = Protocol(proto_raw.lower() if isinstance(proto_raw, str) else proto_raw)
    except ValueError:
        issues.append(PolicyIssue(f"{where}.proto", f"{proto_raw!r}: one of tcp, udp, icmp, any"))
        protocol = Protocol.ANY
    ports: list[PortRange] = []
    if "ports" in raw:
        raw_ports = raw["ports"]
        if protocol not in (Protocol.TCP, Protocol.UDP):
            issues.append(PolicyIssue(f"{where}.ports", "ports need proto tcp or udp"))
        elif not isinstance(raw_ports, list) or not raw_ports:
            issues.append(
                PolicyIssue(f"{where}.ports", "a non-empty list (leave it out for all ports)")
            )
        elif len(raw_ports) > MAX_PORT_RANGES:
            issues.append(PolicyIssue(f"{where}.ports", f"at most {MAX_PORT_RANGES} entries"))
        else:
            for i, p in enumerate(raw_ports):
                r = _port(p, f"{where}.ports[{i}]", issues)
                if r is not None:
                    ports.append(r)
    description = raw.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        issues.append(PolicyIssue(f"{where}.description", f"a string of at most {MAX_DESCRIPTION}"))
        description = ""
    if len(issues) > before:
        return None
    return Rule(sources, destinations, protocol, tuple(sorted(set(ports))), description)


def parse_policy(document: object) -> Policy:
    """A validated ``Policy`` from a decoded JSON document; ``PolicyInvalid`` otherwise."""
    issues: list[PolicyIssue] = []
    if not isinstance(document, dict):
        raise PolicyInvalid([PolicyIssue("", "the policy is a JSON object with a 'rules' list")])
    for key in sorted(set(document) - {"rules", "description"}, key=str):
        issues.append(PolicyIssue(key, "unknown field"))
    raw_rules = document.get("rules")
    rules: list[Rule] = []
    if not isinstance(raw_rules, list):
        issues.append(PolicyIssue("rules", "a list of rules (may be empty: deny all)"))
    elif len(raw_rules) > MAX_RULES:
        issues.append(PolicyIssue("rules", f"at most {MAX_RULES} rules"))
    else:
        for i, raw in enumerate(raw_rules):
            rule = _rule(raw, f"rules[{i}]", issues)
            if rule is not None:
                rules.append(rule)
    description = document.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        issues.append(PolicyIssue("description", f"a string of at most {MAX_DESCRIPTION}"))
    if issues:
        raise PolicyInvalid(issues)
    return Policy(tuple(rules))


def parse_protocol_port(text: str) -> tuple[Protocol, int | None]:
    """``tcp/22``, ``udp/53``, ``icmp``, ``any`` for the dry run; ``InvalidArgument`` if not."""
    proto_text, sep, port_text = text.strip().lower().partition("/")
    try:
        proto = Protocol(proto_text)
    except ValueError as exc:
        raise InvalidArgument(f"{text!r}: expected tcp/PORT, udp/PORT, icmp or any") from exc
    if not sep:
        return proto, None
    if proto not in (Protocol.TCP, Protocol.UDP) or not port_text.isdigit():
        raise InvalidArgument(f"{text!r}: only tcp and udp take a port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"{text!r}: port out of 1..65535")
    return proto, port


# ---------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    """A dry run's answer; ``rule`` is the index of the first rule that allows, if any."""

    allowed: bool
    rule: int | None = None
    reason: str = ""


def can(
    policy: Policy, a: NodeInfo, b: NodeInfo, proto: Protocol, port: int | None = None
) -> Decision:
    """May ``a`` start ``proto``/``port`` traffic to ``b``?"""
    if a.fqdn == b.fqdn:
        return Decision(True, None, "a node's own traffic does not cross the overlay")
    if policy.allow_all:
        return Decision(True, None, "no policy set; the default allows all")
    for i, rule in enumerate(policy.rules):
        if (
            rule.allows(proto, port)
            and any(s.matches(a) for s in rule.sources)
            and any(d.matches(b) for d in rule.destinations)
        ):
            return Decision(True, i, f"rules[{i}]")
    return Decision(False, None, "no rule allows it")


def reachable(policy: Policy, a: NodeInfo, b: NodeInfo) -> bool:
    """Whether some rule lets ``a`` start any traffic at all to ``b``."""
    if policy.allow_all or a.fqdn == b.fqdn:
        return True
    return any(
        any(s.matches(a) for s in rule.sources) and any(d.matches(b) for d in rule.destinations)
        for rule in policy.rules
    )


def route_allowed(policy: Policy, a: NodeInfo, b: NodeInfo) -> bool:
    """A tunnel between ``a`` and ``b`` may exist while either may start traffic to the other
    (the tunnel carries both directions: the replies of the other side's flows too)."""
    return reachable(policy, a, b) or reachable(policy, b, a)


# ---------------------------------------------------------------------------- compiled filters


@dataclass(frozen=True)
class FilterEntry:
    """Peers (by virtual address, 4 or 16 bytes) that may start ``protocol``/``ports``."""

    sources: frozenset[bytes]
    protocol: Protocol = Protocol.ANY
    ports: tuple[PortRange, ...] = ()


@dataclass(frozen=True)
class CompiledFilter:
    """What may arrive at one node from its peers; ``revision`` is the policy's revision."""

    revision: int = 0
    allow_all: bool = False
    entries: tuple[FilterEntry, ...] = ()


def compile_filter(
    policy: Policy, node: NodeInfo, peers: Iterable[PeerInfo], *, revision: int = 0
) -> CompiledFilter:
    """The filter ``node`` enforces on packets from ``peers`` (itself left out)."""
    if policy.allow_all:
        return CompiledFilter(revision, allow_all=True)
    others = [p for p in peers if p.node.fqdn != node.fqdn]
    merged: dict[tuple[Protocol, tuple[PortRange, ...]], set[bytes]] = {}
    for rule in policy.rules:
        if not any(d.matches(node) for d in rule.destinations):
            continue
        sources = {
            addr
            for p in others
            if any(s.matches(p.node) for s in rule.sources)
            for addr in (p.ipv4.packed, p.ipv6.packed)
        }
        if sources:
            merged.setdefault((rule.protocol, rule.ports), set()).update(sources)
    entries = tuple(
        FilterEntry(frozenset(srcs), proto, ports)
        for (proto, ports), srcs in sorted(merged.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    )
    return CompiledFilter(revision, allow_all=False, entries=entries)


def filter_to_pb(compiled: CompiledFilter) -> pb.PolicyFilter:
    """The wire form of a compiled filter."""
    msg = pb.PolicyFilter(revision=compiled.revision, allow_all=compiled.allow_all)
    for entry in compiled.entries:
        msg.entries.append(
            pb.FilterEntry(
                sources=sorted(entry.sources),
                protocol=_WIRE_PROTOCOL[entry.protocol],
                ports=[pb.PortRange(first=r.first, last=r.last) for r in entry.ports],
            )
        )
    return msg


def filter_from_pb(msg: pb.PolicyFilter) -> CompiledFilter:
    """A compiled filter from the wire; ``MalformedMessage`` for anything out of range."""
    entries: list[FilterEntry] = []
    total = 0
    for entry in msg.entries:
        if entry.protocol not in _FROM_WIRE_PROTOCOL:
            raise MalformedMessage(f"PolicyFilter: unknown protocol {entry.protocol}")
        protocol = _FROM_WIRE_PROTOCOL[entry.protocol]
        total += len(entry.sources)
        if total > MAX_FILTER_SOURCES:
            raise MalformedMessage("PolicyFilter: too many source addresses")
        if any(len(s) not in (4, 16) for s in entry.sources):
            raise MalformedMessage("PolicyFilter: a source address has 4 or 16 bytes")
        if len(entry.ports) > MAX_PORT_RANGES:
            raise MalformedMessage("PolicyFilter: too many port ranges")
        ports = []
        for r in entry.ports:
            if not 1 <= r.first <= r.last <= 65535:
                raise MalformedMessage("PolicyFilter: a port range is outside 1..65535")
            ports.append(PortRange(r.first, r.last))
        if ports and protocol not in (Protocol.TCP, Protocol.UDP):
            raise MalformedMessage("PolicyFilter: ports on a protocol without ports")
        entries.append(FilterEntry(frozenset(entry.sources), protocol, tuple(ports)))
    if msg.allow_all and entries:
        raise MalformedMessage("PolicyFilter: allow_all with entries")
    return CompiledFilter(msg.revision, allow_all=msg.allow_all, entries=tuple(entries))


# ---------------------------------------------------------------------------- packet filter


class _PeerRights:
    """What one source address may start, precomputed for the per-packet check."""

    __slots__ = ("all", "icmp", "tcp", "udp")

    def __init__(self) -> None:
        self.all = False
        self.icmp = False
        self.tcp: _Ports | None = None
        self.udp: _Ports | None = None


class _Ports:
    """A set of ports: every port, a frozenset for narrow sets, else ranges."""

    __slots__ = ("every", "narrow", "ranges", "set")

    def __init__(self) -> None:
        self.every = False
        self.narrow = True
        self.ranges: list[PortRange] = []
        self.set: frozenset[int] = frozenset()

    def add(self, ranges: tuple[PortRange, ...]) -> None:
        if not ranges:
            self.every = True
        self.ranges.extend(ranges)
        self.narrow = sum(r.last - r.first + 1 for r in self.ranges) <= 4096
        self.set = (
            frozenset(p for r in self.ranges for p in range(r.first, r.last + 1))
            if self.narrow
            else frozenset()
        )

    def __contains__(self, port: int) -> bool:
        if self.every:
            return True
        if self.narrow:
            return port in self.set
        return any(r.first <= port <= r.last for r in self.ranges)


def _rights(compiled: CompiledFilter) -> dict[bytes, _PeerRights]:
    rights: dict[bytes, _PeerRights] = {}
    for entry in compiled.entries:
        for src in entry.sources:
            r = rights.get(src)
            if r is None:
                r = rights[src] = _PeerRights()
            if entry.protocol is Protocol.ANY:
                r.all = True
            elif entry.protocol is Protocol.ICMP:
                r.icmp = True
            else:
                attr = "tcp" if entry.protocol is Protocol.TCP else "udp"
                ports = getattr(r, attr)
                if ports is None:
                    ports = _Ports()
                    setattr(r, attr, ports)
                ports.add(entry.ports)
    return rights


class DropReason(enum.StrEnum):
    NOT_ALLOWED = "not_allowed"
    MALFORMED = "malformed"
    FRAGMENT = "fragment"


# ICMP types: echo request/reply, and errors that quote a packet this node sent.
_ICMP4_ECHO_REQUEST, _ICMP4_ECHO_REPLY = 8, 0
_ICMP6_ECHO_REQUEST, _ICMP6_ECHO_REPLY = 128, 129
_ICMP4_ERRORS: Final = frozenset({3, 4, 11, 12})
_ICMP6_ERRORS: Final = frozenset({1, 2, 3, 4})

HOT_S: Final = 1.0
"""How long the one-entry flow caches may answer without the full check."""

FlowKey = tuple[int, bytes, int, int]
"""(IP protocol, peer address, peer port or ICMP id, local port or 0)."""


class PacketFilter:
    """The agent's stateful filter over one ``CompiledFilter`` (see the module docstring).

    ``inbound(packet, now)`` says whether a packet from a tunnel may go to the TUN device;
    ``outbound(packet, now)`` notes the flow a packet from the TUN device opens, so that its
    replies pass. Flows expire after ``idle_s`` of their protocol without a packet either way;
    the table holds at most ``max_flows`` (the oldest is evicted first). Counters: ``passed``,
    ``dropped`` by ``DropReason``. A new filter (``install``) keeps the flows this node opened
    and applies at once to everything else.
    """

    def __init__(
        self,
        compiled: CompiledFilter | None = None,
        *,
        max_flows: int = 65536,
        tcp_idle_s: float = 1800.0,
        udp_idle_s: float = 120.0,
        icmp_idle_s: float = 30.0,
    ) -> None:
        self.max_flows = max_flows
        self._idle = {
            IPPROTO_TCP: tcp_idle_s,
            IPPROTO_UDP: udp_idle_s,
            IPPROTO_ICMP: icmp_idle_s,
            IPPROTO_ICMPV6: icmp_idle_s,
        }
        self._flows: dict[FlowKey, float] = {}
        self._next_sweep = 0.0
        # One-entry caches of the last flow that passed, per direction: the packets of a bulk
        # flow come in long runs, and comparing two header slices is far cheaper than the
        # full check. Valid for HOT_S at most (the full check also refreshes the flow's idle
        # timer) and dropped whenever a new filter is installed.
        self._hot_head = self._hot_key = self._out_key = b""
        self._hot_until = self._out_until = 0.0
        self.passed = 0
        self.dropped: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self.evicted = 0
        self.install(compiled or CompiledFilter(allow_all=True))

    @property
    def compiled(self) -> CompiledFilter:
        return self._compiled

    @property
    def allow_all(self) -> bool:
        return self._allow_all

    @property
    def flows(self) -> int:
        return len(self._flows)

    def install(self, compiled: CompiledFilter) -> None:
        """Enforce ``compiled`` from now on."""
        self._compiled = compiled
        self._allow_all = compiled.allow_all
        self._rights = _rights(compiled)
        self._hot_until = self._out_until = 0.0

    def _drop(self, reason: DropReason) -> bool:
        self.dropped[reason] += 1
        return False

    # -- outbound: flows this node opens

    def outbound(self, packet: bytes | bytearray | memoryview, now: float, offset: int = 0) -> None:
        """Note the flow of a packet this node sends into a tunnel (cheap when not needed);
        the IP header starts at ``offset`` (a virtio_net_hdr before it, TUN offloads on)."""
        if self._allow_all:
            return
        if offset:
            packet = memoryview(packet)[offset:]
        elif len(packet) >= 24 and packet[0] == 0x45 and type(packet) is bytes:
            if now < self._out_until and packet[12:24] == self._out_key:
                return
            # The common case inline: IPv4 without options, TCP or UDP, no fragment.
            proto = packet[9]
            if proto in (IPPROTO_TCP, IPPROTO_UDP) and not (packet[6] & 0x3F or packet[7]):
                dst = packet[16:20]
                rights = self._rights.get(dst)
                if rights is None or not rights.all:
                    key = (proto, dst, packet[22] << 8 | packet[23], packet[20] << 8 | packet[21])
                    flows = self._flows
                    if key not in flows and len(flows) >= self.max_flows:
                        self._make_room(now)
                    flows[key] = now + self._idle[proto]
                self._out_key = packet[12:24]
                self._out_until = now + HOT_S
                return
        if len(packet) < 20:
            return
        if now < self._out_until and packet[12:24] == self._out_key:
            return  # the same flow as the last packet, noted less than HOT_S ago
        version = packet[0] >> 4
        if version == 4:
            proto = packet[9]
            dst = bytes(packet[16:20])
            l4 = (packet[0] & 0x0F) * 4
            if packet[6] & 0x1F or packet[7]:
                return  # a later fragment: its first fragment opened the flow
        elif version == 6 and len(packet) >= 40:
            proto = packet[6]
            dst = bytes(packet[24:40])
            l4 = 40
        else:
            return
        rights = self._rights.get(dst)
        if rights is not None and rights.all:
            if packet[0] == 0x45:  # the peer may send anything anyway: nothing to note
                self._out_key = bytes(packet[12:24])
                self._out_until = now + HOT_S
            return
        if proto in (IPPROTO_TCP, IPPROTO_UDP):
            if len(packet) < l4 + 4:
                return
            key = (
                proto,
                dst,
                packet[l4 + 2] << 8 | packet[l4 + 3],
                packet[l4] << 8 | packet[l4 + 1],
            )
        elif proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            if len(packet) < l4 + 8:
                return
            kind = packet[l4]
            if kind != _ICMP4_ECHO_REQUEST and kind != _ICMP6_ECHO_REQUEST:
                return
            key = (proto, dst, packet[l4 + 4] << 8 | packet[l4 + 5], 0)
        else:
            key = (proto, dst, 0, 0)
        flows = self._flows
        if key not in flows and len(flows) >= self.max_flows:
            self._make_room(now)
        flows[key] = now + self._idle.get(proto, 120.0)
        if packet[0] == 0x45 and key[2]:  # IPv4 TCP/UDP without options: addresses + ports
            self._out_key = bytes(packet[12:24])
            self._out_until = now + HOT_S

    def _make_room(self, now: float) -> None:
        if now >= self._next_sweep:
            self.expire(now)
            self._next_sweep = now + 1.0
        while len(self._flows) >= self.max_flows:
            del self._flows[next(iter(self._flows))]
            self.evicted += 1

    def expire(self, now: float) -> int:
        """Forget idle flows; returns how many went."""
        stale = [k for k, until in self._flows.items() if until <= now]
        for k in stale:
            del self._flows[k]
        return len(stale)

    # -- inbound: packets from tunnels

    def inbound(self, packet: bytes | bytearray | memoryview, now: float) -> bool:
        """Whether a packet from a tunnel may be delivered; counts it either way."""
        if self._allow_all:
            self.passed += 1
            return True
        if (
            now < self._hot_until
            and packet[12:24] == self._hot_key
            and packet[6:10] == self._hot_head
        ):
            self.passed += 1  # same addresses, ports, protocol, flags as the last one passed
            return True
        if len(packet) >= 24 and packet[0] == 0x45 and type(packet) is bytes:
            # The common case, checked inline: IPv4 without options, TCP or UDP, no fragment.
            proto = packet[9]
            if proto in (IPPROTO_TCP, IPPROTO_UDP) and not (packet[6] & 0x3F or packet[7]):
                src = packet[12:16]
                dport = packet[22] << 8 | packet[23]
                rights = self._rights.get(src)
                ok = False
                if rights is not None:
                    if rights.all:
                        ok = True
                    else:
                        ports = rights.tcp if proto == IPPROTO_TCP else rights.udp
                        ok = ports is not None and dport in ports
                if not ok:
                    key = (proto, src, packet[20] << 8 | packet[21], dport)
                    until = self._flows.get(key)
                    if until is None or until <= now:
                        self.dropped[DropReason.NOT_ALLOWED] += 1
                        return False
                    self._flows[key] = now + self._idle[proto]
                self.passed += 1
                self._hot_head = packet[6:10]
                self._hot_key = packet[12:24]
                self._hot_until = now + HOT_S
                return True
        if self._inbound(packet, now):
            self.passed += 1
            return True
        return False

    def _inbound(self, packet: bytes | bytearray | memoryview, now: float) -> bool:
        n = len(packet)
        if n < 20:
            return self._drop(DropReason.MALFORMED)
        version = packet[0] >> 4
        if version == 4:
            l4 = (packet[0] & 0x0F) * 4
            proto = packet[9]
            src = bytes(packet[12:16])
            fragment = bool(packet[6] & 0x1F or packet[7])
            if l4 < 20:
                return self._drop(DropReason.MALFORMED)
        elif version == 6 and n >= 40:
            l4 = 40
            proto = packet[6]
            src = bytes(packet[8:24])
            fragment = False  # a fragment header shows as protocol 44: "other"
        else:
            return self._drop(DropReason.MALFORMED)
        rights = self._rights.get(src)
        if rights is not None and rights.all:
            return True
        if fragment:
            return self._drop(DropReason.FRAGMENT)
        flows = self._flows
        if proto in (IPPROTO_TCP, IPPROTO_UDP):
            if n < l4 + 4:
                return self._drop(DropReason.MALFORMED)
            sport = packet[l4] << 8 | packet[l4 + 1]
            dport = packet[l4 + 2] << 8 | packet[l4 + 3]
            if rights is not None:
                ports = rights.tcp if proto == IPPROTO_TCP else rights.udp
                if ports is not None and dport in ports:
                    return True
            key = (proto, src, sport, dport)
        elif proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            if n < l4 + 8:
                return self._drop(DropReason.MALFORMED)
            if rights is not None and rights.icmp:
                return True
            kind = packet[l4]
            if kind in (_ICMP4_ECHO_REPLY, _ICMP6_ECHO_REPLY):
                key = (proto, src, packet[l4 + 4] << 8 | packet[l4 + 5], 0)
            elif (proto == IPPROTO_ICMP and kind in _ICMP4_ERRORS) or (
                proto == IPPROTO_ICMPV6 and kind in _ICMP6_ERRORS
            ):
                return self._related_error(packet, l4 + 8, src, now)
            else:
                return self._drop(DropReason.NOT_ALLOWED)
        else:
            key = (proto, src, 0, 0)  # other protocols: only "any" rules (above) or replies
        until = flows.get(key)
        if until is None or until <= now:
            return self._drop(DropReason.NOT_ALLOWED)
        flows[key] = now + self._idle.get(proto, 120.0)
        return True

    def _related_error(
        self, packet: bytes | bytearray | memoryview, inner: int, src: bytes, now: float
    ) -> bool:
        """An ICMP error passes when the packet it quotes belongs to a flow this node opened
        with the error's sender (path MTU discovery needs "too big" to get through)."""
        n = len(packet)
        if n < inner + 20:
            return self._drop(DropReason.MALFORMED)
        version = packet[inner] >> 4
        if version == 4:
            l4 = inner + (packet[inner] & 0x0F) * 4
            proto = packet[inner + 9]
            dst = bytes(packet[inner + 16 : inner + 20])
        elif version == 6 and n >= inner + 40:
            l4 = inner + 40
            proto = packet[inner + 6]
            dst = bytes(packet[inner + 24 : inner + 40])
        else:
            return self._drop(DropReason.MALFORMED)
        if dst != src:
            return self._drop(DropReason.NOT_ALLOWED)  # quotes traffic to someone else
        if proto in (IPPROTO_TCP, IPPROTO_UDP) and n >= l4 + 4:
            key = (
                proto,
                dst,
                packet[l4 + 2] << 8 | packet[l4 + 3],
                packet[l4] << 8 | packet[l4 + 1],
            )
        else:
            key = (proto, dst, 0, 0)
        until = self._flows.get(key)
        if until is None or until <= now:
            return self._drop(DropReason.NOT_ALLOWED)
        return True
