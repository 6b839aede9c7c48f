"""NAT behaviour with real packets: endpoint-independent mapping keeps the outside port for
every destination; symmetric mapping picks a new one per destination; both filter inbound
traffic to the endpoints the inside host has sent to."""

from __future__ import annotations

import time

import pytest
from cyphonic_testbed import FirewallPolicy, NatMapping, double_nat, pattern2

pytestmark = pytest.mark.timeout(60)

SPORT = 40000


def test_eim_nat_keeps_the_outside_port_for_two_destinations(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(pattern2(nat=NatMapping.ENDPOINT_INDEPENDENT))
    alice, bob, as_ = bed.host("alice"), bed.host("bob"), bed.host("as")
    outside = bed.router("gwa").address("wana", 4)
    at_bob, at_as = bob.udp_echo(443), as_.udp_echo(443)

    result = alice.udp_send(
        [(bob.address(family=4), 443), (as_.address(family=4), 443)], b"eim", sport=SPORT
    )
    assert len(result.replies) == 2  # replies found their way back through the NAT
    (seen_bob,), (seen_as,) = at_bob.wait_received(1), at_as.wait_received(1)
    assert seen_bob.src == seen_as.src == outside  # translated to the NAT's address
    assert seen_bob.sport == seen_as.sport  # same mapping whatever the destination


def test_symmetric_nat_changes_the_outside_port_per_destination(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(double_nat(nat=NatMapping.SYMMETRIC))
    alice, as_, nms = bed.host("alice"), bed.host("as"), bed.host("nms")
    outside = bed.router("gwa").address("wana", 4)
    at_as, at_nms = as_.udp_echo(443), nms.udp_echo(443)

    result = alice.udp_send(
        [(as_.address(family=4), 443), (nms.address(family=4), 443)], b"sym", sport=SPORT
    )
    assert len(result.replies) == 2
    (seen_as,), (seen_nms,) = at_as.wait_received(1), at_nms.wait_received(1)
    assert seen_as.src == seen_nms.src == outside
    # A random port per mapping: equal only by a 1-in-64k accident.
    assert seen_as.sport != seen_nms.sport


@pytest.mark.parametrize("nat", list(NatMapping))
def test_inbound_reaches_the_inside_only_from_the_endpoint_it_sent_to(  # type: ignore[no-untyped-def]
    netbed, nat: NatMapping
) -> None:
    bed = netbed(pattern2(nat=nat))
    alice, bob, as_ = bed.host("alice"), bed.host("bob"), bed.host("as")
    bob_addr = bob.address(family=4)
    at_bob = bob.udp_echo(443, echo=False)
    # alice's socket on SPORT says hello to bob:443 and keeps listening.
    at_alice = alice.udp_echo(SPORT, echo=False, hello=[(bob_addr, 443)])
    (hello,) = at_bob.wait_received(1)
    mapped = (hello.src, hello.sport)
    at_bob.stop()  # frees bob's port 443 for the senders below; the NAT mapping stays

    # From a third party to the very same outside address and port: filtered.
    as_.udp_send([mapped], b"stranger", sport=443, wait=0.3)
    # From bob, but another source port: filtered too (address- and port-dependent).
    bob.udp_send([mapped], b"other-port", sport=8443, wait=0.3)
    # From the endpoint alice sent to: delivered.
    bob.udp_send([mapped], b"from-bob", sport=443, wait=0.3)
    got = at_alice.wait_received(1)
    time.sleep(0.2)
    assert [d.payload for d in at_alice.received()] == [b"from-bob"]
    assert got[0].src == bob_addr and got[0].sport == 443


def test_nat_hides_the_private_network_and_its_firewall_still_applies(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(pattern2(firewall=FirewallPolicy.ENTERPRISE))
    alice, bob, gwa = bed.host("alice"), bed.host("bob"), bed.router("gwa")
    inside = alice.udp_echo(443)
    # No route to a private address from the internet, and no port forwarding on the NAT.
    assert bob.udp_send([(alice.address(family=4), 443)], b"direct", wait=0.3).replies == []
    assert bob.udp_send([(gwa.address("wana", 4), 443)], b"to-nat", wait=0.3).replies == []
    assert not bob.ping(alice.address(family=4), timeout=1)
    # Out through NAT + firewall: UDP 4501 is dropped, UDP 443 passes.
    legacy, quic = bob.udp_echo(4501), bob.udp_echo(443)
    assert alice.udp_send([(bob.address(family=4), 4501)], b"x", wait=0.3).replies == []
    assert legacy.received() == []
    assert [r.payload for r in alice.udp_send([(bob.address(family=4), 443)], b"y").replies] == [
        b"y"
    ]
    assert quic.received()[0].src == gwa.address("wana", 4)
    assert inside.received() == []
