"""Shared fixtures of the NMS unit tests: a SQLite registry and in-process replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cyphonic.registry import upgrade
from cyphonic_testing.nms import InProcessCluster


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[InProcessCluster]:
    """Replicas sharing a fresh SQLite registry."""
    c = InProcessCluster(f"sqlite+aiosqlite:///{tmp_path}/registry.db")
    await upgrade(c.engine)
    yield c
    await c.engine.dispose()
