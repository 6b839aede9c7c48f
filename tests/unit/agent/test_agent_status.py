"""The status API over a real unix socket: permissions, protocol, errors, CLI output."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from cyphonic.errors import AlreadyExists, Unavailable
from cyphonic_agent.status import (
    AgentStatus,
    PeerStatus,
    StatusServer,
    add_status_parser,
    fetch_status,
    format_status,
    run_status,
)

pytestmark = pytest.mark.timeout(30)


def sample() -> AgentStatus:
    return AgentStatus(
        fqdn="alice.cyphonic.internal",
        virtual_ipv4="100.64.0.1",
        virtual_ipv6="fd00:c1::1",
        nms_state="connected",
        nms_detail="[2001:db8::10]:443",
        tun="cyphonic0",
        mtu=1420,
        uptime_s=3725,
        peers=[
            PeerStatus(
                fqdn="bob.cyphonic.internal",
                virtual_ipv4="100.64.0.2",
                state="up",
                pattern="direct",
                path="[2001:db8::7]:443",
                rtt_ms=0.84,
                mtu=1420,
                tx_bytes=5 * 1024 * 1024,
                rx_bytes=2048,
                tx_packets=3700,
                rx_packets=12,
            ),
            PeerStatus(fqdn="carol.cyphonic.internal"),
        ],
    )


async def fetch(path: Path) -> AgentStatus:
    return await asyncio.to_thread(fetch_status, path)


async def test_snapshot_round_trip_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "run" / "status.sock"
    calls = 0

    def snapshot() -> AgentStatus:
        nonlocal calls
        calls += 1
        return sample()

    server = await StatusServer.start(path=path, snapshot=snapshot)
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        got = await fetch(path)
        assert got == sample()
        assert calls == 1
        got2 = await fetch(path)  # a fresh snapshot per request
        assert calls == 2 and got2.peers[0].tx_packets == 3700
    finally:
        await server.close()
    assert not path.exists()


async def test_existing_directory_is_tightened(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    server = await StatusServer.start(path=directory / "s.sock", snapshot=sample)
    try:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    finally:
        await server.close()


async def test_stale_socket_replaced_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "run" / "status.sock"
    path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed agent leaves
    server = await StatusServer.start(path=path, snapshot=sample)
    try:
        assert (await fetch(path)).fqdn == "alice.cyphonic.internal"
        with pytest.raises(AlreadyExists):
            await StatusServer.start(path=path, snapshot=sample)
        assert (await fetch(path)).fqdn == "alice.cyphonic.internal"  # still serving
    finally:
        await server.close()


async def raw_exchange(path: Path, data: bytes) -> dict[str, object]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    if not data.endswith(b"\n"):
        writer.write_eof()
    await writer.drain()
    line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    reply = json.loads(line)
    assert isinstance(reply, dict)
    return reply


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"not json\n", "malformed"),
        (b"[1, 2]\n", "malformed"),
        (b'{"version": 9, "request": "status"}\n', "unsupported_version"),
        (b'{"version": 1, "request": "shutdown"}\n', "invalid_argument"),
        (b'{"version": 1, "request": "status"}', "malformed"),  # no newline, then EOF
        (b"x" * 70000 + b"\n", "malformed"),
    ],
)
async def test_bad_requests_get_typed_errors(
    tmp_path: Path, request_bytes: bytes, code: str
) -> None:
    path = tmp_path / "s" / "status.sock"
    server = await StatusServer.start(path=path, snapshot=sample)
    try:
        reply = await raw_exchange(path, request_bytes)
        assert reply["error"]["code"] == code  # type: ignore[index]
        assert (await fetch(path)).fqdn == "alice.cyphonic.internal"  # server unharmed
    finally:
        await server.close()


async def test_other_users_refused_even_with_open_permissions() -> None:
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or python is None:
        pytest.skip("needs root and /usr/bin/python3 to run a client as another user")
    base = Path(tempfile.mkdtemp(prefix="cyag-status-"))  # reachable by uid 65534
    os.chmod(base, 0o755)
    path = base / "s" / "status.sock"
    server = await StatusServer.start(path=path, snapshot=sample)
    try:
        client = (
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
            's.sendall(b\'{"version": 1, "request": "status"}\\n\');'
            "print(s.recv(65536).decode())"
        )
        as_nobody = [python, "-I", "-c", client, str(path)]
        # With the shipped permissions the socket cannot even be reached.
        proc = await asyncio.to_thread(
            subprocess.run, as_nobody, user=65534, capture_output=True, text=True, timeout=10
        )
        assert proc.returncode != 0 and "PermissionError" in proc.stderr, proc.stderr
        # Opened up by mistake: the SO_PEERCRED check still refuses.
        os.chmod(path.parent, 0o755)
        os.chmod(path, 0o666)
        proc = await asyncio.to_thread(
            subprocess.run, as_nobody, user=65534, capture_output=True, text=True, timeout=10
        )
        assert proc.returncode == 0, proc.stderr
        reply = json.loads(proc.stdout)
        assert reply["error"]["code"] == "permission_denied"
        assert "status" not in reply
    finally:
        await server.close()
        shutil.rmtree(base, ignore_errors=True)


def test_fetch_without_agent(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="not running"):
        fetch_status(tmp_path / "missing.sock")


def test_format_table() -> None:
    text = format_status(sample())
    lines = text.splitlines()
    assert lines[0].split() == ["node", "alice.cyphonic.internal"]
    assert "100.64.0.1, fd00:c1::1" in lines[1]
    assert "connected ([2001:db8::10]:443)" in lines[2]
    assert "cyphonic0 mtu 1420" in lines[3]
    assert "1h02m" in lines[4]
    header = next(i for i, line in enumerate(lines) if line.startswith("PEER"))
    bob = lines[header + 1]
    carol = lines[header + 2]
    assert bob.split()[:5] == [
        "bob.cyphonic.internal",
        "up",
        "direct",
        "udp",
        "[2001:db8::7]:443",
    ]
    assert "0.84 ms" in bob and "5.0 MiB / 3700 pkt" in bob and "2.0 KiB / 12 pkt" in bob
    assert carol.split()[:5] == ["carol.cyphonic.internal", "establishing", "-", "udp", "-"]
    # columns line up: every row's PATTERN column starts at the same offset
    col = lines[header].index("PATTERN")
    assert bob[col:].startswith("direct") and carol[col:].startswith("-")
    assert format_status(AgentStatus(fqdn="x")).endswith("no peers")


def test_unknown_keys_from_newer_agent_ignored() -> None:
    data = sample().to_dict()
    data["future_field"] = 1
    data["peers"][0]["future_peer_field"] = "x"
    assert AgentStatus.from_dict(data) == sample()


async def test_cli_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s" / "status.sock"
    server = await StatusServer.start(path=path, snapshot=sample)
    parser = argparse.ArgumentParser(prog="cyphonic-agent")
    add_status_parser(parser.add_subparsers(dest="command"))
    capsys.readouterr()  # the server's start-up log line
    try:
        args = parser.parse_args(["status", "--json", "--socket", str(path)])
        assert await asyncio.to_thread(args.func, args) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["peers"][0]["rtt_ms"] == 0.84
        args = parser.parse_args(["status", "--socket", str(path)])
        assert await asyncio.to_thread(args.func, args) == 0
        assert "bob.cyphonic.internal" in capsys.readouterr().out
    finally:
        await server.close()
    args = parser.parse_args(["status", "--socket", str(path)])
    assert run_status(args) == 1
    assert "not running" in capsys.readouterr().err
