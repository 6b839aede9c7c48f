"""``NetBed.move``: a host switches uplinks in a running bed as a real move looks to the
programs on it: the old interface loses its addresses and goes down, the new one comes up
with its own addresses and the default routes follow; netlink tells listeners each step,
and the outside world sees the host at its new address (through the new NAT)."""

from __future__ import annotations

import ipaddress
import subprocess
import time

import pytest
from cyphonic_testbed import (
    Host,
    Link,
    Network,
    Router,
    TestbedError,
    Topology,
    TopologyError,
    move_nat_nat,
    move_v6_nat,
    plan,
)

pytestmark = pytest.mark.timeout(90)


def _addresses(node: object, ifname: str) -> list[str]:
    out = node.run(
        ["ip", "-o", "addr", "show", "dev", ifname, "scope", "global"],  # type: ignore[attr-defined]
        check=True,
    ).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


def _link_up(node: object, ifname: str) -> bool:
    out = node.run(["ip", "-o", "link", "show", "dev", ifname], check=True).stdout  # type: ignore[attr-defined]
    return "<" in out and ",UP" in out.split(">")[0]


def _default(node: object, family: int) -> str:
    return node.run(["ip", f"-{family}", "route", "show", "default"], check=True).stdout.strip()  # type: ignore[attr-defined]


def test_move_between_two_nat_networks_and_back(netbed: object) -> None:
    bed = netbed(move_nat_nat(services=()))  # type: ignore[operator]
    alice, bob = bed.host("alice"), bed.host("bob")
    gwa, gwc = bed.router("gwa"), bed.router("gwc")
    bob_v4 = bob.address("lanb", 4)
    echo = bob.udp_echo(443)

    # Built: on lana only; the standby uplink is down and bare, yet its address is known.
    assert alice.networks_up == ("lana",)
    assert _link_up(alice, "lana") and not _link_up(alice, "lanc")
    assert _addresses(alice, "lanc") == []
    assert alice.address("lanc", 4) == "192.168.3.10"
    assert alice.addresses(4) == ["192.168.1.10"] and alice.address(family=4) == "192.168.1.10"
    assert "via 192.168.1.1 dev lana" in _default(alice, 4)
    first = alice.udp_send([(bob_v4, 443)], b"before", sport=443)
    assert first.replies, first
    assert echo.wait_received(1)[0].src == gwa.address("wana", 4)

    # What a netlink listener in alice's namespace (the agent) sees during the move.
    monitor = alice.popen(
        ["ip", "-o", "monitor", "address", "route"], stdout=subprocess.PIPE, text=True
    )
    time.sleep(0.3)  # ip monitor subscribes right after it starts; nothing to wait on
    move = bed.move("alice", "lanc")
    assert (move.host, move.left, move.joined) == ("alice", ("lana",), "lanc")
    assert 0 <= move.detached_s <= move.attached_s
    sys_stdout = _stop(monitor)

    assert alice.networks_up == ("lanc",)
    assert not _link_up(alice, "lana") and _addresses(alice, "lana") == []
    assert _link_up(alice, "lanc") and _addresses(alice, "lanc") == ["192.168.3.10"]
    assert alice.addresses(4) == ["192.168.3.10"] and alice.address(family=4) == "192.168.3.10"
    assert "via 192.168.3.1 dev lanc" in _default(alice, 4)
    assert "192.168.1.1" not in alice.run(["ip", "-4", "route"], check=True).stdout
    assert "Deleted" in sys_stdout and "192.168.1.10/24" in sys_stdout, sys_stdout
    assert "192.168.3.10/24" in sys_stdout and "default via 192.168.3.1" in sys_stdout

    # The same socket port reaches bob at once, now through the other NAT.
    second = alice.udp_send([(bob_v4, 443)], b"after", sport=443)
    assert second.replies, second
    sources = [d.src for d in echo.wait_received(2)]
    assert sources[-1] == gwc.address("wanc", 4)

    # And back: the first network again, the standby one down and bare.
    bed.move("alice", "lana")
    assert alice.networks_up == ("lana",)
    assert _addresses(alice, "lanc") == [] and not _link_up(alice, "lanc")
    assert _addresses(alice, "lana") == ["192.168.1.10"]
    third = alice.udp_send([(bob_v4, 443)], b"back", sport=443)
    assert third.replies and echo.wait_received(3)[-1].src == gwa.address("wana", 4)


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    return out


