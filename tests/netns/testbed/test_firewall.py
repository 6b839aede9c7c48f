"""The enterprise firewall with real packets (pattern1: bob's global IPv6 network behind gwb).

Out: TCP 80/443 and UDP 443 only; in: replies only. The NO_UDP variant drops UDP 443 too.
"""

from __future__ import annotations

import re
import time

import pytest
from cyphonic_testbed import FirewallPolicy, NetBed, pattern1

pytestmark = pytest.mark.timeout(60)

QUIET = 0.5  # seconds a listener must stay silent for "dropped"


def _drops(bed: NetBed) -> int:
    out = (
        bed.router("gwb")
        .run(["nft", "list", "chain", "inet", "cytb_fw", "forward"], check=True)
        .stdout
    )
    match = re.search(r"counter packets (\d+) bytes \d+ drop", out)
    assert match, out
    return int(match.group(1))


def test_udp_443_passes_with_replies_and_udp_4501_is_dropped(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(pattern1())
    alice, bob, gwb = bed.host("alice"), bed.host("bob"), bed.router("gwb")
    target = alice.address(family=6)
    quic = alice.udp_echo(443)
    legacy = alice.udp_echo(4501)

    with gwb.capture("lanb", "udp") as inside, gwb.capture("wanb", "udp") as outside:
        ok = bob.udp_send([(target, 443)], b"through-443")
        assert [r.payload for r in ok.replies] == [b"through-443"]  # the reply came back in
        assert [d.payload for d in quic.received()] == [b"through-443"]
        assert quic.received()[0].src == bob.address(family=6)  # routed, not translated

        before = _drops(bed)
        blocked = bob.udp_send([(target, 4501)], b"legacy-4501", wait=QUIET)
        assert blocked.replies == []
        assert legacy.received() == []
        assert _drops(bed) > before

    # The datagram reached the firewall from inside and never left it.
    assert inside.contains(b"legacy-4501")
    assert not outside.contains(b"legacy-4501")
    assert outside.contains(b"through-443")


def test_unsolicited_inbound_is_dropped(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(pattern1())
    alice, bob, gwb = bed.host("alice"), bed.host("bob"), bed.router("gwb")
    listener = bob.udp_echo(443)
    tcp = bob.tcp_listen(443)
    bob_addr = bob.address(family=6)

    assert alice.udp_send([(bob_addr, 443)], b"unsolicited", wait=QUIET).replies == []
    assert alice.tcp_connect(bob_addr, 443, timeout=1.0) is None
    assert not alice.ping(bob_addr, timeout=1)
    assert not bed.host("as").ping(bob_addr, timeout=1)
    time.sleep(0.2)
    assert listener.received() == [] and tcp.received() == []

    # Control: the same listeners answer the firewall itself (no forwarding involved).
    assert gwb.udp_send([(bob_addr, 443)], b"local").replies[0].payload == b"local"
    assert gwb.tcp_connect(bob_addr, 443) == b"cytb-probe"


def test_tcp_web_ports_pass_other_tcp_and_icmp_do_not(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(pattern1())
    alice, bob = bed.host("alice"), bed.host("bob")
    target = alice.address(family=6)
    for port in (80, 443, 8080):
        alice.tcp_listen(port)
    assert bob.tcp_connect(target, 443) == b"cytb-probe"
    assert bob.tcp_connect(target, 80) == b"cytb-probe"
    assert bob.tcp_connect(target, 8080, timeout=1.0) is None
    assert not bob.ping(target, timeout=1)
    # Outside the firewall ICMP is fine: the core routes it.
    assert alice.ping(bed.host("as").address(family=6), timeout=1)


def test_no_udp_variant_drops_udp_443_but_passes_tcp_443(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(pattern1(firewall=FirewallPolicy.ENTERPRISE_NO_UDP))
    alice, bob = bed.host("alice"), bed.host("bob")
    target = alice.address(family=6)
    udp = alice.udp_echo(443)
    alice.tcp_listen(443)
    assert bob.udp_send([(target, 443)], b"quic", wait=QUIET).replies == []
    assert udp.received() == []
    assert bob.tcp_connect(target, 443) == b"cytb-probe"


def test_without_a_firewall_everything_is_routed(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(pattern1(firewall=None))
    alice, bob = bed.host("alice"), bed.host("bob")
    legacy = bob.udp_echo(4501)
    reply = alice.udp_send([(bob.address(family=6), 4501)], b"direct")
    assert [r.payload for r in reply.replies] == [b"direct"]
    assert legacy.received()[0].src == alice.address(family=6)
    assert alice.ping(bob.address(family=6), timeout=1)
