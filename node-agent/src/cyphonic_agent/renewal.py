"""Short-lived node certificates, renewed in place while ``up`` runs.

    certificate issued ─────────── 2/3 of its lifetime ──────────── not_after
                                   RenewalSchedule.due: renew now
      renew: new key + CSR ── RenewRequest over QUIC ──> AS ── RenewResponse{new chain}
             state dir: key and certificate replaced as a pair (enroll.renew)
             endpoint.set_identity(new): every NEW handshake presents the new certificate;
             tunnels and the NMS connection already open keep running on the old one
             (still valid: the AS marks it superseded, not revoked)
      failed: retry with back-off, always several times before not_after
      not_after passed without a renewal: AgentFailed(Expired) — a clear error, exit 1

``RenewalSchedule`` is the sans-I/O core (time passed in, delays out); ``CertificateRenewal``
the asyncio glue the agent runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cyphonic.errors import CyphonicError, Expired
from cyphonic.log import get_logger
from cyphonic.pki import CERT_BACKDATE, CertifiedKey
from cyphonic.session import SignallingSession

from cyphonic_agent.enroll import load_node_identity, renew
from cyphonic_agent.nms import AgentFailed

__all__ = ["DEFAULT_RENEW_AT", "CertificateRenewal", "RenewalSchedule", "expired_error"]

DEFAULT_RENEW_AT = 2 / 3
"""Renew at this fraction of the certificate's lifetime."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def expired_error(cert: x509.Certificate, state_dir: Path | str) -> Expired:
    """The error an agent stops with when its certificate expired unrenewed."""
    return Expired(
        f"the node certificate ({cert.subject.rfc4514_string()}, serial "
        f"{cert.serial_number:x}) expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC "
        f"and was not renewed; enrol again: cyphonic-agent enroll --force --state-dir "
        f"{state_dir} ..."
    )


class RenewalSchedule:
    """When to renew one certificate, and how soon to try again (sans-I/O).

    The lifetime is counted from the issue time (``not_before`` plus the backdating every
    certificate carries, when the lifetime allows it) to ``not_after``.
    """

    def __init__(
        self,
        *,
        not_before: datetime,
        not_after: datetime,
        fraction: float = DEFAULT_RENEW_AT,
        retry_min_s: float = 1.0,
        retry_max_s: float = 300.0,
    ) -> None:
        if not 0 < fraction < 1:
            raise ValueError("renewal fraction must be between 0 and 1")
        issued = not_before + CERT_BACKDATE
        self.issued = issued if issued < not_after else not_before
        self.not_after = not_after
        self.fraction = fraction
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.failures = 0

    @classmethod
    def of(cls, cert: x509.Certificate, **options: float) -> RenewalSchedule:
        return cls(
            not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, **options
        )

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.issued

    @property
    def due(self) -> datetime:
        """When renewing starts."""
        return self.issued + self.lifetime * self.fraction

    def expired(self, now: datetime) -> bool:
        return now >= self.not_after

    def delay(self, now: datetime) -> float:
        """Seconds until the renewal is due (0: now)."""
        return max(0.0, (self.due - now).total_seconds())

    def failed(self, now: datetime) -> float:
        """A renewal failed: seconds until the next try. Back-off, but at least a few tries
        fit before expiry (a quarter of what is left, never under 0.2 s)."""
        self.failures += 1
        backoff = min(self.retry_max_s, self.retry_min_s * 2.0 ** min(self.failures - 1, 30))
        left = (self.not_after - now).total_seconds()
        return max(0.2, min(backoff, left / 4))


class CertificateRenewal:
    """Renews the running agent's certificate (the glue around ``RenewalSchedule``).

    ``dial`` opens an AS session; ``installed(identity)`` is called with each renewed
    key and certificate (the agent swaps its endpoint's identity there). ``run`` returns
    never; it raises ``AgentFailed(Expired)`` once the certificate expired unrenewed.
    """

    def __init__(
        self,
        *,
        state_dir: Path,
        identity: CertifiedKey,
        dial: Callable[[], Awaitable[SignallingSession]],
        installed: Callable[[CertifiedKey], None],
        fraction: float = DEFAULT_RENEW_AT,
        clock: Callable[[], datetime] = _utcnow,
        fqdn: str = "",
    ) -> None:
        self.state_dir = state_dir
        self.identity = identity
        self._dial = dial
        self._installed = installed
        self.fraction = fraction
        self._clock = clock
        self.schedule = RenewalSchedule.of(identity.cert, fraction=fraction)
        self.renewals = 0
        self.last_renewal_s: float | None = None
        """How long the last renewal took (dial, AS round trip, files, swap)."""
        self.log = get_logger("agent.renewal", fqdn=fqdn)

    async def run(self) -> None:
        delay = self.schedule.delay(self._clock())
        self.log.info(
            "renewal_scheduled",
            due=self.schedule.due.isoformat(),
            not_after=self.schedule.not_after.isoformat(),
        )
        while True:
            await asyncio.sleep(delay)
            now = self._clock()
            if self.schedule.expired(now):
                raise AgentFailed(expired_error(self.identity.cert, self.state_dir))
            try:
                await self.renew_now()
            except CyphonicError as exc:
                delay = self.schedule.failed(now)
                self.log.warning(
                    "renewal_failed",
                    code=exc.code_name,
                    reason=exc.message,
                    retry_in_s=round(delay, 2),
                    not_after=self.schedule.not_after.isoformat(),
                )
                continue
            delay = self.schedule.delay(self._clock())

    async def renew_now(self) -> CertifiedKey:
        """Renew at once (new key); the new identity, installed."""
        started = time.monotonic()
        session = await self._dial()
        try:
            await renew(session.request, self.state_dir)
        finally:
            session.close()
        identity = load_node_identity(self.state_dir)
        old = self.identity.cert
        self.identity = identity
        self.schedule = RenewalSchedule.of(identity.cert, fraction=self.fraction)
        self._installed(identity)
        self.renewals += 1
        self.last_renewal_s = time.monotonic() - started
        self.log.info(
            "certificate_renewed",
            old_serial=f"{old.serial_number:x}",
            serial=f"{identity.cert.serial_number:x}",
            not_after=identity.cert.not_valid_after_utc.isoformat(),
            due=self.schedule.due.isoformat(),
            took_ms=round(self.last_renewal_s * 1000, 1),
        )
        return identity
