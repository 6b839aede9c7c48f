"""Mobility end to end, nothing mocked: a node's real address changes while a TCP stream
and a 10 ms ping stream run over the overlay, and the flows survive.

The move is real as the agent sees it (``NetBed.move``): the host's uplink loses its
addresses and goes down, another uplink comes up with new addresses and a new default
route. AS, NMS and TRS run in the cloud (embedded default); alice and bob run
``cyphonic-agent up``; alice sets up the route by a DNS lookup of bob's name.

(a) ``nat-to-nat``: alice moves between two IPv4 NAT networks (NAT + enterprise firewall
    each) and back, bob is on a global IPv4 address: pattern 2 before and after; alice's
    client-role connection migrates and bob sees her at her new NAT's address; captures
    on both NATs' outsides show that the packets after the move carry destination
    connection IDs never used before it (a fresh CID on the new path).
(b) ``v6-to-nat``: alice moves from a global IPv6 network (behind the enterprise firewall)
    to an IPv4 NAT network, bob is IPv6 only: pattern 2 (her firewall lets nothing in, so
    she connects out) becomes pattern 3 through the TRS; then she moves back and the route
    is direct again (decided at once, before the new reachability probe's verdict).
(c) ``server-move``: bob, who accepted alice's tunnel (she is behind a NAT), moves to another
    global IPv4 network and back: the tunnel is rebuilt through the NMS to his new address.

In each, after each move: the TCP stream completed with every byte correct (SHA-256 of the
receiver = the sender's), the mover's virtual addresses are unchanged (its status and the
peer's DNS answers), the route shows the expected pattern and path, the mover logged the
move, and the NMS admin API shows its new addresses. The interruption figures are printed
(bench/mobility.py measures them; no timed assertion here).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from cyphonic.hostport import format_host_port
from cyphonic_testbed import Capture, wait_for
from cyphonic_testbed.interruption import measure_move
from cyphonic_testbed.mobility import CASES, MobileOverlay, open_route, peer_row

pytestmark = [pytest.mark.netns, pytest.mark.timeout(360)]

ROUTE_SETTLE_S = 20.0

CID_LENGTH = 8  # the connection ID length of the project's QUIC endpoints


def _short_header_dcids(capture: Capture, dst: str) -> set[bytes]:
    """Destination connection IDs of the 1-RTT (short header) packets sent to ``dst``:443.
    With UDP GSO a frame holds several datagrams; the first one's header is enough."""
    return {
        p.payload[1 : 1 + CID_LENGTH]
        for p in capture.packets()
        if p.protocol == "udp"
        and p.dst == dst
        and p.dport == 443
        and len(p.payload) > CID_LENGTH
        and p.payload[0] & 0xC0 == 0x40
    }


@contextlib.contextmanager
def _cids_on_both_uplinks(
    o: MobileOverlay,
    case: str,
    number: int,
) -> Iterator[dict[str, Capture] | None]:
    """For alice's first NAT-to-NAT move: captures on both NATs' outsides."""
    if case != "nat-to-nat" or number != 1:
        yield None
        return
    gwa, gwc = o.bed.router("gwa"), o.bed.router("gwc")
    with gwa.capture("wana", "udp port 443") as old, gwc.capture("wanc", "udp port 443") as new:
        yield {"old": old, "new": new}


def _hostport(host: str) -> str:
    return format_host_port(host, 443)


def _expected_paths(o: MobileOverlay, case: str, to: str) -> tuple[str | None, str | None]:
    """(the path alice shows for bob, the path bob shows for alice) after moving onto
    ``to``; None: checked otherwise (a relayed path names the TRS)."""
    bed = o.bed
    if case == "nat-to-nat":
        gw = {"lana": "gwa", "lanc": "gwc"}[to]
        wan = {"lana": "wana", "lanc": "wanc"}[to]
        return (
            _hostport(bed.host("bob").address("lanb", 4)),
            _hostport(bed.router(gw).address(wan, 4)),
        )
    if case == "v6-to-nat":
        if to == "lanc":
            return None, None
        return (
            _hostport(bed.host("bob").address("lanb", 6)),
            _hostport(bed.host("alice").address("lana", 6)),
        )
    return (
        _hostport(bed.host("bob").address(to, 4)),
        _hostport(bed.router("gwa").address("wana", 4)),
    )


