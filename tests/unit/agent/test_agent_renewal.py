"""When the agent renews its certificate (explicit clock, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cyphonic.pki import CERT_BACKDATE
from cyphonic_agent.renewal import RenewalSchedule

ISSUED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def schedule(lifetime: timedelta, **options: float) -> RenewalSchedule:
    # As the AS issues: not_before backdated, not_after = issue time + lifetime.
    return RenewalSchedule(
        not_before=ISSUED - CERT_BACKDATE, not_after=ISSUED + lifetime, **options
    )


def test_renewal_is_due_at_two_thirds_of_the_lifetime() -> None:
    week = schedule(timedelta(days=7))
    assert week.due == ISSUED + timedelta(days=7) * 2 / 3
    assert week.delay(ISSUED) == pytest.approx(timedelta(days=7).total_seconds() * 2 / 3)
    assert week.delay(ISSUED + timedelta(days=6)) == 0.0
    # Seconds-long certificates: the backdating is not counted as lifetime.
    short = schedule(timedelta(seconds=30))
    assert short.due == ISSUED + timedelta(seconds=20)
    assert not short.expired(ISSUED + timedelta(seconds=29))
    assert short.expired(ISSUED + timedelta(seconds=30))


def test_a_certificate_shorter_than_the_backdating_counts_from_not_before() -> None:
    odd = RenewalSchedule(not_before=ISSUED, not_after=ISSUED + timedelta(seconds=60))
    assert odd.due == ISSUED + timedelta(seconds=40)


def test_the_fraction_is_configurable() -> None:
    assert schedule(timedelta(seconds=100), fraction=0.5).due == ISSUED + timedelta(seconds=50)
    with pytest.raises(ValueError):
        schedule(timedelta(seconds=100), fraction=1.0)


def test_failed_renewals_back_off_but_retry_several_times_before_expiry() -> None:
    day = schedule(timedelta(days=1), retry_min_s=1.0, retry_max_s=300.0)
    now = day.due
    delays = [day.failed(now) for _ in range(12)]
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0] and max(delays) == 300.0
    short = schedule(timedelta(seconds=30), retry_min_s=1.0)
    late = ISSUED + timedelta(seconds=26)  # 4 s left
    for _ in range(10):
        short.failed(late)
    assert short.failed(late) == pytest.approx(1.0)  # a quarter of what is left
    assert short.failed(ISSUED + timedelta(seconds=29.9)) == 0.2
