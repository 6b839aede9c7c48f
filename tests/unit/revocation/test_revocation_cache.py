"""The revocation cache: the in-memory set, refreshes, and the AS CRL checks."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cyphonic import pki
from cyphonic.errors import MalformedMessage, Unauthenticated, Unavailable
from cyphonic.revocation import (
    CrlRevocations,
    InMemoryRevocations,
    RevocationCache,
    RevocationSet,
    RevocationUpdate,
)

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def cas() -> dict[str, pki.CertifiedKey]:
    root = pki.create_root_ca("root", now=NOW)
    return {
        "root": root,
        "node": pki.create_intermediate_ca(root, "node-ca", now=NOW),
        "service": pki.create_intermediate_ca(root, "service-ca", now=NOW),
        "foreign": pki.create_intermediate_ca(
            pki.create_root_ca("other", now=NOW), "node-ca", now=NOW
        ),
    }


def node_cert(
    ca: pki.CertifiedKey, fqdn: str = "n.cyphonic.internal", serial: int | None = None
) -> x509.Certificate:
    key = pki.generate_key()
    return pki.sign_node_csr(ca, pki.make_csr(key, fqdn), fqdn=fqdn, now=NOW, serial=serial)


def test_set_checks_only_the_issuers_certificates(cas: dict[str, pki.CertifiedKey]) -> None:
    mine = node_cert(cas["node"], serial=77)
    elsewhere = pki.issue_service_certificate(cas["service"], "trs.svc.x", now=NOW).cert
    revoked = RevocationSet(issuer=cas["node"].cert.subject)
    listed = frozenset({77, elsewhere.serial_number})
    assert revoked.apply(RevocationUpdate(serials=listed, cursor=3, complete=True)) == listed
    assert revoked.is_revoked(mine)
    assert not revoked.is_revoked(elsewhere)  # issued by another CA
    assert not revoked.is_revoked(cas["node"].cert)  # the intermediate is never listed here
    by_serial = RevocationSet()  # no issuer: the serial alone decides
    by_serial.add(listed)
    assert by_serial.is_revoked(elsewhere) and by_serial.is_revoked(mine)


def test_set_adds_increments_and_replaces_with_a_complete_list() -> None:
    revoked = RevocationSet()
    assert revoked.apply(RevocationUpdate(frozenset({1, 2}), cursor=2, complete=True)) == {1, 2}
    assert revoked.apply(RevocationUpdate(frozenset({2, 3}), cursor=3, complete=False)) == {3}
    assert revoked.cursor == 3 and len(revoked) == 3
    assert revoked.add([3, 4]) == {4}
    # A complete list is the truth (expired certificates drop out of it).
    assert revoked.apply(RevocationUpdate(frozenset({4}), cursor=5, complete=True)) == frozenset()
    assert 1 not in revoked and 4 in revoked and revoked.cursor == 5


async def test_cache_refreshes_incrementally_then_completely() -> None:
    source = InMemoryRevocations([10])
    now = [0.0]
    cache = RevocationCache(source, interval=0.01, full_interval=60.0, clock=lambda: now[0])
    seen: list[frozenset[int]] = []
    cache.subscribe(seen.append)
    assert await cache.refresh() == {10}  # first: complete
    source.revoke(11, 12)
    assert await cache.refresh() == {11, 12}  # after the cursor only
    assert seen == [frozenset({10}), frozenset({11, 12})]
    assert cache.revoked.cursor == 3 and cache.healthy
    now[0] = 61.0
    source.log = [12]  # the complete list no longer holds 10 and 11 (expired)
    assert await cache.refresh() == frozenset()
    assert 10 not in cache.revoked and 12 in cache.revoked


async def test_a_failing_source_keeps_the_last_set_and_recovers() -> None:
    source = InMemoryRevocations([5])
    cache = RevocationCache(source, interval=0.01)
    await cache.start()
    try:
        assert 5 in cache.revoked
        source.fail = Unavailable("registry down")
        fetches = source.fetches
        for _ in range(300):
            if source.fetches >= fetches + 3:
                break
            await asyncio.sleep(0.01)
        assert 5 in cache.revoked and not cache.healthy and cache.failures >= 3
        source.fail = None
        source.revoke(6)
        for _ in range(200):
            if 6 in cache.revoked:
                break
            await asyncio.sleep(0.01)
        assert 6 in cache.revoked and cache.healthy
    finally:
        await cache.close()


async def test_start_survives_an_unreachable_source() -> None:
    source = InMemoryRevocations()
    source.fail = Unavailable("AS down")
    cache = RevocationCache(source, interval=0.01)
    await cache.start()  # does not raise: the process starts, and retries
    try:
        assert not cache.healthy and cache.last_error is source.fail
        source.fail = None
        source.revoke(9)
        for _ in range(200):
            if 9 in cache.revoked:
                break
            await asyncio.sleep(0.01)
        assert 9 in cache.revoked
    finally:
        await cache.close()


async def test_a_broken_listener_does_not_stop_the_others() -> None:
    cache = RevocationCache(InMemoryRevocations())
    got: list[frozenset[int]] = []

    def broken(_serials: frozenset[int]) -> None:
        raise RuntimeError("bug")

    cache.subscribe(broken)
    cache.subscribe(got.append)
    assert cache.add([1]) == {1}
    assert got == [frozenset({1})]
    assert cache.add([1]) == frozenset() and got == [frozenset({1})]  # nothing new, no call


# --------------------------------------------------------------------------- the CRL


def crl_bytes(
    ca: pki.CertifiedKey, serials: list[int], *, number: int, signer: Any = None
) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(NOW)
        .next_update(NOW + datetime.timedelta(hours=1))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW).build()
        )
    crl = builder.sign(signer or ca.key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.DER)


class CrlServer:
    """What the AS's ``GET /v1/crl`` answers, swappable between fetches."""

    def __init__(self, body: bytes, status: int = 200) -> None:
        self.body, self.status = body, status

    def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/crl"
        return httpx.Response(
            self.status, content=self.body, headers={"content-type": "application/pkix-crl"}
        )


