"""Carrier-grade NAT safety in namespaces: the host's own network overlaps the overlay pool.

    as, nms --cloud--+
                     core --wana-- gwa (NAT) --lana 100.64.0.0/10-- alice (100.64.0.10)
                     core --lanb-- bob                       gateway 100.64.0.1

alice's LAN is the shared address space of carrier-grade NAT, wider than the overlay pool
(100.64.0.0/16, the NMS default). As a user would: ``cyphonic-agent up`` on both; alice
still reaches her gateway and a host beyond it (bob's real address, through the NAT),
and reaches bob over the overlay by name (a host route for bob into her TUN, her LAN's
/10 left alone). bob, whose LAN does not overlap, routes the whole pool into his TUN until
his host gains an address in the pool (100.64.128.1/17 added to his LAN
interface): his agent
re-plans at once and leaves that half to the host, and still reaches alice. Last, the true
clash: alice's host takes the virtual address the overlay leased her on her LAN, and
``up`` exits non-zero naming both prefixes.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from cyphonic_testbed import Host, NatMapping, NetBed, Network, Router, Topology
from cyphonic_testbed.overlay import OverlayServices, start_services
from cyphonic_testbed.wait import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.timeout(420)]

POOL = "100.64.0.0/16"
LAN = "100.64.0.0/10"
GATEWAY = "100.64.0.1"


def _topology() -> Topology:
    return Topology(
        name="cgnat",
        networks=[
            Network("cloud", ipv4="10.95.0.0/24"),
            Network("wana", ipv4="198.51.100.0/26"),
            Network("lana", ipv4=LAN),
            Network("lanb", ipv4="203.0.113.0/24"),
        ],
        routers=[
            Router("core", networks=["cloud", "wana", "lanb"]),
            Router(
                "gwa", networks=["wana", "lana"], uplink="wana", nat=NatMapping.ENDPOINT_INDEPENDENT
            ),
        ],
        hosts=[
            Host("as", networks=["cloud"]),
            Host("nms", networks=["cloud"]),
            Host("alice", networks=["lana"]),
            Host("bob", networks=["lanb"]),
        ],
    )


def _ping(node: Any, address: str, *, count: int = 3) -> bool:
    result = node.run(["ping", "-c", str(count), "-i", "0.3", "-W", "3", address], timeout=30)
    return bool(result.returncode == 0)


def _device_of(node: Any, address: str) -> str:
    out = node.run(["ip", "route", "get", address], check=True).stdout
    match = re.search(r"\bdev (\S+)", out)
    assert match, out
    return match.group(1)


def _tun_routes(node: Any, tun: str) -> list[str]:
    out = node.run(["ip", "-4", "route", "show", "dev", tun], check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def test_cgnat_lan_keeps_its_gateway(netbed: Any, tmp_path: Path) -> None:
    bed: NetBed = netbed(_topology())
    a, b = bed.host("alice"), bed.host("bob")
    assert a.address("lana") == "100.64.0.10"
    os.chmod(tmp_path, 0o755)
    services: OverlayServices = start_services(bed, workdir=tmp_path / "overlay")
    try:
        states = services.enrol_all([a, b])
        bob_real = b.address("lanb")
        assert _ping(a, GATEWAY) and _ping(a, bob_real)  # before: the LAN works

        alice = services.start_agent(a, states["alice"])
        bob = services.start_agent(b, states["bob"])
        alice.wait_up()
        bob.wait_up()
        assert "overlay_pool_shadowed" in alice.log_text()
        tun = alice.status()["tun"]

        # After up: the gateway, the host beyond it, and the LAN prefix stay the host's.
        assert _ping(a, GATEWAY), "alice lost her gateway"
        assert _ping(a, bob_real), "alice lost the host beyond her gateway"
        assert _device_of(a, GATEWAY) == a.interface("lana")
        assert _tun_routes(a, tun) == []  # her /10 covers the whole pool: nothing routed yet

        # The overlay by name: a host route for bob into her TUN, before the DNS answer.
        bob_vip = alice.resolve(bob.fqdn)[0]
        assert _device_of(a, bob_vip) == tun
        assert _tun_routes(a, tun) == [bob_vip]
        assert _ping(a, bob_vip), "alice cannot reach bob over the overlay"
        alice_vip = alice.status()["virtual_ipv4"]
        assert ipaddress.ip_address(alice_vip) in ipaddress.ip_network(POOL)

        # bob: no overlap, the whole pool into his TUN; then his host gains half the pool.
        bob_tun = bob.status()["tun"]
        assert _tun_routes(b, bob_tun) == [POOL]
        b.run(["ip", "addr", "add", "100.64.128.1/17", "dev", b.interface("lanb")], check=True)
        wait_for(
            lambda: "100.64.0.0/17" in _tun_routes(b, bob_tun),
            30,
            interval=0.2,
            message="bob's TUN routes re-planned",
        )
        routes = _tun_routes(b, bob_tun)
        assert POOL not in routes and "100.64.128.0/17" not in routes
        upper = ipaddress.ip_address(alice_vip) in ipaddress.ip_network("100.64.128.0/17")
        assert (alice_vip in routes) == upper  # alice's own host route where the pool was cut
        assert _ping(b, alice_vip), "bob cannot reach alice after re-planning"

        # The true clash: the host holds the virtual address the overlay leased it.
        assert alice.stop() == 0
        a.run(["ip", "addr", "add", f"{alice_vip}/10", "dev", a.interface("lana")], check=True)
        again = services.start_agent(a, states["alice"])
        code = again.wait_exit(90)
        text = again.log_text()
        assert code != 0, text[-2000:]
        assert f"{alice_vip} (overlay pool {POOL})" in text and f"({LAN})" in text, text[-2000:]
        sys.stderr.write(f"\nclash refused: {text.strip().splitlines()[-1]}\n")
        assert _ping(a, GATEWAY)  # and nothing was left behind
    finally:
        for agent in services.agents:
            sys.stderr.write(f"\n--- agent {agent.name} (tail) ---\n{agent.log_text()[-3000:]}\n")
        services.stop()