def test_move_from_ipv6_only_to_ipv4_only_changes_the_family(netbed: object) -> None:
    bed = netbed(move_v6_nat(services=("trs",)))  # type: ignore[operator]
    alice, trs = bed.host("alice"), bed.host("trs")
    echo = trs.udp_echo(443)  # the enterprise firewalls let UDP 443 out (and no ICMP)
    v4, v6 = trs.address("cloud", 4), trs.address("cloud", 6)
    assert alice.addresses(6) == ["2001:db8:a::10"] and alice.addresses(4) == []
    assert alice.udp_send([(v6, 443)], b"v6", sport=443).replies
    assert not alice.udp_send([(v4, 443)], b"v4?", sport=443, wait=0.3).replies

    bed.move("alice", "lanc")
    assert alice.addresses(4) == ["192.168.3.10"] and alice.addresses(6) == []
    assert _default(alice, 6) == ""  # the IPv6 default route went with the link
    shown = alice.run(["ip", "-6", "-o", "addr", "show"], check=True).stdout
    assert "2001:db8:a::10" not in shown
    assert not any(
        ipaddress.ip_address(line.split()[3].split("/")[0]).is_global for line in shown.splitlines()
    ), shown
    # Reaching out works through the new NAT, and no longer in IPv6.
    sent = alice.udp_send([(v4, 443)], b"v4 now", sport=443)
    assert sent.replies and echo.wait_received(2)[-1].src == bed.router("gwc").address("wanc", 4)
    assert not alice.udp_send([(v6, 443)], b"v6?", sport=443, wait=0.3).replies

    bed.move("alice", "lana", gap=0.2)
    assert alice.addresses(6) == ["2001:db8:a::10"] and alice.addresses(4) == []
    assert alice.udp_send([(v6, 443)], b"v6 again", sport=443).replies
    assert echo.wait_received(3)[-1].src == "2001:db8:a::10"


def test_move_refuses_what_is_not_a_move(netbed: object) -> None:
    bed = netbed(move_nat_nat(services=()))  # type: ignore[operator]
    with pytest.raises(TestbedError, match="no link to network wanc"):
        bed.move("alice", "wanc")
    with pytest.raises(TestbedError, match="already on lana"):
        bed.move("alice", "lana")
    with pytest.raises(KeyError):
        bed.move("gwa", "lana")  # routers do not move
    assert bed.host("alice").networks_up == ("lana",)


def test_only_hosts_have_standby_links() -> None:
    with pytest.raises(TopologyError, match="only hosts have standby links"):
        plan(
            Topology(
                networks=[Network("a", ipv4="10.1.0.0/24"), Network("b", ipv4="10.2.0.0/24")],
                routers=[Router("r", networks=["a", Link("b", up=False)])],
            )
        )
    bed_plan = plan(
        Topology(
            networks=[Network("a", ipv4="10.1.0.0/24"), Network("b", ipv4="10.2.0.0/24")],
            routers=[Router("ra", networks=["a"]), Router("rb", networks=["b"])],
            hosts=[Host("h", networks=["a", Link("b", up=False)])],
        )
    )
    host = bed_plan.nodes["h"]
    assert host.networks_up == ("a",)
    assert [(r.via, r.dev) for r in host.routes] == [("10.1.0.1", "a")]
    assert [(r.via, r.dev) for r in bed_plan.host_routes("h", ["b"])] == [("10.2.0.1", "b")]
