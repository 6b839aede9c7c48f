"""Path MTU in namespaces: a 1,280-byte access link on alice's side, and no outer fragments.

    as, nms --cloud--+
                     core --lanb-- bob          (MTU 1500)
                     core --lana-- alice        (MTU 1280 on every interface of the link)

The core router counts and drops every IPv4 and IPv6 fragment before reassembly
(prerouting, ahead of conntrack's defragmentation), so anything that relied on outer
fragmentation would fail here. Then, as a user would: both agents come up (the AS and NMS
handshakes fit the 1,280-byte link), alice's agent fits its datagrams (1,252 bytes) to the link,
alice resolves bob and pings him with 1,400 bytes (her kernel fragments the inner packet
for her 1,222-byte TUN: inner fragments, carried whole), bob's DF ping of 1,300 bytes
gets ICMP "fragmentation needed" (mtu 1222) from his agent and his kernel then honours it,
a 1 MB TCP transfer each way arrives intact, and the router saw no fragment at all.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from cyphonic_testbed import Host, NetBed, Network, Router, Topology
from cyphonic_testbed.overlay import OverlayServices, start_services
from cyphonic_testbed.probes import marked_payload, sha256, tcp_transfer

pytestmark = [pytest.mark.netns, pytest.mark.timeout(420)]

LINK_MTU = 1280
FRAGMENT_RULES = """
table inet mtu_fragments {
    chain pre {
        type filter hook prerouting priority -450; policy accept;
        ip frag-off & 0x3fff != 0 counter drop
        meta nfproto ipv6 exthdr frag exists counter drop
    }
}
"""


def _topology() -> Topology:
    return Topology(
        name="mtu",
        networks=[
            Network("cloud", ipv4="10.94.0.0/24"),
            Network("lana", ipv4="10.94.1.0/24"),
            Network("lanb", ipv4="10.94.2.0/24"),
        ],
        routers=[Router("core", networks=["cloud", "lana", "lanb"])],
        hosts=[
            Host("as", networks=["cloud"]),
            Host("nms", networks=["cloud"]),
            Host("alice", networks=["lana"]),
            Host("bob", networks=["lanb"]),
        ],
    )


def _narrow(bed: NetBed, network: str, mtu: int) -> None:
    """Set ``mtu`` on every interface of ``network``: its segment and both ends."""
    segment = bed.network(network)
    links = segment.run(["ip", "-o", "link", "show"], check=True).stdout
    for name in re.findall(r"^\d+: ([^:@]+)", links, re.M):
        if name != "lo":
            segment.run(["ip", "link", "set", name, "mtu", str(mtu)], check=True)
    for node in (bed.host("alice"), bed.router("core")):
        node.run(["ip", "link", "set", node.interface(network), "mtu", str(mtu)], check=True)


def _fragments_seen(bed: NetBed) -> list[int]:
    out = bed.router("core").run(["nft", "list", "table", "inet", "mtu_fragments"]).stdout
    return [int(n) for n in re.findall(r"counter packets (\d+)", out)]


def _log_field(text: str, event: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            record = json.loads(line)
            if record.get("event") == event:
                return str(record[name])
    raise AssertionError(f"no {event} logged")


def test_small_access_link_without_fragments(netbed: Any, tmp_path: Path) -> None:
    bed: NetBed = netbed(_topology())
    _narrow(bed, "lana", LINK_MTU)
    bed.router("core").run(["nft", "-f", "-"], input=FRAGMENT_RULES, check=True)
    os.chmod(tmp_path, 0o755)
    services: OverlayServices = start_services(bed, workdir=tmp_path / "overlay")
    try:
        states = services.enrol_all([bed.host("alice"), bed.host("bob")])
        alice = services.start_agent(bed.host("alice"), states["alice"])
        bob = services.start_agent(bed.host("bob"), states["bob"])
        alice.wait_up()
        bob.wait_up()

        # alice fits her datagrams and TUN to her link; bob keeps the configured sizes.
        log = alice.log_text()
        assert _log_field(log, "agent_starting", "max_datagram_size") == str(LINK_MTU - 28)
        assert _log_field(log, "agent_starting", "tun_mtu") == "1280"  # IPv6's minimum
        assert alice.status()["mtu"] == 1280
        assert bob.status()["mtu"] == 1420

        bob_vip = alice.resolve(bob.fqdn)[0]
        alice_vip = bob.resolve(alice.fqdn)[0]
        a, b = bed.host("alice"), bed.host("bob")

        # 1,400 bytes from alice: inner fragments for her TUN, each carried in one datagram.
        big = a.run(["ping", "-c", "3", "-i", "0.3", "-W", "3", "-s", "1400", bob_vip])
        assert big.returncode == 0, big.stdout + big.stderr

        # bob's DF ping above what the tunnel to alice carries: ICMP "fragmentation needed"
        # from his agent, which his kernel keeps for alice's address ...
        df = b.run(["ping", "-c", "3", "-i", "0.3", "-W", "2", "-M", "do", "-s", "1300", alice_vip])
        assert "mtu = 1222" in df.stdout + df.stderr or "mtu=1222" in df.stdout + df.stderr, (
            df.stdout + df.stderr
        )
        cached = b.run(["ip", "route", "get", alice_vip], check=True).stdout
        assert "mtu 1222" in cached, cached
        # ... so the same size without DF now leaves fragmented to fit, and gets answered.
        fits = b.run(["ping", "-c", "3", "-i", "0.3", "-W", "3", "-s", "1400", alice_vip])
        assert fits.returncode == 0, fits.stdout + fits.stderr

        # TCP both ways, full-size segments: the MSS follows the TUN and the ICMP.
        payload = marked_payload(b"MTU-TEST", 1_000_000)
        digest = sha256(payload)
        assert (
            tcp_transfer(a, b, listen=bob_vip, connect=bob_vip, payload=payload, port=9101)
            == digest
        )
        assert (
            tcp_transfer(b, a, listen=alice_vip, connect=alice_vip, payload=payload, port=9102)
            == digest
        )

        seen = _fragments_seen(bed)
        assert seen == [0, 0], f"fragments crossed the router: {seen}"
        sys.stderr.write(
            f"\nMTU {LINK_MTU} access link: alice datagram {LINK_MTU - 28}, tunnel MTU 1222; "
            f"fragments at the router {seen}\n"
        )
    finally:
        for agent in services.agents:
            sys.stderr.write(f"\n--- agent {agent.name} (tail) ---\n{agent.log_text()[-3000:]}\n")
        services.stop()
