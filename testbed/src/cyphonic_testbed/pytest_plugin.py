"""pytest fixtures for namespace test beds (loaded from tests/conftest.py).

- ``netbed``: a factory; ``bed = netbed(pattern2())`` builds a bed that is torn down after the
  test, pass or fail. Leftovers of earlier runs that died are removed once per session.
- Tests marked ``netns`` (every test under ``tests/netns/`` gets the mark automatically) FAIL
  with a clear message when the machine cannot host beds (not root, ``ip netns`` or ``nft``
  missing): the suite runs as root in CI, where a silent skip would hide a broken setup.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cyphonic_testbed.bed import (
    NetBed,
    build,
    cleanup_stale,
    close_all,
    destroy_namespaces,
    leftovers,
    preflight_reason,
)
from cyphonic_testbed.topology import Topology

NetBedFactory = Callable[[Topology], NetBed]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under ``tests/netns/`` with ``netns``."""
    for item in items:
        parts = Path(str(item.path)).parts
        if any(a == "tests" and b == "netns" for a, b in itertools.pairwise(parts)):
            item.add_marker(pytest.mark.netns)


@pytest.fixture(autouse=True)
def _netns_preflight(request: pytest.FixtureRequest) -> None:
    """Fail (never skip) a ``netns`` test on a machine that cannot run it, saying why."""
    if request.node.get_closest_marker("netns") is None:
        return
    reason = preflight_reason()
    if reason:
        pytest.fail(f"netns test cannot run: {reason}", pytrace=False)


@pytest.fixture(scope="session")
def netbed_session() -> Iterator[None]:
    """Once per session: check the machine and remove leftovers of dead runs; at the end,
    close what is still open and fail if any namespace of this session survived."""
    reason = preflight_reason()
    if reason:
        pytest.fail(f"netns test cannot run: {reason}", pytrace=False)
    cleanup_stale()
    yield
    close_all()
    left = leftovers()
    if left:
        destroy_namespaces(left)
        pytest.fail(f"namespaces left behind by this session (now removed): {left}")


@pytest.fixture
def netbed(netbed_session: None) -> Iterator[NetBedFactory]:
    """Factory building beds from topologies; every bed is closed after the test."""
    beds: list[NetBed] = []

    def factory(topology: Topology) -> NetBed:
        bed = build(topology)
        beds.append(bed)
        return bed

    try:
        yield factory
    finally:
        for bed in reversed(beds):
            bed.close()
