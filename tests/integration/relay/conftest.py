"""The relay tests take a Redis database of their own (``pg_url`` and ``redis_url`` are in
tests/integration/conftest.py): the NMS reads the TRS directory under the default key prefix,
so a key prefix per run would not separate them from other tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def redis_test_url() -> str:
    return os.environ.get("CYPHONIC_TEST_RELAY_REDIS", "redis://127.0.0.1:6379/13")
