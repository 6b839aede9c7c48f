"""The value sets an install is played with (tests/chart/test_install_play.py) and that the
kind tests install on a real cluster (tests/kind): the same scenarios in both places."""

from __future__ import annotations

from typing import Any

REDIS_DB = 13
"""The Redis database of this machine the external-Redis set uses (flushed before and after)."""

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "external-postgres-redis": {
        "postgresql": {"enabled": False},
        "externalDatabase": {
            "host": "db.ops.example",
            "existingSecret": "ops-db",
            "username": "postgres",
        },
        "redis": {"enabled": False},
        "externalRedis": {"host": "redis.ops.example", "database": REDIS_DB},
    },
    "production-like": {
        "as": {"replicas": 2},
        "nms": {"replicas": 3},
        "trs": {"replicas": 2},
        "logLevel": "warning",
    },
    "quic-port-8443": {"quicContainerPort": 8443, "as": {"replicas": 1}, "nms": {"replicas": 1}},
    "ipv6": {"as": {"replicas": 1}, "nms": {"replicas": 1}, "trs": {"replicas": 1}},
}