async def test_crl_source_accepts_only_the_node_cas_newer_lists(
    cas: dict[str, pki.CertifiedKey],
) -> None:
    node_ca = cas["node"]
    server = CrlServer(crl_bytes(node_ca, [1, 2], number=5))
    source = CrlRevocations(
        "http://as.test/v1/crl", node_ca=node_ca.cert, transport=httpx.MockTransport(server.handle)
    )
    cache = RevocationCache(source, issuer=node_ca.cert)
    try:
        assert await cache.refresh() == {1, 2} and cache.revoked.cursor == 5
        server.body = crl_bytes(node_ca, [1, 2, 3], number=6)
        assert await cache.refresh() == {3}
        # Signed by another key under the same name: refused, the set stays.
        server.body = crl_bytes(node_ca, [], number=7, signer=cas["service"].key)
        with pytest.raises(Unauthenticated, match="signature"):
            await cache.refresh()
        # Issued by another CA.
        server.body = crl_bytes(cas["service"], [], number=8)
        with pytest.raises(Unauthenticated, match="not the node CA"):
            await cache.refresh()
        # A replayed older list cannot un-revoke (not even as a complete reload).
        server.body = crl_bytes(node_ca, [1], number=5)
        with pytest.raises(Unauthenticated, match="older"):
            await cache.refresh(full=True)
        server.body = b"not a crl"
        with pytest.raises(MalformedMessage):
            await cache.refresh()
        server.status = 503
        with pytest.raises(Unavailable):
            await cache.refresh()
        assert {1, 2, 3} == {s for s in (1, 2, 3) if s in cache.revoked}
        assert cache.refreshes == 2
    finally:
        await cache.close()


async def test_crl_source_unreachable_is_unavailable(cas: dict[str, pki.CertifiedKey]) -> None:
    source = CrlRevocations("http://127.0.0.1:9/v1/crl", node_ca=cas["node"].cert, timeout=1)
    try:
        with pytest.raises(Unavailable):
            await source.fetch(cursor=None)
    finally:
        await source.close()
