"""NAT detection in a real topology: alice behind the test bed's NAT, bob global, the NMS in
the cloud on UDP 443. The NMS runs as a process in its namespace (registry: the host's
Postgres through its unix socket); the nodes are simulated QUIC clients in theirs."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cyphonic.pki import init_pki, write_certificates, write_private_key
from cyphonic.registry import create_engine, make_sessionmaker, migrate
from cyphonic_testbed import pattern2, postgres_url
from cyphonic_testing.nms import add_node
from cyphonic_testing.nms_client import issue_node_identity

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]

DOMAIN = "cyphonic.internal"
PG_ADMIN = os.environ.get("CYPHONIC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def registry_db() -> Iterator[str]:
    """A fresh, migrated registry database; its name."""
    name = f"nms_netns_{secrets.token_hex(5)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN}: {exc}", pytrace=False)
    try:
        migrate(PG_ADMIN.rsplit("/", 1)[0] + f"/{name}")
        yield name
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [
        json.loads(line)
        for line in path.read_text().splitlines()
        if line.startswith("{") and '"event"' in line
    ]


def _wait_file(path: Path, needle: str, proc: subprocess.Popen[Any], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode}: {path.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(
        f"{needle!r} not seen in {path} within {within_s}s: "
        f"{path.read_text()[-3000:] if path.exists() else ''}"
    )


def test_node_behind_nat_is_seen_as_natted(netbed: Any, registry_db: str, tmp_path: Path) -> None:
    bed = netbed(pattern2())
    nms_host, alice, bob = bed.host("nms"), bed.host("alice"), bed.host("bob")
    pki = init_pki(tmp_path / "pki", domain=DOMAIN, now=datetime.datetime.now(datetime.UTC))
    for name in ("alice", "bob"):
        ident = issue_node_identity(pki.node_ca, f"{name}.{DOMAIN}")
        write_certificates(tmp_path / f"{name}.crt", ident.full_chain)
        write_private_key(tmp_path / f"{name}.key", ident.key)

    async def enrol() -> None:
        engine = create_engine(PG_ADMIN.rsplit("/", 1)[0] + f"/{registry_db}")
        try:
            for name in ("alice", "bob"):
                await add_node(make_sessionmaker(engine), name)
        finally:
            await engine.dispose()

    asyncio.run(enrol())

    nms_log = tmp_path / "nms.log"
    env = {
        **os.environ,
        "CYPHONIC_ENVIRONMENT": "test",
        "CYPHONIC_DATABASE_URL": postgres_url(registry_db),
        "CYPHONIC_PKI_DIR": str(tmp_path / "pki"),
        "CYPHONIC_DOMAIN": DOMAIN,
        "CYPHONIC_QUIC_HOST": "::",
        "CYPHONIC_QUIC_PORT": "443",
        "CYPHONIC_HTTP_HOST": "127.0.0.1",
        "CYPHONIC_HTTP_PORT": "8082",
        "CYPHONIC_ADMIN_TOKEN": "netns-admin-token-0123456789",
        "CYPHONIC_RELAY_TOKEN_SECRET": "netns-relay-secret-0123456789",
        "CYPHONIC_REPLICA_ID": "nms-netns",
        "CYPHONIC_LOG_FORMAT": "json",
    }
    with nms_log.open("wb") as out:
        nms = nms_host.popen(
            [sys.executable, "-m", "cyphonic_nms.cli", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    _wait_file(nms_log, "quic_listening", nms, 120)
    nms_addr = f"{nms_host.address(family=4)}:443"

    def simnode(name: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "cyphonic_testing.nms_client",
            "--cert",
            str(tmp_path / f"{name}.crt"),
            "--key",
            str(tmp_path / f"{name}.key"),
            "--trust-dir",
            str(tmp_path / "pki"),
            "--nms",
            nms_addr,
            *extra,
        ]

    bob_log = tmp_path / "bob.log"
    with bob_log.open("wb") as out:
        bob_proc = bob.popen(
            simnode(
                "bob", "--bind", bob.address(family=4), "--hold", "120", "--until-directions", "1"
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    _wait_file(bob_log, '"registered"', bob_proc, 120)

    result = alice.run(
        simnode(
            "alice",
            "--bind",
            alice.address(family=4),
            "--route",
            f"bob.{DOMAIN}",
            "--hold",
            "60",
            "--until-directions",
            "1",
        ),
        timeout=150,
    )
    alice_events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, result.stdout + result.stderr
    bob_proc.wait(timeout=60)
    bob_events = _events(bob_log)

    reg_a = next(e for e in alice_events if e["event"] == "registered")
    reg_b = next(e for e in bob_events if e["event"] == "registered")
    # alice reported 192.168.1.10:<port>; the NMS saw the NAT's WAN address instead.
    assert reg_a["local"].startswith(alice.address(family=4) + ":")
    assert reg_a["behind_nat"] is True
    gwa_wan = bed.router("gwa").address("wana", family=4)
    assert reg_a["observed_ipv4"].startswith(gwa_wan + ":")
    assert reg_b["behind_nat"] is False
    assert reg_b["observed_ipv4"] == reg_b["local"]
    assert reg_a["virtual_ipv4"] != reg_b["virtual_ipv4"]

    # Pattern 2, the NATed side (alice) connects to bob's real address.
    route = next(e for e in alice_events if e["event"] == "route_response")
    assert route["pattern"] == 2
    dir_a = next(e for e in alice_events if e["event"] == "route_direction")
    dir_b = next(e for e in bob_events if e["event"] == "route_direction")
    assert dir_a["route_id"] == dir_b["route_id"] == route["route_id"]
    assert (dir_a["role"], dir_b["role"]) == (1, 2)  # CONNECT, ACCEPT
    assert dir_a["candidates"][0] == reg_b["local"]

    async def stored() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(PG_ADMIN.rsplit("/", 1)[0] + f"/{registry_db}")
        try:
            return await conn.fetch(
                "SELECT n.name, w.behind_nat, w.observed_ipv4 FROM node_network w "
                "JOIN nodes n ON n.id = w.node_id ORDER BY n.name"
            )
        finally:
            await conn.close()

    rows = {r["name"]: r for r in asyncio.run(stored())}
    assert rows["alice"]["behind_nat"] is True
    assert rows["alice"]["observed_ipv4"].startswith(gwa_wan + ":")
    assert rows["bob"]["behind_nat"] is False
    nms.terminate()
    nms.wait(timeout=30)
