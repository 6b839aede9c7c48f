"""The agent's side of a move (``roaming.Roaming``) over fake connections: every client
connection takes a fresh connection ID, and one that has none left does not stop the others."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any, cast

import pytest
from cyphonic_agent.mobility import HostPath, PathLost
from cyphonic_agent.roaming import Roaming

pytestmark = pytest.mark.timeout(20)


class _Quic:
    def __init__(self, spare_cids: int) -> None:
        self.spare_cids = spare_cids
        self.rotations = 0
        self.pings: list[int] = []

    def change_connection_id(self) -> None:
        # As qh3's core: no spare CID from the peer (it answered nothing since) is an error.
        if self.spare_cids == 0:
            raise ValueError("invalid connection configuration: no unused peer connection ID")
        self.spare_cids -= 1
        self.rotations += 1

    def send_ping(self, uid: int) -> None:
        self.pings.append(uid)


class _Conn:
    def __init__(self, name: str, *, spare_cids: int = 3, is_client: bool = True) -> None:
        self.quic = _Quic(spare_cids)
        self.is_client = is_client
        self.is_closed = False
        self.peer: Any = type("Peer", (), {"name": name})()
        self.peer_address = ("2001:db8:100::10", 443)
        self.closed: str | None = None
        self.transmits = 0

    def close(self, reason: str = "") -> None:
        self.closed = reason
        self.is_closed = True

    def transmit(self) -> None:
        self.transmits += 1


def _roaming(conns: list[_Conn]) -> Roaming:
    endpoint = type("Endpoint", (), {"connections": conns})()

    def spawn(coro: Any) -> asyncio.Task[Any]:
        raise AssertionError("nothing is spawned here")

    return Roaming(
        fqdn="alice.cyphonic.internal",
        nms=cast(Any, None),  # not used by the steps tested here
        endpoint=lambda: cast(Any, endpoint),
        relay=lambda: None,
        spawn=spawn,
        moves=lambda: 0,
    )


def _path(address: str, gateway: str) -> HostPath:
    return HostPath(
        addresses=frozenset({ipaddress.ip_address(address)}),
        default_routes=frozenset({f"via {gateway}"}),
    )


def test_a_connection_without_spare_cids_is_closed_and_the_rest_move() -> None:
    """Issue 14: the AS connection (IPv6 only) heard nothing during a stay on an IPv4 NAT
    network; at the move back qh3 had no unused CID for it and the exception killed the
    move watcher: the move went unnoticed until the NMS keepalive failed (7-18 s)."""
    nms, stale, server = _Conn("nms"), _Conn("as", spare_cids=0), _Conn("bob", is_client=False)
    roaming = _roaming([nms, stale, server])
    lost = PathLost(old=_path("192.168.3.10", "192.168.3.1"), now=HostPath())
    roaming.path_lost(lost)  # must not raise
    assert nms.quic.rotations == 1 and nms.closed is None
    assert stale.closed is not None and stale.quic.rotations == 0
    assert server.quic.rotations == 0 and server.closed is None
    # The move's probe then goes out on the connections still open only.
    assert roaming.migrate_client_connections(rotate=False) == 1
    assert nms.quic.pings and not stale.quic.pings


def test_every_client_connection_rotates_and_probes() -> None:
    conns = [_Conn("nms"), _Conn("trs"), _Conn("bob", is_client=False)]
    roaming = _roaming(conns)
    assert roaming.migrate_client_connections() == 2
    assert [c.quic.rotations for c in conns] == [1, 1, 0]
    assert [len(c.quic.pings) for c in conns] == [1, 1, 0]
    assert [c.transmits for c in conns] == [1, 1, 0]
