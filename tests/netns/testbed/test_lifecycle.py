"""Beds come up usable and go away completely: on close, on error, on SIGTERM, and (for a
killed run) through cleanup_stale(); live runs of other processes are never touched."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cyphonic_testbed import (
    CommandError,
    Host,
    NetBed,
    Network,
    Router,
    TestbedError,
    Topology,
    build,
    cleanup_stale,
    list_namespaces,
)
from cyphonic_testbed import bed as bed_module
from cyphonic_testbed.bed import STATE_DIR, destroy_namespaces

pytestmark = pytest.mark.timeout(60)


def small() -> Topology:
    return Topology(
        name="small",
        networks=[
            Network("left", ipv4="10.91.1.0/24", ipv6="fd00:91:1::/64"),
            Network("right", ipv4="10.91.2.0/24", ipv6="fd00:91:2::/64"),
        ],
        routers=[Router("r", networks=["left", "right"])],
        hosts=[Host("a", networks=["left"]), Host("b", networks=["right"])],
    )


def _ours(run_id: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(f"cytb{run_id}-")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still has a pid: count it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_build_is_usable_at_once_and_close_removes_everything() -> None:
    bed = build(small())
    try:
        assert sorted(_ours(bed.run_id)) == sorted(bed.namespaces)
        assert len(bed.namespaces) == 5  # two segments, a router, two hosts
        a, b = bed.host("a"), bed.host("b")
        # No DAD, no waiting: both families work right after build() returns.
        assert a.ping(b.address(family=4), timeout=1)
        assert a.ping(b.address(family=6), timeout=1)
        tentative = a.run(["ip", "-o", "addr", "show", "tentative"], check=True).stdout
        assert tentative.strip() == ""
        sleeper = b.popen(["sleep", "60"])
        assert (STATE_DIR / f"{bed.run_id}.json").exists() and bed.workdir.is_dir()
    finally:
        bed.close()
    assert _ours(bed.run_id) == []
    assert sleeper.poll() is not None
    assert not (STATE_DIR / f"{bed.run_id}.json").exists()
    assert not bed.workdir.exists()
    bed.close()  # idempotent


def test_context_manager_cleans_up_when_the_body_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"), build(small()) as bed:
        assert _ours(bed.run_id)
        raise RuntimeError("boom")
    assert _ours(bed.run_id) == []


def test_a_failing_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # An impossible sysctl value makes the router's setup fail half-way through.
    monkeypatch.setitem(bed_module._SYSCTL_ROUTER, "net.ipv4.ip_forward", "not-a-number")
    bed = NetBed(small())
    with pytest.raises(CommandError):
        bed.build()
    assert _ours(bed.run_id) == []
    assert not (STATE_DIR / f"{bed.run_id}.json").exists()


def test_a_run_id_in_use_is_refused_and_the_owner_is_untouched() -> None:
    with build(small()) as first:
        with pytest.raises(TestbedError, match="in use"):
            NetBed(small(), run_id=first.run_id).build()
        assert sorted(_ours(first.run_id)) == sorted(first.namespaces)
        assert first.host("a").ping(first.host("b").address(family=4), timeout=1)


CHILD = textwrap.dedent(
    """
    import json, sys, time
    from cyphonic_testbed import Host, Network, Topology, build
    bed = build(Topology(name="child", networks=[Network("n", ipv4="10.92.0.0/24")],
                         hosts=[Host("h", networks=["n"])]))
    sleeper = bed.host("h").popen(["sleep", "60"])
    print(json.dumps({"run_id": bed.run_id, "sleeper": sleeper.pid}), flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            assert stream is not None
            stream.close()


def _hello(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready, "the child did not build its bed in 20 s"
    line = proc.stdout.readline()
    assert line, f"child failed: {proc.stderr.read() if proc.stderr else ''}"
    return dict(json.loads(line))


def test_sigterm_tears_the_bed_down(child: subprocess.Popen[str]) -> None:
    info = _hello(child)
    run_id, sleeper = str(info["run_id"]), int(str(info["sleeper"]))
    assert _ours(run_id) and _alive(sleeper)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=15) == -signal.SIGTERM  # still dies of SIGTERM
    assert _ours(run_id) == []
    assert not _alive(sleeper)
    assert not (STATE_DIR / f"{run_id}.json").exists()


def test_cleanup_stale_removes_a_killed_run_and_spares_live_ones(
    child: subprocess.Popen[str],
) -> None:
    info = _hello(child)
    run_id, sleeper = str(info["run_id"]), int(str(info["sleeper"]))
    with build(small()) as live:
        child.kill()  # no chance to clean up
        child.wait(timeout=10)
        left = _ours(run_id)
        try:
            assert left, "a SIGKILLed run should leave its namespaces behind"
            removed = cleanup_stale()
            assert set(left) <= set(removed)
            assert _ours(run_id) == []
            assert not _alive(sleeper)
            assert not (STATE_DIR / f"{run_id}.json").exists()
            assert not any(ns in removed for ns in live.namespaces)
            assert sorted(_ours(live.run_id)) == sorted(live.namespaces)
        finally:
            destroy_namespaces(_ours(run_id))


def test_netbed_fixture_builds_and_tracks(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(small())
    assert bed.host("a").ping(bed.host("b").address(family=6), timeout=1)
    assert not bed.closed  # closed by the fixture after the test
