"""Revoked node certificates, refused inside every TLS handshake.

    source (background, every ``interval`` s)             TLS handshake (QUIC endpoint)
    RegistryRevocations: id cursor over ``revocations``     pki.verify_peer
    CrlRevocations: the AS's CRL, signed by the node CA       -> TrustStore.is_revoked(cert)
           |                                                     = RevocationCache.is_revoked
           v                                                     (a set lookup, no I/O)
    RevocationCache ----> RevocationSet (serials in memory) ----^
           |
           +--> listeners: e.g. close_revoked_on(endpoint) ends live connections of a
                certificate revoked after its handshake

The check runs inside the handshake, so it is an in-memory lookup; the set is refreshed in
the background:

- processes with the registry database (AS, NMS) read the ``revocations`` table by id
  cursor (``RegistryRevocations``), re-reading a few ids behind the cursor so that a
  transaction that committed out of id order is not missed, and reload the whole set of
  revoked, unexpired certificates every ``full_interval`` seconds;
- processes without it (TRS, node agents) fetch the AS's CRL (``GET <AS>/v1/crl``,
  ``CrlRevocations``); it is accepted only when signed by the node CA, and never when its
  CRL number is lower than one already applied (a replayed old list cannot un-revoke).

Pushed, not only polled: ``RevocationCache.follow(RevocationWatch(as_url))`` long-polls
the AS (``GET <AS>/v1/revocations/watch?after_id=N``), which answers the moment a revocation
past the cache's cursor exists; the cache then refreshes from its own source at once (the
watch is only a wake-up: what is applied still comes from the registry or a CRL the node
CA signed). The NMS and the TRS follow the AS this way; the timer stays as a fallback.

When the source cannot be reached the last known set stays in force (a missed refresh is
logged; ``RevocationCache.healthy`` says whether the last one worked). The AS, which does
the revoking, also adds what it revoked at once (``RevocationCache.add``).

Wiring (what the AS, NMS and TRS do; a node agent does the same with ``CrlRevocations``)::

    cache = RevocationCache(CrlRevocations(f"{as_url}/v1/crl", node_ca=node_ca),
                            issuer=node_ca, interval=30.0)
    await cache.start()                        # first fetch (errors logged), then a loop
    trust = load_trust_store(pki_dir, is_revoked=cache.is_revoked)
    endpoint = await QuicEndpoint.open(..., trust=trust)
    cache.subscribe(close_revoked_on(endpoint, cache))    # optional: end live connections
    ...
    await cache.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509

from cyphonic.errors import CyphonicError, MalformedMessage, Unauthenticated, Unavailable
from cyphonic.log import get_logger

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from cyphonic.quic import QuicEndpoint

__all__ = [
    "CrlRevocations",
    "InMemoryRevocations",
    "RefreshSchedule",
    "RegistryRevocations",
    "RevocationCache",
    "RevocationSet",
    "RevocationSource",
    "RevocationUpdate",
    "RevocationWatch",
    "check_crl",
    "close_revoked_on",
    "crl_url",
    "parse_crl",
]

DEFAULT_INTERVAL_S = 2.0
DEFAULT_FULL_INTERVAL_S = 300.0
# Registry ids re-read behind the cursor: a revocation whose transaction committed after
# one with a higher id is still seen (ids are handed out before commit).
LOOKBACK_IDS = 256
MAX_CRL_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class RevocationUpdate:
    """What a source returned: revoked serials and where it stands.

    ``complete``: the whole list (it replaces the set); else additions after the cursor the
    fetch was given. ``cursor``: the source's position (registry id, CRL number).
    """

    serials: frozenset[int]
    cursor: int
    complete: bool


class RevocationSource(Protocol):
    """Where revoked serials come from."""

    name: str
    """For logs: ``registry`` or the CRL URL."""

    async def fetch(self, *, cursor: int | None) -> RevocationUpdate:
        """Revocations after ``cursor`` (None: the complete list); ``Unavailable`` when the
        source cannot be reached, ``Unauthenticated`` when what came back is not genuine."""

    async def close(self) -> None:
        """Release connections."""


class RevocationSet:
    """The revoked serials of one CA, in memory (sans-I/O: no clock, no I/O).

    ``issuer`` (the node CA's name) limits the check to certificates that CA issued; with
    None every certificate is looked up by serial alone.
    """

    def __init__(self, *, issuer: x509.Name | None = None) -> None:
        self.issuer = issuer
        self.cursor: int | None = None
        self._serials: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self._serials)

    def __contains__(self, serial: object) -> bool:
        return serial in self._serials

    def is_revoked(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` is revoked (the ``TrustStore.is_revoked`` hook)."""
        if self.issuer is not None and cert.issuer != self.issuer:
            return False
        return cert.serial_number in self._serials

    def apply(self, update: RevocationUpdate) -> frozenset[int]:
        """Take ``update`` in; the serials revoked by it that were not before."""
        if update.complete:
            added = update.serials - self._serials
            self._serials = update.serials
        else:
            added = update.serials - self._serials
            if added:
                self._serials = self._serials | added
        self.cursor = update.cursor if self.cursor is None else max(self.cursor, update.cursor)
        return added

    def add(self, serials: Iterable[int]) -> frozenset[int]:
        """Add serials known to be revoked (e.g. just revoked here); the new ones."""
        added = frozenset(serials) - self._serials
        if added:
            self._serials = self._serials | added
        return added


class RefreshSchedule:
    """How long to wait before the next refresh (sans-I/O: outcomes in, delays out).

    After a success: ``interval`` less up to ``jitter`` of it (many nodes polling one AS do
    not stay in step; never later than the interval, which is the promise). After a
    failure: ``retry_min`` doubling per failure up to ``interval``, with the same jitter.
    """

    def __init__(
        self,
        *,
        interval: float,
        retry_min: float = 1.0,
        jitter: float = 0.1,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if interval <= 0:
            raise ValueError("refresh interval must be positive")
        self.interval = interval
        self.retry_min = min(retry_min, interval)
        self.jitter = jitter
        self._rand = rand
        self.failures = 0

    def _jittered(self, delay: float) -> float:
        return delay * (1.0 - self.jitter * self._rand())

    def succeeded(self) -> float:
        """A refresh worked: the delay until the next one."""
        self.failures = 0
        return self._jittered(self.interval)

    def failed(self) -> float:
        """A refresh failed: the delay until the next try."""
        self.failures += 1
        backoff = self.retry_min * 2.0 ** min(self.failures - 1, 30)
        return self._jittered(min(self.interval, backoff))


# --------------------------------------------------------------------------- sources


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class RegistryRevocations:
    """Revocations from the registry database (``revocations`` table), by id cursor.

    Borrows ``engine`` (its transactions queue with the process's others on SQLite), or
    owns one made by ``from_url`` (closed with the source).
    """

    name = "registry"

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        owns_engine: bool = False,
        clock: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        from cyphonic.registry import make_sessionmaker

        self.engine = engine
        self._owns_engine = owns_engine
        self._sessions = make_sessionmaker(engine)
        self._clock = clock

    @classmethod
    def from_url(cls, url: str) -> RegistryRevocations:
        """A source with an engine of its own (one pooled connection) on ``url``.

        On SQLite that engine only reads, with plain deferred transactions: in WAL mode a
        reader neither takes nor waits for the write lock the registry's writers queue on.
        """
        from cyphonic.registry import create_engine
        from cyphonic.registry.db import SQLITE_BUSY_TIMEOUT_MS, is_sqlite, normalize_url

        if not is_sqlite(url):
            return cls(create_engine(url, pool_size=1), owns_engine=True)
        from sqlalchemy import event
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(normalize_url(url))

        @event.listens_for(engine.sync_engine, "connect")
        def _busy_timeout(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            finally:
                cursor.close()

        return cls(engine, owns_engine=True)

    async def fetch(self, *, cursor: int | None) -> RevocationUpdate:
        from sqlalchemy import func, select

        from cyphonic.registry import Certificate, Revocation, map_db_errors, serialized

        async with (
            map_db_errors(),
            serialized(self.engine),
            self._sessions() as session,
            session.begin(),
        ):
            if cursor is None:
                # Every revoked certificate not yet expired (expired ones fail anyway).
                rows = await session.execute(
                    select(Revocation.serial)
                    .join(Certificate, Certificate.serial == Revocation.serial)
                    .where(Certificate.not_after > self._clock())
                )
                newest = (await session.execute(select(func.max(Revocation.id)))).scalar_one()
                serials = frozenset(int(s, 16) for (s,) in rows if s)
                return RevocationUpdate(serials=serials, cursor=int(newest or 0), complete=True)
            recent = await session.execute(
                select(Revocation.id, Revocation.serial, Certificate.not_after)
                .outerjoin(Certificate, Certificate.serial == Revocation.serial)
                .where(Revocation.id > max(0, cursor - LOOKBACK_IDS))
                .order_by(Revocation.id)
            )
            now = self._clock()
            newest, found = cursor, set[int]()
            for rid, serial, not_after in recent:
                newest = max(newest, int(rid))
                if serial and (not_after is None or not_after > now):
                    found.add(int(serial, 16))
            return RevocationUpdate(serials=frozenset(found), cursor=newest, complete=False)

    async def close(self) -> None:
        if self._owns_engine:
            await self.engine.dispose()


class InMemoryRevocations:
    """A source held in memory (tests, and a process told of revocations some other way).

    ``revoke`` appends; ``fetch`` answers like the registry (complete, or after a cursor);
    ``fail`` makes the next fetches raise it until cleared.
    """

    name = "memory"

    def __init__(self, serials: Iterable[int] = ()) -> None:
        self.log: list[int] = list(serials)
        self.fail: CyphonicError | None = None
        self.fetches = 0

    def revoke(self, *serials: int) -> None:
        """Record revocations (visible to the next fetch)."""
        self.log.extend(serials)

    async def fetch(self, *, cursor: int | None) -> RevocationUpdate:
        self.fetches += 1
        if self.fail is not None:
            raise self.fail
        start = 0 if cursor is None else cursor
        return RevocationUpdate(
            serials=frozenset(self.log[start:]), cursor=len(self.log), complete=cursor is None
        )

    async def close(self) -> None:
        return None


class CrlRevocations:
    """Revocations from the AS's published CRL, accepted only when the node CA signed it.

    ``url`` is ``<AS REST>/v1/crl``; ``verify`` is httpx's TLS verification for an https
    URL (the CRL's own signature is what makes it trustworthy either way).
    """

    def __init__(
        self,
        url: str,
        *,
        node_ca: x509.Certificate,
        timeout: float = 5.0,
        verify: bool | str = True,
        transport: Any = None,
    ) -> None:
        import httpx

        self.name = url
        self.url = url
        self.node_ca = node_ca
        self.number: int | None = None
        """The highest CRL number accepted so far (an older CRL is refused)."""
        self._client = httpx.AsyncClient(timeout=timeout, verify=verify, transport=transport)

    async def fetch(self, *, cursor: int | None) -> RevocationUpdate:
        import httpx

        try:
            response = await self._client.get(self.url)
        except httpx.HTTPError as exc:
            raise Unavailable(
                f"cannot fetch the CRL from {self.url}: {type(exc).__name__}"
            ) from exc
        if response.status_code != 200:
            raise Unavailable(f"{self.url} answered HTTP {response.status_code}")
        if len(response.content) > MAX_CRL_BYTES:
            raise MalformedMessage(f"{self.url}: CRL larger than {MAX_CRL_BYTES} bytes")
        crl = parse_crl(response.content)
        number = check_crl(crl, node_ca=self.node_ca, not_before_number=self.number)
        self.number = number
        return RevocationUpdate(
            serials=frozenset(entry.serial_number for entry in crl),
            cursor=number,
            complete=True,
        )

    async def close(self) -> None:
        await self._client.aclose()


CRL_PATH = "/v1/crl"


def crl_url(as_url: str) -> str:
    """Where the AS at REST URL ``as_url`` publishes its CRL."""
    return as_url.rstrip("/") + CRL_PATH


def parse_crl(data: bytes) -> x509.CertificateRevocationList:
    """A CRL from DER (or PEM) bytes; ``MalformedMessage`` if it is not one."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise MalformedMessage("not an X.509 CRL") from exc


def check_crl(
    crl: x509.CertificateRevocationList,
    *,
    node_ca: x509.Certificate,
    not_before_number: int | None,
) -> int:
    """Check that the node CA issued and signed ``crl`` and that it is not older than CRL
    number ``not_before_number``; its CRL number. ``Unauthenticated`` otherwise."""
    if crl.issuer != node_ca.subject:
        raise Unauthenticated(f"CRL issued by {crl.issuer.rfc4514_string()}, not the node CA")
    public_key = node_ca.public_key()
    try:
        valid = crl.is_signature_valid(public_key)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise Unauthenticated("CRL signature cannot be checked with the node CA key") from exc
    if not valid:
        raise Unauthenticated("CRL signature does not verify with the node CA")
    try:
        number = int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        number = 0
    if not_before_number is not None and number < not_before_number:
        raise Unauthenticated(
            f"CRL number {number} is older than the {not_before_number} already applied"
        )
    return number


# --------------------------------------------------------------------------- the cache


Listener = Callable[[frozenset[int]], None]
"""Called with serials that just became revoked."""


class RevocationCache:
    """Revoked serials kept fresh in the background; ``is_revoked`` is the handshake hook.

    ``issuer``: the CA whose certificates the source lists (the node CA). ``interval``:
    seconds between refreshes; ``full_interval``: between complete reloads (a CRL is
    always complete).
    """

    def __init__(
        self,
        source: RevocationSource,
        *,
        issuer: x509.Certificate | x509.Name | None = None,
        interval: float = DEFAULT_INTERVAL_S,
        full_interval: float = DEFAULT_FULL_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(issuer, x509.Certificate):
            issuer = issuer.subject
        self.source = source
        self.revoked = RevocationSet(issuer=issuer)
        self.interval = interval
        self.full_interval = full_interval
        self._clock = clock
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._watch: RevocationWatcher | None = None
        self.schedule = RefreshSchedule(interval=interval)
        self._last_full: float | None = None
        self.last_success: float | None = None
        """Monotonic time of the last refresh that worked."""
        self.last_error: CyphonicError | None = None
        self.refreshes = 0
        self.failures = 0
        self.log = get_logger("revocation", source=source.name)

    # -- the handshake hook

    def is_revoked(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` is revoked (pass as ``load_trust_store(is_revoked=...)``)."""
        return self.revoked.is_revoked(cert)

    # -- updates

    @property
    def healthy(self) -> bool:
        """True once a refresh worked and the last one did not fail."""
        return self.last_success is not None and self.last_error is None

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with the serials of each refresh (or ``add``) that revokes some."""
        self._listeners.append(listener)

    def add(self, serials: Iterable[int]) -> frozenset[int]:
        """Revoke ``serials`` here at once (the AS, right after it revoked them)."""
        added = self.revoked.add(serials)
        self._notify(added)
        return added

    async def refresh(self, *, full: bool = False) -> frozenset[int]:
        """Fetch from the source now; the serials newly revoked. Raises what the source
        raised (the set is then unchanged)."""
        now = self._clock()
        complete = (
            full
            or self.revoked.cursor is None
            or (self._last_full is not None and now - self._last_full >= self.full_interval)
        )
        update = await self.source.fetch(cursor=None if complete else self.revoked.cursor)
        if update.complete:
            self._last_full = now
        added = self.revoked.apply(update)
        self.refreshes += 1
        self.last_success = now
        if self.last_error is not None:
            self.log.info("revocation_refresh_recovered", revoked=len(self.revoked))
        self.last_error = None
        if added:
            self.log.info(
                "revocations_applied",
                added=len(added),
                revoked=len(self.revoked),
                cursor=self.revoked.cursor,
            )
        self._notify(added)
        return added

    def _notify(self, added: frozenset[int]) -> None:
        if not added:
            return
        for listener in list(self._listeners):
            try:
                listener(added)
            except Exception as exc:
                self.log.exception("revocation_listener_failed", error=repr(exc))

    # -- background loop

    async def start(self) -> None:
        """One refresh now (a failure is logged, not raised), then refresh every interval
        (sooner after a failure, see ``RefreshSchedule``)."""
        if self._task is not None:
            return
        ok = await self._refresh_logged()
        self._task = asyncio.create_task(self._run(ok), name=f"revocation:{self.source.name}")

    def follow(self, watch: RevocationWatcher) -> None:
        """Refresh as soon as ``watch(cursor)`` returns (it waits until the source may hold
        revocations past ``cursor``, e.g. ``RevocationWatch``), besides the timer."""
        if self._follower is None:
            self._follower = asyncio.create_task(
                self._follow(watch), name=f"revocation-watch:{self.source.name}"
            )

    async def close(self) -> None:
        """Stop refreshing and release the source."""
        for task in (self._follower, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._follower = None
        await self.source.close()
        closer = getattr(self._watch, "close", None)
        if closer is not None:
            await closer()

    async def _run(self, ok: bool) -> None:
        delay = self.schedule.succeeded() if ok else self.schedule.failed()
        while True:
            await asyncio.sleep(delay)
            ok = await self._refresh_logged()
            delay = self.schedule.succeeded() if ok else self.schedule.failed()

    async def _follow(self, watch: RevocationWatcher) -> None:
        self._watch = watch
        backoff = RefreshSchedule(interval=max(self.interval, 5.0))
        while True:
            try:
                newer = await watch(self.revoked.cursor)
            except CyphonicError as exc:
                if backoff.failures == 0:
                    self.log.warning(
                        "revocation_watch_failed", code=exc.code_name, reason=exc.message
                    )
                await asyncio.sleep(backoff.failed())
                continue
            if backoff.failures:
                self.log.info("revocation_watch_recovered")
            backoff.failures = 0
            if newer and not await self._refresh_logged():
                await asyncio.sleep(self.schedule.failed())

    async def _refresh_logged(self) -> bool:
        try:
            await self.refresh()
            return True
        except CyphonicError as exc:
            self.failures += 1
            first = self.last_error is None
            self.last_error = exc
            # The last known set stays in force; say so once per outage, then rarely.
            if first or self.failures % 100 == 0:
                self.log.warning(
                    "revocation_refresh_failed",
                    code=exc.code_name,
                    reason=exc.message,
                    failures=self.failures,
                    revoked=len(self.revoked),
                )
            return False


RevocationWatcher = Callable[[int | None], Awaitable[bool]]
"""Returns True as soon as the source may hold revocations past the cursor given, False
when it waited a while for none."""

WATCH_PATH = "/v1/revocations/watch"
DEFAULT_WATCH_WAIT_S = 25.0


class RevocationWatch:
    """Long-poll of the AS: returns as soon as the AS knows a revocation past the cursor.

    ``GET <as_url>/v1/revocations/watch?after_id=<cursor>&wait_s=<wait_s>`` is held open by
    the AS until a revocation newer than ``after_id`` exists (or ``wait_s`` passed). Only a
    wake-up: nothing of the answer is applied.
    """

    def __init__(
        self,
        as_url: str,
        *,
        wait_s: float = DEFAULT_WATCH_WAIT_S,
        verify: bool | str = True,
        transport: Any = None,
    ) -> None:
        import httpx

        self.url = as_url.rstrip("/") + WATCH_PATH
        self.wait_s = wait_s
        self.newest: int | None = None
        """The newest revocation id the AS reported."""
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(5.0, read=wait_s + 10.0), verify=verify, transport=transport
        )

    async def __call__(self, cursor: int | None) -> bool:
        import httpx

        params = {"after_id": str(cursor or 0), "wait_s": f"{self.wait_s:g}"}
        try:
            response = await self._client.get(self.url, params=params)
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot watch {self.url}: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise Unavailable(f"{self.url} answered HTTP {response.status_code}")
        try:
            self.newest = int(response.json()["newest_id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedMessage(f"{self.url}: not a revocation watch answer") from exc
        return self.newest > (cursor or 0)

    async def close(self) -> None:
        await self._client.aclose()


def close_revoked_on(endpoint: QuicEndpoint, cache: RevocationCache) -> Listener:
    """A listener that closes ``endpoint``'s connections whose peer certificate became
    revoked (the handshake refuses new ones; this ends those already open)."""
    from cyphonic.errors import Revoked

    def close(_serials: frozenset[int]) -> None:
        for conn in endpoint.connections:
            peer = conn.peer
            if peer is not None and not conn.is_closed and cache.is_revoked(peer.certificate):
                conn.log.warning(
                    "connection_closed_revoked",
                    peer=peer.name,
                    serial=format(peer.certificate.serial_number, "x"),
                )
                conn.close("certificate revoked", error_code=int(Revoked.code))

    return close
