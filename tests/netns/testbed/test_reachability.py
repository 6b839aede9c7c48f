"""Who can reach whom across the core router, per address family."""

from __future__ import annotations

import pytest
from cyphonic_testbed import double_nat, pattern1, v4_v6

pytestmark = pytest.mark.timeout(60)


def test_ipv4_only_and_ipv6_only_hosts_cannot_reach_each_other(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(v4_v6())
    alice, bob, as_ = bed.host("alice"), bed.host("bob"), bed.host("as")
    assert alice.addresses(6) == [] and bob.addresses(4) == []
    # No IPv6 at all on alice's interface, not even link-local.
    assert "inet6" not in alice.run(["ip", "-6", "addr", "show", "dev", "lana"]).stdout

    at_bob = bob.udp_echo(443)
    attempt = alice.udp_send([(bob.address(family=6), 443)], b"v4-to-v6", wait=0.3)
    assert attempt.replies == [] and attempt.errors  # refused locally: no IPv6 route
    assert at_bob.received() == []
    assert not alice.ping(bob.address(family=6), timeout=1)
    assert not bob.ping(alice.address(family=4), timeout=1)

    # Each reaches the dual-stack cloud in its own family, and the cloud reaches both.
    assert alice.ping(as_.address(family=4), timeout=1)
    assert bob.ping(as_.address(family=6), timeout=1)
    assert as_.ping(alice.address(family=4), timeout=1)
    assert as_.ping(bob.address(family=6), timeout=1)
    at_as = as_.udp_echo(443)
    assert alice.udp_send([(as_.address(family=4), 443)], b"a").replies
    assert bob.udp_send([(as_.address(family=6), 443)], b"b").replies
    assert {d.src for d in at_as.received()} == {alice.address(family=4), bob.address(family=6)}


def test_ping_across_the_internet_router_where_it_should(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(pattern1(firewall=None))
    alice, bob, as_, core = bed.host("alice"), bed.host("bob"), bed.host("as"), bed.router("core")
    assert alice.ping(bob.address(family=6), timeout=1)  # via core and gwb
    assert bob.ping(as_.address(family=6), timeout=1)
    assert core.ping(bob.address(family=6), timeout=1)
    # The hop count shows the path: alice -> core -> gwb -> bob.
    hops = alice.run(["ping", "-c", "1", "-W", "1", bob.address(family=6)], check=True).stdout
    assert "hlim=62" in hops or "ttl=62" in hops
    # IPv6-only end hosts have no IPv4 to use.
    assert alice.addresses(4) == [] and not alice.ping(as_.address(family=4), timeout=1)


def test_hosts_behind_two_nats_reach_the_cloud_but_not_each_other(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(double_nat(firewall=None))
    alice, bob, as_ = bed.host("alice"), bed.host("bob"), bed.host("as")
    assert alice.ping(as_.address(family=4), timeout=1)
    assert bob.ping(as_.address(family=4), timeout=1)
    assert not alice.ping(bob.address(family=4), timeout=1)  # a private address elsewhere
    gwb_outside = bed.router("gwb").address("wanb", 4)
    at_bob = bob.udp_echo(443)
    assert alice.udp_send([(gwb_outside, 443)], b"knock", wait=0.3).replies == []
    assert at_bob.received() == []
