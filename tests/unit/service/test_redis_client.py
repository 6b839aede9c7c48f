"""``cyphonic.redis_client``: the one Redis client factory of the NMS and the TRS."""

from __future__ import annotations

from cyphonic.redis_client import HEALTH_CHECK_S, redis_client
from cyphonic_nms import cluster
from cyphonic_trs.storage import RedisCidTable


def test_commands_are_bounded_kept_alive_and_health_checked() -> None:
    client = redis_client("redis://:pw@127.0.0.1:6379/2", timeout_s=1.5)
    options = client.connection_pool.connection_kwargs
    assert options["socket_timeout"] == 1.5
    assert options["socket_connect_timeout"] == 1.5
    assert options["socket_keepalive"] is True
    assert options["health_check_interval"] == HEALTH_CHECK_S
    assert options["db"] == 2 and options["password"] == "pw"


def test_nms_and_trs_use_the_same_factory() -> None:
    assert cluster.redis_client is redis_client
    table = RedisCidTable.from_url("redis://127.0.0.1:6379/0")
    options = table._redis.connection_pool.connection_kwargs
    assert options["socket_keepalive"] is True  # the TRS's client had neither of these
    assert options["health_check_interval"] == HEALTH_CHECK_S
