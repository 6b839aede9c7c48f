"""What the agent does when its host moves: the glue between ``mobility.MoveWatcher`` (which
says *that* the path changed) and the connections on our one UDP socket.

    path lost (an address or default route went) ──> fresh connection IDs on every
        client-role connection now, no probe (the first packet by the new path carries one)
    moved (settled on a new path) ──> control.on_move decides: rotate? reconnect? re-register?
        ──> fresh IDs + PING on client connections, TRS keepalive at once,
            re-registration at the NMS (or a reconnect when the NMS is unreachable from here)

The decision is the sans-I/O ``control.on_move``; this module only performs it and keeps the
last ``Handover`` for ``cyphonic-agent status``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cyphonic.errors import Unavailable
from cyphonic.hostport import format_host_port
from cyphonic.log import get_logger
from cyphonic.quic import Connection, QuicEndpoint
from cyphonic.v1 import signalling_pb2 as pb

from cyphonic_agent.control import on_move
from cyphonic_agent.mobility import Handover, Move, PathLost, seen_on_old_path
from cyphonic_agent.nms import NmsClient, NmsLink
from cyphonic_agent.peers import routable
from cyphonic_agent.relay import RelayClient

__all__ = ["Roaming"]

STALE_REGISTRATIONS = 3
"""Registrations again after one the NMS answered from the old path, at most (per move)."""
STALE_REGISTRATION_RETRY_S = 0.1
"""How long after such an answer (the NMS validates the new path in one round trip)."""


class Roaming:
    """Performs the agent's side of a move; ``moved``/``path_lost`` are the watcher's hooks."""

    def __init__(
        self,
        *,
        fqdn: str,
        nms: NmsClient,
        endpoint: Callable[[], QuicEndpoint],
        relay: Callable[[], RelayClient | None],
        spawn: Callable[[Awaitable[Any]], asyncio.Task[Any]],
        moves: Callable[[], int],
    ) -> None:
        self.nms = nms
        self._endpoint = endpoint
        self._relay = relay
        self._spawn = spawn
        self._moves = moves
        self.log: Any = get_logger("agent", fqdn=fqdn)
        self.handover: Handover | None = None
        """The last move of this host."""
        self.handover_network: pb.NetworkInfo | None = None
        """What the NMS saw of us at the first registration after the last move."""
        self._rotated = False
        """Client connections took fresh connection IDs when the path was lost."""
        self._awaiting_view = False
        """No registration since the last move has shown the NMS's view of the new path."""
        self._stale_registrations = 0
        self._ping_uid = 0

    def registered(self, reg: pb.RegisterResponse) -> None:
        """A registration answered: the first one after a move shows the NMS's view, unless
        the NMS still saw us by the old path (``mobility.seen_on_old_path``): then we register
        again a moment later, when it has validated the new one (a few times at most)."""
        if self.handover is None or not self._awaiting_view:
            return
        self.handover_network = reg.network
        observed = [
            ipaddress.ip_address(ep.ip)
            for ep in (reg.network.observed_ipv4, reg.network.observed_ipv6)
            if len(ep.ip) in (4, 16)
        ]
        link = self.nms.link
        if (
            seen_on_old_path(self.handover, observed)
            and self._stale_registrations < STALE_REGISTRATIONS
            and link is not None
        ):
            self._stale_registrations += 1
            self.log.info(
                "registered_by_old_path",
                observed=[str(ip) for ip in observed],
                again_in_s=STALE_REGISTRATION_RETRY_S,
            )
            self._spawn(self._register_again(link))
            return
        self._awaiting_view = False

    async def _register_again(self, link: NmsLink) -> None:
        await asyncio.sleep(STALE_REGISTRATION_RETRY_S)
        if self.nms.link is link and link.session.is_open:
            await self.nms.reregister(link)

    async def moved(self, move: Move) -> None:
        """The host's real path changed: migrate, re-register, let the NMS re-direct.

        1. Client-role connections (NMS, TRS control, tunnels we opened) take a fresh
           connection ID and probe: the peer validates the new path and follows it.
        2. The relay keepalive goes out at once, so the TRS learns our new address through
           the (migrated) control connection.
        3. Re-registration at the NMS on the same connection: new local addresses, NAT
           status as the NMS sees the new path. The NMS re-directs our routes: a route
           whose pattern or connecting side changed, or where we accepted the tunnel, gets
           a new route id, and both nodes rebuild it; the others carry on migrated.
        """
        self.handover = Handover(at=time.time(), old=move.old, new=move.new)
        self.handover_network = None
        self._awaiting_view = True
        self._stale_registrations = 0
        link = self.nms.link
        decision = on_move(
            rotated_on_loss=self._rotated,
            nms_open=link is not None and link.session.is_open,
            registered=self.nms.registration is not None,
            nms_routable=link is not None and routable(link.endpoint.host, link.endpoint.port),
        )
        old, new = move.old.describe(), move.new.describe()
        migrated = self.migrate_client_connections(rotate=decision.rotate)
        self._rotated = False
        relay = self._relay()
        if relay is not None:
            relay.nudge()
        self.log.info(
            "moved",
            old=old["addresses"],
            new=new["addresses"],
            old_routes=old["default_routes"],
            new_routes=new["default_routes"],
            migrated=migrated,
            moves=self._moves(),
        )
        if link is None:
            return  # the control loop registers with the new addresses when it connects
        if decision.reconnect:
            why = Unavailable("moved: the NMS endpoint is unreachable from here")
            self.nms.reconnect_now(link, why)
        elif decision.reregister:
            # In its own task: the watcher goes on watching (a second move while this
            # waits registers again).
            self._spawn(self.nms.reregister(link))

    def path_lost(self, lost: PathLost) -> None:
        """Part of the path went away: fresh connection IDs now, so that the first packet
        that leaves by a new path already carries one (sent when the move settles)."""
        self.log.info(
            "path_lost", old=lost.old.describe()["addresses"], now=lost.now.describe()["addresses"]
        )
        self.migrate_client_connections(rotate=True, probe=False)
        self._rotated = True

    def migrate_client_connections(self, *, rotate: bool = True, probe: bool = True) -> int:
        """A fresh connection ID (``rotate``) and a PING (``probe``) on every client-role
        connection; how many."""
        count = 0
        for conn in self._endpoint().connections:
            if not conn.is_client or conn.is_closed:
                continue
            if rotate and not self._rotate(conn):
                continue
            count += 1
            if not probe:
                continue
            self._ping_uid += 1
            conn.quic.send_ping(self._ping_uid)
            conn.transmit()
        return count

    def _rotate(self, conn: Connection) -> bool:
        """Switch ``conn`` to the peer's next connection ID; False when the peer gave it no
        unused one (it answered nothing since the last rotation: e.g. the AS, reachable by
        IPv6 only, across a stay on an IPv4 network). Such a connection cannot move without
        linking the two paths (RFC 9000, 9.5): it is closed here, its owner connects again
        by the new path. One connection's failure must never stop the others' handover."""
        try:
            conn.quic.change_connection_id()
        except ValueError as exc:  # qh3: "no unused peer connection ID"
            peer = conn.peer
            self.log.warning(
                "cid_rotation_failed",
                peer=peer.name if peer is not None else None,
                address=format_host_port(*conn.peer_address),
                error=str(exc),
            )
            conn.close("moved: no unused connection ID for the new path")
            return False
        return True
