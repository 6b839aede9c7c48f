"""The agent's relayed-path book, sans-I/O: CID pools, the server hook's lookup, pushes that
arrive before their route, with an explicit clock."""

from __future__ import annotations

import os

import pytest
from cyphonic.errors import InvalidArgument
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_agent.relay import CidPool, RelayBook, RelayedPath, check_cids


def cids(n: int = 16) -> tuple[bytes, ...]:
    return tuple(os.urandom(8) for _ in range(n))


def path(
    route_id: str = "r1",
    *,
    role: int = pb.ROUTE_ROLE_ACCEPT,
    own: tuple[bytes, ...] | None = None,
    peer: tuple[bytes, ...] = (),
) -> RelayedPath:
    return RelayedPath(
        route_id=route_id,
        role=role,
        peer_fqdn="a.cyphonic.internal",
        trs=("192.0.2.9", 443),
        trs_name="trs.svc.cyphonic.internal",
        own_cids=own or cids(),
        peer_cids=peer,
    )


def test_pools_hand_out_the_trs_cids_then_random_ones() -> None:
    own = cids(4)
    client = path(role=pb.ROUTE_ROLE_CONNECT, own=own).connection_id_factory()
    assert [client(i) for i in range(4)] == list(own)
    server = path(role=pb.ROUTE_ROLE_ACCEPT, own=own).connection_id_factory()
    # The server's first TRS CID is the client's Initial DCID: its own start at the second.
    assert [server(i) for i in range(3)] == list(own[1:])
    spare = server(3)
    assert len(spare) == 8 and spare not in own and server.overflow == 1
    assert CidPool(own, offset=2)(0) == own[2]


def test_initial_destination_and_label() -> None:
    peer = cids(2)
    p = path(role=pb.ROUTE_ROLE_CONNECT, peer=peer)
    assert p.connects and p.initial_destination_cid == peer[0]
    assert p.label == "via 192.0.2.9:443 (trs.svc.cyphonic.internal)"
    assert path(role=pb.ROUTE_ROLE_CONNECT).trs == ("192.0.2.9", 443)
    with pytest.raises(InvalidArgument, match="unknown"):
        _ = path(role=pb.ROUTE_ROLE_CONNECT).initial_destination_cid
    v6 = RelayedPath(
        route_id="r",
        role=pb.ROUTE_ROLE_ACCEPT,
        peer_fqdn="p",
        trs=("2001:db8::9", 443),
        trs_name="t",
        own_cids=cids(1),
    )
    assert v6.label == "via [2001:db8::9]:443 (t)"


def test_server_pool_only_for_accepting_routes_and_until_removed() -> None:
    book = RelayBook()
    accept = book.add(path("r1"), now=0.0)
    connect = book.add(path("r2", role=pb.ROUTE_ROLE_CONNECT), now=0.0)
    pool = book.server_pool(accept.own_cids[0])
    assert pool is not None and pool(0) == accept.own_cids[1]
    assert book.server_pool(accept.own_cids[5]) is not None  # any of ours names the route
    assert book.server_pool(connect.own_cids[0]) is None  # a client's CIDs are not served
    assert book.server_pool(os.urandom(8)) is None  # direct tunnels keep random CIDs
    assert book.route_of_cid(connect.own_cids[3]) == connect
    assert book.uses(("192.0.2.9", 443)) and not book.uses(("192.0.2.9", 444))
    book.remove("r1")
    assert book.server_pool(accept.own_cids[0]) is None
    # A re-allocation of a route replaces its CIDs.
    again = book.add(path("r2", role=pb.ROUTE_ROLE_CONNECT), now=1.0)
    assert book.route_of_cid(connect.own_cids[0]) is None
    assert book.route_of_cid(again.own_cids[0]) == again


def test_peer_cids_before_and_after_the_route() -> None:
    book = RelayBook(early_ttl_s=30.0, max_early=2)
    early = cids(3)
    assert book.peer_cids("r1", early, now=10.0) is None  # kept for when r1 is added
    added = book.add(path("r1", role=pb.ROUTE_ROLE_CONNECT), now=20.0)
    assert added.peer_cids == early
    later = cids(3)
    updated = book.peer_cids("r1", later, now=21.0)
    assert updated is not None and updated.peer_cids == later == book.paths["r1"].peer_cids
    # Stale early pushes are not used; the buffer is bounded (oldest dropped).
    book.peer_cids("r2", cids(1), now=0.0)
    assert book.add(path("r2", role=pb.ROUTE_ROLE_CONNECT), now=31.0).peer_cids == ()
    for i, route in enumerate(("x", "y", "z")):
        book.peer_cids(route, cids(1), now=100.0 + i)
    assert list(book._early) == ["y", "z"]
    book.expire(now=200.0)
    assert book._early == {}


def test_check_cids_bounds() -> None:
    assert check_cids([b"\x07" * 8], what="x") == (b"\x07" * 8,)
    for bad in ([], [b"\x07" * 7], [b"\x07" * 9], [os.urandom(8) for _ in range(33)]):
        with pytest.raises(InvalidArgument):
            check_cids(bad, what="x")
