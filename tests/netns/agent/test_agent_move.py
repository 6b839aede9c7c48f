"""The move watcher on real netlink: a namespace whose uplink is switched, the periodic check
turned off, so only netlink events can report the move."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(60)

WATCH = """
import asyncio, json, sys, time
from cyphonic_agent.mobility import MoveWatcher

async def main():
    async def on_move(move):
        print(json.dumps({"moved": time.time(), "old": move.old.describe(),
                          "new": move.new.describe()}), flush=True)
    watcher = MoveWatcher(on_move=on_move, poll_s=3600)
    task = asyncio.ensure_future(watcher.run())
    while watcher.detector.baseline is None:
        await asyncio.sleep(0.01)
    print(json.dumps({"ready": watcher.detector.baseline.describe()}), flush=True)
    await task

asyncio.run(main())
"""


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, timeout=10)


def test_netlink_reports_a_move(agent_netns: Any) -> None:
    ns = agent_netns.name
    for dev in ("up0", "up1"):  # veth pairs inside the namespace (dummy may be missing)
        _ip(ns, "link", "add", dev, "type", "veth", "peer", "name", f"{dev}p")
        _ip(ns, "link", "set", f"{dev}p", "up")
    _ip(ns, "link", "set", "up0", "up")
    _ip(ns, "addr", "add", "10.0.1.10/24", "dev", "up0")
    _ip(ns, "route", "add", "default", "via", "10.0.1.1")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", WATCH], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["ready"] == {"addresses": ["10.0.1.10"], "default_routes": ["via 10.0.1.1"]}
        started = time.time()
        # the move as it looks to a host: old address gone, old link down, new one up
        _ip(ns, "addr", "del", "10.0.1.10/24", "dev", "up0")
        _ip(ns, "link", "set", "up0", "down")
        _ip(ns, "link", "set", "up1", "up")
        _ip(ns, "addr", "add", "10.0.2.10/24", "dev", "up1")
        _ip(ns, "route", "add", "default", "via", "10.0.2.1")
        moved = json.loads(proc.stdout.readline())
        assert moved["old"] == ready["ready"]
        assert moved["new"] == {"addresses": ["10.0.2.10"], "default_routes": ["via 10.0.2.1"]}
        print(f"move reported {1000 * (moved['moved'] - started):.0f} ms after its first step")
    finally:
        proc.kill()
        proc.wait(timeout=10)
