"""How the agent's status snapshot is built from its parts (``status.peer_rows``,
``handover_status``, ``registered_addresses``): pure functions, no agent needed."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_agent.mobility import Handover, HostPath
from cyphonic_agent.routes import PeerRoute, RouteState
from cyphonic_agent.status import (
    PathFacts,
    PeerStatus,
    handover_status,
    peer_rows,
    registered_addresses,
)


@dataclass
class _Tunnel:
    row: PeerStatus

    def status(self) -> PeerStatus:
        return PeerStatus(**{f: getattr(self.row, f) for f in PeerStatus.__dataclass_fields__})


@dataclass
class _Live:
    tunnel: _Tunnel


def _route(fqdn: str, state: RouteState, **kw: object) -> PeerRoute[_Live]:
    return PeerRoute(fqdn=fqdn, state=state, since=0.0, **kw)  # type: ignore[arg-type]


def test_rows_sorted_live_tunnels_own_row_others_establishing() -> None:
    up = _route(
        "b.example",
        RouteState.UP,
        route_id="r-up",
        pattern=pb.ROUTE_PATTERN_DIRECT,
        tunnel=_Live(_Tunnel(PeerStatus(fqdn="b.example", state="up", path="192.0.2.7:443"))),
    )
    waiting = _route(
        "a.example",
        RouteState.REQUESTED,
        pattern=pb.ROUTE_PATTERN_RELAY,
        addresses=frozenset({bytes([100, 64, 0, 9]), ipaddress.IPv6Address("fd00::9").packed}),
    )
    rows = peer_rows([up, waiting], relayed_label=lambda _route_id: None)
    assert [r.fqdn for r in rows] == ["a.example", "b.example"]
    assert (rows[0].state, rows[0].pattern) == ("establishing", "relay")
    assert (rows[0].virtual_ipv4, rows[0].virtual_ipv6) == ("100.64.0.9", "fd00::9")
    assert (rows[1].state, rows[1].path) == ("up", "192.0.2.7:443")


def test_a_relayed_route_shows_the_trs_label_as_its_path() -> None:
    up = _route(
        "b.example",
        RouteState.UP,
        route_id="r-relay",
        tunnel=_Live(_Tunnel(PeerStatus(fqdn="b.example", state="up", path="10.0.0.1:443"))),
    )
    labels = {"r-relay": "via 198.51.100.9:443 (trs)"}
    [row] = peer_rows([up], relayed_label=labels.get)
    assert row.path == "via 198.51.100.9:443 (trs)"


def _relayed(reason: str = "both nodes are behind IPv4 NAT: relayed") -> PeerRoute[_Live]:
    return _route(
        "b.example",
        RouteState.UP,
        route_id="r-relay",
        pattern=pb.ROUTE_PATTERN_RELAY,
        reason_code="hole_punching",
        reason=reason,
        tunnel=_Live(_Tunnel(PeerStatus(fqdn="b.example", state="up", path="203.0.113.6:443"))),
    )


LABELS = {"r-relay": "via 198.51.100.9:443 (trs)"}


def test_rows_say_why_direct_or_via_which_trs() -> None:
    [row] = peer_rows([_relayed()], relayed_label=LABELS.get)
    assert (row.direct, row.via, row.transport) == (False, "198.51.100.9:443 (trs)", "udp")
    assert (row.reason_code, row.reason) == (
        "hole_punching",
        "both nodes are behind IPv4 NAT: relayed",
    )
    # The same tunnel after hole punching: its own path, direct, and the words say how.
    facts = PathFacts(direct_now=True, punch="direct", direct_after_ms=412.0)
    [row] = peer_rows([_relayed()], relayed_label=LABELS.get, path_facts=lambda _l: facts)
    assert (row.path, row.direct, row.via, row.punch) == ("203.0.113.6:443", True, None, "direct")
    assert row.reason_code == "hole_punched"
    assert row.reason == "direct after hole punching (412 ms after the relay)"
    # Punching that found nothing, and a direct path that died.
    for punch, code in (("gave_up", "punch_failed"), ("relayed", "direct_path_lost")):
        lost = PathFacts(direct_now=False, punch=punch)
        [row] = peer_rows([_relayed()], relayed_label=LABELS.get, path_facts=lambda _l, f=lost: f)
        assert (row.direct, row.reason_code) == (False, code)


def test_establishing_rows_carry_the_nms_reason() -> None:
    waiting = _route(
        "a.example", RouteState.REQUESTED, reason_code="no_common_family", reason="no family"
    )
    [row] = peer_rows([waiting], relayed_label=LABELS.get)
    assert (row.reason_code, row.reason, row.direct) == ("no_common_family", "no family", None)


def test_handover_with_and_without_the_nms_view() -> None:
    assert handover_status(None, None) is None
    move = Handover(
        at=0.0,
        old=HostPath(addresses=frozenset({ipaddress.ip_address("192.0.2.1")})),
        new=HostPath(addresses=frozenset({ipaddress.ip_address("2001:db8::1")})),
    )
    shown = handover_status(move, None)
    assert shown == {
        "at": "1970-01-01T00:00:00.000+00:00",
        "old": {"addresses": ["192.0.2.1"], "default_routes": []},
        "new": {"addresses": ["2001:db8::1"], "default_routes": []},
    }
    network = pb.NetworkInfo(
        behind_nat=False,
        has_ipv6=True,
        observed_ipv6=pb.Endpoint(ip=ipaddress.IPv6Address("2001:db8::1").packed, port=443),
    )
    seen = handover_status(move, network)
    assert seen is not None
    assert seen["nms_network"] == {
        "behind_nat": False,
        "has_ipv4": False,
        "has_ipv6": True,
        "observed": ["[2001:db8::1]:443"],
    }


def test_registered_addresses() -> None:
    assert registered_addresses(None) == (None, None)
    reg = pb.RegisterResponse(virtual_ipv4=bytes([100, 64, 0, 2]))
    assert registered_addresses(reg) == ("100.64.0.2", None)
