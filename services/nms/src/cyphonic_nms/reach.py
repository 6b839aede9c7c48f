"""Reachability probes: what a node's NAT and firewall let through, learnt at registration.

Two questions, answered from two UDP sockets of the NMS besides its QUIC port:

* **NAT mapping.** The node sends a mapping probe from its one UDP socket to the NMS's
  *probe port*. Its source there is compared with the source of its signalling connection
  (QUIC port): the same public address:port means the NAT maps endpoint-independently
  (a simultaneous open can reach it); another one means a mapping that depends on the
  destination ("symmetric": relay only).
* **Inbound.** The NMS sends an inbound probe to the node's observed address from a third
  socket, one the node never sent to. A stateful firewall or a NAT drops it; an open node
  echoes it back (once, only with its registration's nonce, so the node never reflects a
  stranger's datagram). No echo within ``timeout_s`` means nothing gets in uninvited: the
  node is treated as NATed (it connects out) from its first route on.

Only a node that asked for probes (``RegisterRequest.reach_probes``) is probed, so an old
agent is never taken for a firewalled one. The frames are ``cyphonic.wire.reach``.

``ReachProbes`` is the sans-I/O core (nonces, matching, verdicts, deadlines; time passed
in); ``ReachProber`` is the asyncio glue with the two sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address
from typing import Any

from cyphonic.log import get_logger
from cyphonic.wire.reach import KIND_ECHO, KIND_INBOUND, KIND_MAPPING, NONCE_LEN, frame, parse

from cyphonic_nms.routing import Endpoint, Inbound, NatMapping

log = get_logger("nms")

DEFAULT_TIMEOUT_S = 1.0
"""How long the NMS waits for the node's mapping probe and echo."""
INBOUND_SENDS_S = (0.0, 0.15, 0.4)
"""When the inbound probe goes out after registration (repeats cover a probe that arrives
before the node has read its RegisterResponse, and a loss)."""
MAX_PENDING = 100_000


@dataclass(frozen=True)
class ReachVerdict:
    fqdn: str
    nat_mapping: NatMapping
    inbound: Inbound


@dataclass
class _Probe:
    fqdn: str
    observed: Endpoint
    behind_nat: bool
    deadline: float
    mapped: Endpoint | None = None
    echoed: bool = False


