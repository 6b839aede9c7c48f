"""The agent's side of a move (``roaming.Roaming``) over fake connections: every client
connection takes a fresh connection ID, and one that has none left does not stop the others."""

from __future__ import annotations

import asyncio
import ipaddress
import types
from typing import Any, cast

import pytest
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_agent.mobility import Handover, HostPath, PathLost
from cyphonic_agent.roaming import STALE_REGISTRATIONS, Roaming

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


def _roaming(conns: list[_Conn], *, spawned: list[Any] | None = None) -> Roaming:
    endpoint = type("Endpoint", (), {"connections": conns})()

    def spawn(coro: Any) -> asyncio.Task[Any]:
        if spawned is None:
            raise AssertionError("nothing is spawned here")
        spawned.append(coro)
        coro.close()  # only that it was asked for matters here
        return cast("asyncio.Task[Any]", None)

    return Roaming(
        fqdn="alice.cyphonic.internal",
        nms=cast(Any, types.SimpleNamespace(link=object())),
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
    assert roaming.migrate_client_connections(rotate=False, probe=False) == 1
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


def _answer(observed: str) -> pb.RegisterResponse:
    ip = ipaddress.ip_address(observed)
    network = pb.NetworkInfo(has_ipv4=True, behind_nat=True)
    network.observed_ipv4.CopyFrom(pb.Endpoint(ip=ip.packed, port=443))
    return pb.RegisterResponse(network=network)


def test_a_registration_the_nms_answered_by_the_old_path_is_sent_again() -> None:
    """server-move (seen once in three runs): the NMS answered bob's re-registration with his
    old address (its QUIC path validation was not done), took him for NATed and relayed the
    route; he registers again a moment later, a few times at most."""
    spawned: list[Any] = []
    roaming = _roaming([], spawned=spawned)
    old, new = _path("203.0.113.10", "203.0.113.1"), _path("203.0.113.138", "203.0.113.129")
    # As ``moved`` leaves it (its glue is tested end to end in tests/netns/mobility).
    roaming.handover = Handover(at=0.0, old=old, new=new)
    roaming._awaiting_view = True
    roaming.registered(_answer("203.0.113.10"))
    assert len(spawned) == 1
    # The NMS's view of the new path ends it; later registrations are not looked at.
    roaming.registered(_answer("203.0.113.138"))
    assert roaming.handover_network is not None
    assert roaming.handover_network.observed_ipv4.ip == ipaddress.ip_address("203.0.113.138").packed
    roaming.registered(_answer("203.0.113.10"))
    assert len(spawned) == 1
    # An NMS that keeps answering so is asked a few times, not for ever.
    spawned.clear()
    roaming._awaiting_view, roaming._stale_registrations = True, 0
    for _ in range(STALE_REGISTRATIONS + 2):
        roaming.registered(_answer("203.0.113.10"))
    assert len(spawned) == STALE_REGISTRATIONS


def test_a_nat_address_is_the_view_of_the_new_path() -> None:
    spawned: list[Any] = []
    roaming = _roaming([], spawned=spawned)
    roaming.handover = Handover(
        at=0.0, old=_path("192.168.1.10", "192.168.1.1"), new=_path("192.168.3.10", "192.168.3.1")
    )
    roaming._awaiting_view = True
    roaming.registered(_answer("198.51.100.130"))
    assert spawned == [] and roaming.handover_network is not None
