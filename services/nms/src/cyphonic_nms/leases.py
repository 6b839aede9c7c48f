"""Virtual address pools: which IPv4 and IPv6 addresses a node may lease. Sans-I/O.

Uniqueness is not decided here: the database holds it (``address_leases.ipv4`` and ``.ipv6``
are unique) and the storage layer inserts the proposals this module makes, one after another,
until one is accepted. Proposals are derived from the node's key, so a node tends to land on
the same address even if its lease was lost, and concurrent registrations of different nodes
spread over the pool instead of racing for the lowest free address. After a few hashed
proposals the storage layer asks for a scan of the free addresses (small, crowded pools).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

from cyphonic.errors import Exhausted, InvalidArgument

DEFAULT_IPV4_POOL = "100.64.0.0/16"
HASHED_ATTEMPTS = 8


def default_ipv6_prefix(domain: str) -> IPv6Network:
    """A stable ULA /48 for a deployment: ``fd`` + 40 bits of SHA-256 of the domain.

    RFC 4193 asks for a random Global ID; a hash of the domain is as unlikely to clash with
    another deployment's and needs no stored state.
    """
    digest = hashlib.sha256(domain.lower().encode()).digest()
    raw = b"\xfd" + digest[:5] + bytes(10)
    return IPv6Network((raw, 48))


@dataclass(frozen=True)
class AddressPool:
    """A range of virtual addresses; the first and last address are never leased."""

    network: IPv4Network | IPv6Network

    @classmethod
    def parse(cls, text: str) -> AddressPool:
        """A pool from CIDR text; refuses pools with fewer than two leasable addresses."""
        try:
            network = ip_network(text, strict=True)
        except ValueError as exc:
            raise InvalidArgument(f"bad address pool {text!r}: {exc}") from exc
        if network.num_addresses < 4:
            raise InvalidArgument(f"address pool {text} is too small")
        return cls(network)

    @property
    def size(self) -> int:
        """How many addresses can be leased."""
        return self.network.num_addresses - 2

    @property
    def prefix_len(self) -> int:
        return self.network.prefixlen

    def address_at(self, index: int) -> IPv4Address | IPv6Address:
        """The ``index``-th leasable address (0-based)."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self.network[index + 1]

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, IPv4Address | IPv6Address):
            return False
        if address.version != self.network.version or address not in self.network:
            return False
        return address not in (self.network.network_address, self.network[-1])

    def hashed(self, node_key: str, attempt: int) -> IPv4Address | IPv6Address:
        """The ``attempt``-th proposal for ``node_key`` (deterministic)."""
        digest = hashlib.sha256(f"{node_key}\x00{attempt}".encode()).digest()
        return self.address_at(int.from_bytes(digest[:16], "big") % self.size)

    def free(
        self, used: Iterable[IPv4Address | IPv6Address], *, start_key: str = ""
    ) -> Iterator[IPv4Address | IPv6Address]:
        """Leasable addresses not in ``used``, starting at a point derived from ``start_key``.

        Meant for pools small enough to scan; iterates lazily, so a large pool with a few
        free addresses costs only what it walks.
        """
        taken = set(used)
        if len(taken) >= self.size and all(a in self for a in taken):
            return
        start = int.from_bytes(hashlib.sha256(start_key.encode()).digest()[:8], "big") % self.size
        for step in range(self.size):
            address = self.address_at((start + step) % self.size)
            if address not in taken:
                yield address


@dataclass(frozen=True)
class LeasePools:
    """The deployment's IPv4 and IPv6 pools."""

    ipv4: AddressPool
    ipv6: AddressPool

    @classmethod
    def from_settings(cls, *, ipv4: str | None, ipv6: str | None, domain: str) -> LeasePools:
        """Pools from configuration text; the IPv6 default is derived from the domain."""
        pool4 = AddressPool.parse(ipv4 or DEFAULT_IPV4_POOL)
        pool6 = AddressPool.parse(ipv6) if ipv6 else AddressPool(default_ipv6_prefix(domain))
        if pool4.network.version != 4 or pool6.network.version != 6:
            raise InvalidArgument("the IPv4 pool must be IPv4 and the IPv6 pool IPv6")
        return cls(ipv4=pool4, ipv6=pool6)

    def proposals(self, node_key: str) -> Iterator[tuple[IPv4Address, IPv6Address]]:
        """Hashed (IPv4, IPv6) pairs to try first, ``HASHED_ATTEMPTS`` of them."""
        for attempt in range(HASHED_ATTEMPTS):
            v4 = self.ipv4.hashed(node_key, attempt)
            v6 = self.ipv6.hashed(node_key, attempt)
            assert isinstance(v4, IPv4Address) and isinstance(v6, IPv6Address)
            yield v4, v6


def exhausted(pool: AddressPool) -> Exhausted:
    """The error for a full pool, naming the pool and the setting to change."""
    family = "IPv4" if pool.network.version == 4 else "IPv6"
    setting = "CYPHONIC_IPV4_POOL" if pool.network.version == 4 else "CYPHONIC_IPV6_POOL"
    return Exhausted(
        f"virtual {family} pool {pool.network} is exhausted ({pool.size} addresses leased); "
        f"enlarge {setting} or release leases of deleted nodes"
    )
