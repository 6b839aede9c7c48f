"""When revocations are refreshed: the schedule (explicit clock), a watch that wakes the
cache at once, and the agent's CRL source over a fake AS session."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cyphonic import pki
from cyphonic.errors import MalformedMessage, Timeout, Unauthenticated, Unavailable
from cyphonic.revocation import InMemoryRevocations, RefreshSchedule, RevocationCache
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import wrap
from cyphonic_agent.crl import AsCrlSource

NOW = datetime.datetime.now(datetime.UTC)


def test_after_success_the_next_refresh_is_due_within_the_interval() -> None:
    values = iter([0.0, 1.0, 0.5])
    schedule = RefreshSchedule(interval=30.0, jitter=0.1, rand=lambda: next(values))
    assert schedule.succeeded() == 30.0
    assert schedule.succeeded() == pytest.approx(27.0)  # never later than promised
    assert schedule.succeeded() == pytest.approx(28.5)


def test_after_failures_retries_back_off_up_to_the_interval() -> None:
    schedule = RefreshSchedule(interval=30.0, retry_min=1.0, jitter=0.0)
    assert [schedule.failed() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert schedule.succeeded() == 30.0 and schedule.failures == 0
    assert schedule.failed() == 1.0  # a new outage starts small again
    short = RefreshSchedule(interval=0.5, retry_min=1.0, jitter=0.0)
    assert short.failed() == 0.5
    with pytest.raises(ValueError):
        RefreshSchedule(interval=0)


async def test_a_watch_wakes_the_cache_long_before_its_timer() -> None:
    source = InMemoryRevocations([5])
    cache = RevocationCache(source, interval=3600.0)
    wake = asyncio.Event()
    cursors: list[int | None] = []

    async def watch(cursor: int | None) -> bool:
        cursors.append(cursor)
        await wake.wait()
        wake.clear()
        return True

    await cache.start()
    cache.follow(watch)
    seen: list[frozenset[int]] = []
    cache.subscribe(seen.append)
    source.revoke(9)
    wake.set()
    async with asyncio.timeout(5):
        while not seen:  # noqa: ASYNC110 - the cache's state, no event to wait on
            await asyncio.sleep(0.01)
    assert seen == [frozenset({9})] and 9 in cache.revoked
    assert cursors[:2] == [1, 2]  # each wait is for ids past what the cache holds
    await cache.close()


async def test_a_failing_watch_backs_off_and_the_timer_still_works() -> None:
    source = InMemoryRevocations()
    cache = RevocationCache(source, interval=0.05)
    calls = 0

    async def watch(_cursor: int | None) -> bool:
        nonlocal calls
        calls += 1
        raise Unavailable("AS down")

    await cache.start()
    cache.follow(watch)
    source.revoke(3)
    async with asyncio.timeout(5):
        while 3 not in cache.revoked:  # noqa: ASYNC110 - the cache's state
            await asyncio.sleep(0.01)
    assert calls == 1  # backing off, not spinning
    await cache.close()


# ------------------------------------------------------------------ the agent's source


class FakeAsSession:
    """Answers CrlRequest like the AS (or fails as told)."""

    def __init__(self, crls: list[tuple[int, bytes]]) -> None:
        self.crls = crls
        self.asked: list[int] = []
        self.is_open = True
        self.fail: Exception | None = None

    async def request(self, body: pb.Envelope, *, timeout: float) -> pb.Envelope:  # noqa: ASYNC109
        if self.fail is not None:
            raise self.fail
        have = body.crl_request.have_number
        self.asked.append(have)
        number, der = self.crls[-1]
        if have and have == number:
            return wrap(pb.CrlResponse(number=number))
        return wrap(pb.CrlResponse(number=number, crl_der=der))

    def close(self, _error: Any = None) -> None:
        self.is_open = False


def crl(ca: pki.CertifiedKey, serials: list[int], number: int) -> bytes:
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
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def node_ca() -> pki.CertifiedKey:
    return pki.create_intermediate_ca(pki.create_root_ca("root", now=NOW), "node-ca", now=NOW)


async def test_the_agent_takes_the_as_crl_and_then_only_news(node_ca: pki.CertifiedKey) -> None:
    session = FakeAsSession([(4, crl(node_ca, [11, 12], 4))])
    dials = 0

    async def dial() -> Any:
        nonlocal dials
        dials += 1
        session.is_open = True
        return session

    source = AsCrlSource(node_ca=node_ca.cert, dial=dial)
    cache = RevocationCache(source, issuer=node_ca.cert)
    assert await cache.refresh() == frozenset({11, 12})
    assert await cache.refresh() == frozenset()  # unchanged: number only
    session.crls.append((6, crl(node_ca, [11, 12, 13], 6)))
    assert await cache.refresh() == frozenset({13})
    assert session.asked == [0, 4, 4] and dials == 1  # one AS connection, kept
    # A replayed older list is refused; the set stays.
    session.crls.append((5, crl(node_ca, [11], 5)))
    with pytest.raises(Unauthenticated):
        await cache.refresh()
    assert 13 in cache.revoked
    # A lost AS answer: the session is dropped and dialled again next time.
    session.fail = Timeout("slow")
    with pytest.raises(Unavailable):
        await cache.refresh()
    assert not session.is_open
    session.fail = None
    session.crls.append((7, crl(node_ca, [11, 12, 13, 14], 7)))
    assert await cache.refresh() == frozenset({14})
    assert dials == 2
    await cache.close()


async def test_the_agent_refuses_a_crl_not_signed_by_its_node_ca(
    node_ca: pki.CertifiedKey,
) -> None:
    other = pki.create_intermediate_ca(pki.create_root_ca("evil", now=NOW), "node-ca", now=NOW)
    session = FakeAsSession([(9, crl(other, [1], 9))])

    async def dial() -> Any:
        return session

    source = AsCrlSource(node_ca=node_ca.cert, dial=dial)
    with pytest.raises(Unauthenticated):
        await source.fetch(cursor=None)
    session.crls = [(9, b"")]  # "unchanged" for a number the node never had
    with pytest.raises(MalformedMessage):
        await source.fetch(cursor=None)