def _settled(
    o: MobileOverlay,
    pattern: str,
    paths: tuple[str | None, str | None],
) -> dict[str, Any] | None:
    mine, theirs = peer_row(o.alice, o.bob), peer_row(o.bob, o.alice)
    if mine is None or theirs is None:
        return None
    if (mine.get("state"), mine.get("pattern")) != ("up", pattern):
        return None
    if theirs.get("state") != "up":
        return None
    # alice reaches bob at his port 443; bob sees alice at whatever port her NAT chose.
    if paths[0] is not None and mine.get("path") != paths[0]:
        return None
    if (
        paths[1] is not None
        and str(theirs.get("path", "")).rsplit(":", 1)[0] != paths[1].rsplit(":", 1)[0]
    ):
        return None
    for row, path in ((mine, paths[0]), (theirs, paths[1])):
        if path is None and not str(row.get("path", "")).startswith("via "):
            return None
    return {"alice": mine, "bob": theirs}


@pytest.mark.parametrize("name", list(CASES))
def test_the_flow_survives_the_move(mobile: Any, name: str) -> None:
    case = CASES[name]
    o: MobileOverlay = mobile(case)
    mover = o.agents[case.mover]
    other = o.bob if case.mover == "alice" else o.alice
    mover_node = o.bed.host(case.mover)

    # alice's lookup sets up the route; bob's virtual IPv4 is where the flows go.
    bob_v4 = open_route(o)
    first = _settled(o, case.pattern, _expected_paths(o, name, mover_node.networks_up[0]))
    assert first is not None, (peer_row(o.alice, o.bob), peer_row(o.bob, o.alice))
    identity = mover.status()
    virtual = (identity["virtual_ipv4"], identity["virtual_ipv6"])

    for number, step in enumerate(case.steps, start=1):
        with _cids_on_both_uplinks(o, name, number) as wires:
            result = measure_move(
                src=o.bed.host("alice"),
                dst=o.bed.host("bob"),
                address=bob_v4,
                move=lambda to=step.to: o.bed.move(case.mover, to),
            )
        sys.stderr.write(
            f"\n{name} move {number} -> {step.to}: ping gap {result.ping_gap_ms} ms "
            f"({result.ping.received}/{result.ping.sent} replies), TCP stall "
            f"{result.tcp_stall_ms:.0f} ms, {result.tcp_bytes} bytes, intact "
            f"{result.tcp_intact} (target {step.target_ms:.0f} ms)\n"
        )

        # Every byte arrived, unchanged and in order, over the one TCP connection.
        assert result.tcp_intact, (result.sender, result.receiver)

        # Same virtual addresses: in the mover's status and in the peer's DNS answers.
        now = mover.status()
        assert (now["virtual_ipv4"], now["virtual_ipv6"]) == virtual
        assert other.resolve(mover.fqdn, "A") == [virtual[0]]
        assert other.resolve(mover.fqdn, "AAAA") == [virtual[1]]

        # The route settled on the pattern and path of the new network.
        paths = _expected_paths(o, name, step.to)
        try:
            rows = wait_for(
                lambda paths=paths, step=step: _settled(o, step.pattern, paths),
                ROUTE_SETTLE_S,
                interval=0.5,
            )
        except TimeoutError as exc:
            raise AssertionError(
                f"route not {step.pattern} with paths {paths} after the move to {step.to}: "
                f"alice shows {peer_row(o.alice, o.bob)}, bob {peer_row(o.bob, o.alice)}"
            ) from exc
        assert rows["alice"]["rx_packets"] > 0

        if wires is not None:
            # The migrated connection uses a fresh connection ID on the new path: nothing
            # on the wire links the packets before the move to those after it.
            bob_real = o.bed.host("bob").address("lanb", 4)
            before = _short_header_dcids(wires["old"], bob_real)
            after = _short_header_dcids(wires["new"], bob_real)
            assert before and after, (len(wires["old"].packets()), len(wires["new"].packets()))
            assert not before & after, [c.hex() for c in before & after]

        # The mover noticed, and the NMS knows where it is now.
        mover.wait_logged('"event": "moved"', timeout=10, count=number)
        new_addresses = mover_node.addresses(4) + mover_node.addresses(6)
        # ... and its status shows the handover, old path and new.
        status = mover.status()
        last = status["last_handover"]
        assert status["handovers"] >= number and last is not None, status
        assert set(new_addresses) <= set(last["new"]["addresses"]), last
        assert not set(new_addresses) & set(last["old"]["addresses"]), last

        def registered(new: list[str] = new_addresses) -> bool:
            view = o.services.nms_get(f"/v1/nodes/{mover.fqdn}")
            local = " ".join((view.get("network") or {}).get("local_addresses", []))
            return bool(view["online"]) and all(a in local for a in new)

        wait_for(registered, 15, interval=0.5, message="the NMS showing the new addresses")
        view = o.services.nms_get(f"/v1/nodes/{mover.fqdn}")
        assert (view["virtual_ipv4"], view["virtual_ipv6"]) == virtual
