"""``cyphonic-nms policy`` and ``cyphonic-nms tags`` against a real ``cyphonic-nms serve``
(SQLite registry), as an operator types them."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cyphonic.pki import init_pki
from cyphonic.registry import create_engine, make_sessionmaker, migrate
from cyphonic_testing.nms import NmsProcess, add_node

pytestmark = [pytest.mark.timeout(600)]

D = "cyphonic.internal"
TOKEN = "nms-policy-cli-admin-token-0123456789"
BIN = Path(sys.executable).parent


async def start_nms(tmp_path: Path, env: dict[str, str] | None = None) -> NmsProcess:
    init_pki(tmp_path / "pki", domain=D, now=datetime.datetime.now(datetime.UTC))
    url = f"sqlite+aiosqlite:///{tmp_path}/registry.db"
    await asyncio.to_thread(migrate, url)
    engine = create_engine(url)
    for name in ("alice", "bob"):
        await add_node(make_sessionmaker(engine), name)
    await engine.dispose()
    proc = NmsProcess(
        pki_dir=tmp_path / "pki",
        database_url=url,
        redis_url=None,
        replica_id="cli",
        log_path=tmp_path / "nms.log",
        admin_token=TOKEN,
        relay_secret="policy-cli-relay-secret-0123456789",
        extra_env=env,
    )
    await proc.start()
    return proc


@pytest.fixture
async def nms(tmp_path: Path) -> AsyncIterator[NmsProcess]:
    proc = await start_nms(tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


def cli(
    nms: NmsProcess, tmp: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    token = tmp / "token"
    token.write_text(TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYPHONIC_")}
    env["CYPHONIC_NMS_URL"] = nms.rest
    return subprocess.run(
        [str(BIN / "cyphonic-nms"), *args, "--token-file", str(token)],
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
        env=env,
    )


async def test_operator_session(nms: NmsProcess, tmp_path: Path) -> None:
    run = lambda *a, stdin=None: asyncio.to_thread(cli, nms, tmp_path, *a, stdin=stdin)  # noqa: E731
    out = await run("tags", "set", f"alice.{D}", "group=eng")
    assert out.returncode == 0 and json.loads(out.stdout) == {"group": "eng"}, out.stderr
    assert (await run("tags", "set", f"bob.{D}", "group=servers")).returncode == 0
    assert json.loads((await run("tags", "get", f"bob.{D}")).stdout) == {"group": "servers"}
    # a bad document: refused, every problem and where it is on stderr, nothing stored
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"rules": [{"from": ["grp:x"], "to": ["*"], "proto": "tcp", "ports": [0]}]})
    )
    out = await run("policy", "set", str(bad))
    assert out.returncode == 1
    assert "rules[0].from[0]" in out.stderr and "rules[0].ports[0]" in out.stderr
    assert json.loads((await run("policy", "get")).stdout)["in_force"] == "default-allow"
    # a good one from stdin
    doc = {
        "rules": [{"from": ["group:eng"], "to": ["group:servers"], "proto": "tcp", "ports": ["22"]}]
    }
    out = await run("policy", "set", "-", stdin=json.dumps(doc))
    assert out.returncode == 0 and "revision 3" in out.stdout, out.stdout + out.stderr
    out = await run("policy", "check", f"alice.{D}", f"bob.{D}", "tcp/22")
    assert out.returncode == 0 and "allowed" in out.stdout and "rules[0]" in out.stdout
    out = await run("policy", "check", f"alice.{D}", f"bob.{D}", "tcp/23")
    assert out.returncode == 3 and "denied" in out.stdout
    out = await run("policy", "check", f"bob.{D}", f"alice.{D}", "tcp/22")
    assert out.returncode == 3
    history = json.loads((await run("policy", "history")).stdout)
    assert [(h["actor"], h["new_document"]) for h in history] == [("admin", doc)]
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({"rules": []}))
    out = await run("policy", "set", str(stale), "--expect-revision", "1")
    assert out.returncode == 1 and "already_exists" in out.stderr
    out = await run("policy", "delete")
    assert out.returncode == 0 and "default-allow" in out.stdout
    # no token: refused, says why
    env_run = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "cyphonic-nms"), "policy", "get", "--url", nms.rest],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("CYPHONIC_")},
    )
    assert env_run.returncode == 1 and "no admin token" in env_run.stderr


async def test_deny_by_default_setting(tmp_path: Path) -> None:
    """``CYPHONIC_POLICY_DEFAULT=deny`` (the chart's value): nothing is allowed until an
    operator sets a policy."""
    proc = await start_nms(tmp_path, {"CYPHONIC_POLICY_DEFAULT": "deny"})
    try:
        got = await asyncio.to_thread(cli, proc, tmp_path, "policy", "get")
        assert json.loads(got.stdout)["in_force"] == "default-deny", got.stderr
        out = await asyncio.to_thread(
            cli, proc, tmp_path, "policy", "check", f"alice.{D}", f"bob.{D}"
        )
        assert out.returncode == 3 and "denied" in out.stdout
        doc = json.dumps({"rules": [{"from": ["*"], "to": ["*"]}]})
        assert (
            await asyncio.to_thread(cli, proc, tmp_path, "policy", "set", "-", stdin=doc)
        ).returncode == 0
        out = await asyncio.to_thread(
            cli, proc, tmp_path, "policy", "check", f"alice.{D}", f"bob.{D}"
        )
        assert out.returncode == 0
    finally:
        proc.stop()
