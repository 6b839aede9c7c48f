"""Address pools: parsing, defaults, deterministic proposals, free-address scan."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_network

import pytest
from cyphonic.errors import Exhausted, InvalidArgument
from cyphonic_nms.leases import (
    HASHED_ATTEMPTS,
    AddressPool,
    LeasePools,
    default_ipv6_prefix,
    exhausted,
)


def test_default_pools() -> None:
    pools = LeasePools.from_settings(ipv4=None, ipv6=None, domain="cyphonic.internal")
    assert pools.ipv4.network == ip_network("100.64.0.0/16")
    assert pools.ipv4.network.subnet_of(ip_network("100.64.0.0/10"))  # type: ignore[arg-type]
    assert pools.ipv6.prefix_len == 48
    assert pools.ipv6.network.subnet_of(ip_network("fd00::/8"))  # type: ignore[arg-type]


def test_default_ula_is_stable_and_per_domain() -> None:
    a = default_ipv6_prefix("cyphonic.internal")
    assert a == default_ipv6_prefix("CYPHONIC.internal")
    assert a != default_ipv6_prefix("other.example")
    assert isinstance(a, IPv6Network) and a.prefixlen == 48


def test_bad_pools_are_refused() -> None:
    for text in ("100.64.0.1/16", "not-a-net", "10.0.0.0/31"):
        with pytest.raises(InvalidArgument):
            AddressPool.parse(text)
    with pytest.raises(InvalidArgument):
        LeasePools.from_settings(ipv4="fd00::/64", ipv6=None, domain="d")


def test_pool_excludes_first_and_last() -> None:
    pool = AddressPool.parse("10.9.0.0/29")
    assert pool.size == 6
    leasable = [pool.address_at(i) for i in range(pool.size)]
    assert leasable[0] == IPv4Address("10.9.0.1") and leasable[-1] == IPv4Address("10.9.0.6")
    assert IPv4Address("10.9.0.0") not in pool and IPv4Address("10.9.0.7") not in pool
    assert IPv4Address("10.9.0.3") in pool and IPv6Address("::1") not in pool
    with pytest.raises(IndexError):
        pool.address_at(6)


def test_proposals_are_deterministic_inside_the_pool_and_vary() -> None:
    pools = LeasePools.from_settings(ipv4="100.64.0.0/16", ipv6="fd12:3456:789a::/48", domain="d")
    first = list(pools.proposals("node-1"))
    assert first == list(pools.proposals("node-1"))
    assert len(first) == HASHED_ATTEMPTS
    assert all(v4 in pools.ipv4 and v6 in pools.ipv6 for v4, v6 in first)
    assert len({v4 for v4, _ in first}) > 1
    assert first[0] != next(iter(pools.proposals("node-2")))


def test_hashed_proposals_spread() -> None:
    pool = AddressPool.parse("100.64.0.0/16")
    firsts = {pool.hashed(f"node-{i}", 0) for i in range(200)}
    assert len(firsts) >= 199  # a collision or two is what the retry is for


def test_free_scan_skips_used_and_ends() -> None:
    pool = AddressPool.parse("10.9.0.0/29")
    used = [pool.address_at(i) for i in (0, 1, 2, 4, 5)]
    assert list(pool.free(used, start_key="x")) == [pool.address_at(3)]
    assert list(pool.free([*used, pool.address_at(3)])) == []


def test_exhausted_message_names_pool_and_setting() -> None:
    error = exhausted(AddressPool.parse("10.9.0.0/29"))
    assert isinstance(error, Exhausted)
    assert "10.9.0.0/29" in error.message and "CYPHONIC_IPV4_POOL" in error.message
