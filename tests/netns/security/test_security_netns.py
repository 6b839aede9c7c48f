"""Security properties with real processes in network namespaces.

    alice, bob --- lan --- core --- cloud: as, nms, mallory

- Revocation without the NMS: alice and bob hold a tunnel; nftables in the NMS's namespace
  drops everything (the NMS can reach neither node); alice is revoked through the AS admin
  API; bob's agent, refreshing the AS's CRL over QUIC on its own timer, closes her tunnel
  within the refresh interval.
- QUIC Retry under load: mallory floods the NMS with genuine-looking Initials from spoofed
  sources (raw packets, thousands of addresses); a real node registers all the same,
  because the NMS asks for address validation (Retry) once handshakes pile up and spoofed
  sources never answer it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cyphonic_testbed import Host, Network, Router, Topology
from cyphonic_testbed.overlay import ADMIN_TOKEN, AS_HTTP_PORT, OverlayServices, start_services
from cyphonic_testbed.probes import ping

pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]

D = "cyphonic.internal"
CRL_REFRESH_S = 2.0
SPOOFED = "198.18.0.0/15"  # benchmarking range: nothing answers there
FLOOD = Path(__file__).with_name("initial_flood.py")


def topology() -> Topology:
    return Topology(
        name="security",
        networks=[
            Network("cloud", ipv4="192.0.2.0/24"),
            Network("lan", ipv4="203.0.113.0/24"),
        ],
        routers=[Router("core", networks=["cloud", "lan"])],
        hosts=[
            Host("alice", networks=["lan"]),
            Host("bob", networks=["lan"]),
            Host("as", networks=["cloud"]),
            Host("nms", networks=["cloud"]),
            Host("mallory", networks=["cloud"]),
        ],
    )


def _events(text: str, event: str) -> list[dict[str, Any]]:
    """The JSON log records with ``"event": event``."""
    found = []
    for line in text.splitlines():
        if f'"{event}"' in line:
            try:
                record = json.loads(line[line.index("{") :])
            except ValueError:
                continue
            if record.get("event") == event:
                found.append(record)
    return found


def _event_times(text: str, event: str) -> list[float]:
    """Unix times of the JSON log lines with ``"event": event``."""
    times = []
    for line in text.splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            record = json.loads(line[line.index("{") :])
        except ValueError:
            continue
        if record.get("event") == event:
            times.append(
                datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
            )
    return times


_REVOKE = r"""
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=b'{"reason": "keyCompromise"}', method="POST",
                             headers={"Authorization": "Bearer " + sys.argv[2],
                                      "Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=30) as resp:
    print(resp.status)
"""


@pytest.fixture
def world(netbed: Any, tmp_path: Path) -> Iterator[tuple[Any, OverlayServices]]:
    bed = netbed(topology())
    os.chmod(tmp_path, 0o755)
    services = start_services(bed, workdir=tmp_path / "overlay")
    try:
        yield bed, services
    finally:
        for agent in services.agents:
            sys.stderr.write(f"\n--- agent {agent.name} (tail) ---\n{agent.log_text()[-3000:]}\n")
        for name in ("as", "nms"):
            text = services.log(name).read_text(errors="replace")
            sys.stderr.write(f"\n--- {name} (tail) ---\n{text[-3000:]}\n")
        services.stop()


def test_a_revoked_peer_is_cut_off_when_the_nms_is_unreachable(
    world: tuple[Any, OverlayServices],
) -> None:
    bed, services = world
    states = services.enrol_all([bed.host("alice"), bed.host("bob")])
    env = {"CYPHONIC_CRL_REFRESH_S": str(CRL_REFRESH_S)}
    alice = services.start_agent(bed.host("alice"), states["alice"], env=env)
    bob = services.start_agent(bed.host("bob"), states["bob"], env=env)
    alice.wait_up()
    bob.wait_up()
    (bob_v4,) = alice.resolve(bob.fqdn)
    assert ping(bed.host("alice"), bob_v4, count=2)

    # The NMS can reach nobody and nobody can reach it.
    cut = services.nms_node.run(
        ["nft", "-f", "-"],
        input=(
            "table inet cysec_cut {\n"
            "  chain in { type filter hook input priority -10; policy drop; iif lo accept; }\n"
            "  chain out { type filter hook output priority -10; policy drop; oif lo accept; }\n"
            "}\n"
        ),
        timeout=30,
    )
    assert cut.returncode == 0, cut.stderr
    assert not services.nms_node.ping(services.as_node.address("cloud", 4), timeout=1)

    revoke = services.as_node.run(
        [
            sys.executable,
            "-c",
            _REVOKE,
            f"http://127.0.0.1:{AS_HTTP_PORT}/v1/nodes/alice/revoke",
            ADMIN_TOKEN,
        ],
        timeout=60,
    )
    assert revoke.returncode == 0 and revoke.stdout.strip() == "200", revoke.stderr
    bob.wait_logged('"connection_closed_revoked"', timeout=CRL_REFRESH_S + 30)
    (revoked_at,) = _event_times(services.log("as").read_text(errors="replace"), "node_revoked")
    closed_at = _event_times(bob.log_text(), "connection_closed_revoked")[0]
    sys.stderr.write(
        f"\nNMS cut off by nftables; revoke call to bob closing alice's tunnel: "
        f"{1000 * (closed_at - revoked_at):.0f} ms (CRL refresh every {CRL_REFRESH_S:g} s)\n"
    )
    assert closed_at - revoked_at < CRL_REFRESH_S + 3.0
    # No new tunnel either: bob's agent refuses alice in the handshake.
    assert not ping(bed.host("alice"), bob_v4, count=2, timeout=2)


def test_an_initial_flood_from_spoofed_sources_does_not_stop_a_node_registering(
    world: tuple[Any, OverlayServices],
) -> None:
    bed, services = world
    states = services.enrol_all([bed.host("alice")])
    nms_ip = services.nms_node.address("cloud", 4)
    flood = bed.host("mallory").popen(
        [sys.executable, str(FLOOD), nms_ip, "443", "90", "400", SPOOFED],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(5.0)  # the flood is under way: hundreds of spoofed handshakes a second
        assert flood.poll() is None, flood.stderr.read() if flood.stderr else ""
        started = time.monotonic()
        alice = services.start_agent(bed.host("alice"), states["alice"])
        alice.wait_up(timeout=90)
        took = time.monotonic() - started
        assert flood.poll() is None  # registered while the flood went on
    finally:
        flood.terminate()
        out, err = flood.communicate(timeout=30)
    assert alice.status()["nms_state"] == "connected"
    # What the NMS did with the flood (logged when it stops): Retries, and no Initial was
    # dropped for want of room.
    assert services.stop_service("nms") == 0
    (stats,) = _events(services.log("nms").read_text(errors="replace"), "endpoint_stats")
    sys.stderr.write(
        f"\nInitial flood from {SPOOFED} at the NMS (up to 400/s): alice up in {took:.1f} s; "
        f"flood {out.strip() or err.strip()[-300:]}; NMS retries_sent={stats['retries_sent']} "
        f"handshakes_refused={stats['handshakes_refused']} "
        f"retry_tokens_refused={stats['retry_tokens_refused']}\n"
    )
    assert stats["retries_sent"] > 100 and stats["handshakes_refused"] == 0