@dataclass
class ReachProbes:
    """Pending probes by nonce (sans-I/O)."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    max_pending: int = MAX_PENDING
    _pending: dict[bytes, _Probe] = field(default_factory=dict)
    _by_node: dict[str, bytes] = field(default_factory=dict)

    def begin(self, fqdn: str, *, observed: Endpoint, behind_nat: bool, now: float) -> bytes | None:
        """A new probe of ``fqdn`` (replacing its previous one); its nonce, or None when too
        many are pending (the node stays ``unknown``)."""
        old = self._by_node.pop(fqdn, None)
        if old is not None:
            self._pending.pop(old, None)
        if len(self._pending) >= self.max_pending:
            return None
        nonce = secrets.token_bytes(NONCE_LEN)
        self._pending[nonce] = _Probe(
            fqdn=fqdn, observed=observed, behind_nat=behind_nat, deadline=now + self.timeout_s
        )
        self._by_node[fqdn] = nonce
        return nonce

    def target(self, nonce: bytes) -> Endpoint | None:
        """Where the inbound probe with ``nonce`` goes (None once decided)."""
        probe = self._pending.get(nonce)
        return probe.observed if probe is not None else None

    def received(self, data: bytes, source: Endpoint, *, now: float) -> ReachVerdict | None:
        """A datagram on a probe socket; the verdict when it completes a probe."""
        parsed = parse(data)
        if parsed is None:
            return None
        kind, nonce = parsed
        probe = self._pending.get(nonce)
        if probe is None:
            return None
        if kind == KIND_MAPPING and probe.mapped is None:
            probe.mapped = source
        elif kind == KIND_ECHO and source == probe.observed:
            probe.echoed = True
        else:
            return None
        if probe.mapped is not None and probe.echoed:
            return self._decide(nonce)
        return None

    def expire(self, *, now: float) -> list[ReachVerdict]:
        """Verdicts of the probes whose time is up."""
        due = [n for n, p in self._pending.items() if p.deadline <= now]
        return [self._decide(n) for n in due]

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self._pending.values()), default=None)

    def _decide(self, nonce: bytes) -> ReachVerdict:
        probe = self._pending.pop(nonce)
        if self._by_node.get(probe.fqdn) == nonce:
            del self._by_node[probe.fqdn]
        if not probe.behind_nat:
            mapping = NatMapping.NONE
        elif probe.mapped is None:
            mapping = NatMapping.UNKNOWN  # the probe port is unreachable from there
        elif probe.mapped == probe.observed:
            mapping = NatMapping.ENDPOINT_INDEPENDENT
        else:
            mapping = NatMapping.DEPENDENT
        # Only a node that asked for probes is probed: no echo means nothing uninvited
        # gets in (a lost echo, three times over, costs a relayed or reversed route only).
        inbound = Inbound.OPEN if probe.echoed else Inbound.BLOCKED
        return ReachVerdict(fqdn=probe.fqdn, nat_mapping=mapping, inbound=inbound)

    def __len__(self) -> int:
        return len(self._pending)


def _sock_address(ep: Endpoint) -> tuple[str, int]:
    """``ep`` as a destination of a dual-stack IPv6 socket."""
    ip = ep.ip
    text = str(ip) if isinstance(ip, IPv6Address) else f"::ffff:{ip}"
    return (text, ep.port)


def _endpoint(addr: Any) -> Endpoint:
    ip = ip_address(addr[0].split("%", 1)[0])
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return Endpoint(ip, int(addr[1]))


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP errors: the probe just fails
        pass


class ReachProber:
    """The glue: a probe port (mapping probes in, echoes in) and an inbound socket (probes
    out, echoes in), both dual-stack; verdicts go to ``on_verdict``."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        on_verdict: Callable[[ReachVerdict], None],
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.host = host
        self.port = port
        self.on_verdict = on_verdict
        self.core = ReachProbes(timeout_s=timeout_s)
        self._probe: asyncio.DatagramTransport | None = None
        self._inbound: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for attr, port in (("_probe", self.port), ("_inbound", 0)):
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((self.host, port))
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Socket(self._received), sock=sock
            )
            setattr(self, attr, transport)
        if self.port == 0 and self._probe is not None:
            self.port = int(self._probe.get_extra_info("sockname")[1])
        log.info("reach_probe_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for transport in (self._probe, self._inbound):
            if transport is not None:
                transport.close()

    def begin(self, fqdn: str, *, observed: Endpoint, behind_nat: bool) -> bytes | None:
        """Probe ``fqdn`` at ``observed``; the nonce for its RegisterResponse."""
        loop = asyncio.get_running_loop()
        nonce = self.core.begin(fqdn, observed=observed, behind_nat=behind_nat, now=loop.time())
        if nonce is None:
            return None
        task = loop.create_task(self._send_inbound(nonce))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._rearm()
        return nonce

    async def _send_inbound(self, nonce: bytes) -> None:
        started = asyncio.get_running_loop().time()
        for at in INBOUND_SENDS_S:
            delay = started + at - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)
            target = self.core.target(nonce)
            if target is None or self._inbound is None:
                return
            with contextlib.suppress(OSError):
                self._inbound.sendto(frame(KIND_INBOUND, nonce), _sock_address(target))

    def _received(self, data: bytes, addr: Any) -> None:
        try:
            source = _endpoint(addr)
        except ValueError:
            return
        verdict = self.core.received(data, source, now=asyncio.get_running_loop().time())
        if verdict is not None:
            self._deliver(verdict)

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.core.next_deadline()
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        for verdict in self.core.expire(now=asyncio.get_running_loop().time()):
            self._deliver(verdict)
        self._rearm()

    def _deliver(self, verdict: ReachVerdict) -> None:
        try:
            self.on_verdict(verdict)
        except Exception as exc:  # the manager's problem must not stop the prober
            log.warning("reach_verdict_failed", fqdn=verdict.fqdn, error=repr(exc))
