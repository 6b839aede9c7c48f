"""The access policy as an operator and users meet it: real ``cyphonic-as``, ``cyphonic-nms``
and three ``cyphonic-agent up`` in network namespaces, the policy set with the
``cyphonic-nms policy`` / ``tags`` commands, traffic from ordinary sockets through the overlay.

    alice (group eng)  --+
    bob   (group servers)+-- one global IPv4 network -- core -- cloud (as, nms)
    carol (group guest)--+

Policy: eng -> servers tcp/22 and icmp. The matrix:
- allowed: alice -> bob tcp/22 connects and gets its echo back (the reply passes alice's
  agent only because alice opened the flow: alice's own filter lets nobody in);
- port-limited: alice -> bob tcp/80 is dropped at bob's agent (counted in bob's status);
- reverse denied: bob -> alice tcp/22 is dropped at alice's agent;
- icmp: alice pings bob;
- forbidden name: carol's lookup of bob is NXDOMAIN, and nothing reaches bob from carol;
- a change while the tunnel is up: rules moved to tcp/80 take effect at once on the open
  tunnel (80 passes, 22 no longer); then an empty policy withdraws the route and both agents
  close the tunnel within 1 s of the NMS taking the change.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cyphonic_testbed import Host, Network, Router, Topology
from cyphonic_testbed.overlay import BIN, NMS_HTTP_PORT, OverlayServices, start_services
from cyphonic_testbed.probes import ping, start_tcp_listener, tcp_connect

pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]

D = "cyphonic.internal"


def topology() -> Topology:
    return Topology(
        name="policy",
        networks=[
            Network("cloud", ipv4="192.0.2.0/24"),
            Network("lan", ipv4="203.0.113.0/24"),
        ],
        routers=[Router("core", networks=["cloud", "lan"])],
        hosts=[
            Host("alice", networks=["lan"]),
            Host("bob", networks=["lan"]),
            Host("carol", networks=["lan"]),
            Host("as", networks=["cloud"]),
            Host("nms", networks=["cloud"]),
        ],
    )


class Admin:
    """``cyphonic-nms policy|tags ...`` run in the NMS's namespace, as an operator would."""

    def __init__(self, services: OverlayServices) -> None:
        self.services = services

    def run(self, *args: str, stdin: str | None = None) -> Any:
        argv = [
            str(BIN / "cyphonic-nms"),
            *args,
            "--url",
            f"http://127.0.0.1:{NMS_HTTP_PORT}",
            "--token-file",
            str(self.services.workdir / "admin-token"),
        ]
        return self.services.nms_node.run(argv, timeout=60, input=stdin)

    def set_policy(self, doc: dict[str, Any], tmp: Path) -> None:
        path = tmp / f"policy-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(doc))
        out = self.run("policy", "set", str(path))
        assert out.returncode == 0, out.stderr


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


@pytest.fixture
def world(netbed: Any, tmp_path: Path) -> Iterator[tuple[Any, OverlayServices, dict[str, Any]]]:
    bed = netbed(topology())
    os.chmod(tmp_path, 0o755)
    services = start_services(bed, workdir=tmp_path / "overlay")
    agents: dict[str, Any] = {}
    try:
        states = services.enrol_all([bed.host(n) for n in ("alice", "bob", "carol")])
        for name in ("alice", "bob", "carol"):
            agents[name] = services.start_agent(bed.host(name), states[name])
        for agent in agents.values():
            agent.wait_up()
        yield bed, services, agents
    finally:
        for agent in services.agents:
            sys.stderr.write(f"\n--- agent {agent.name} (tail) ---\n{agent.log_text()[-4000:]}\n")
        text = services.log("nms").read_text(errors="replace")
        sys.stderr.write(f"\n--- nms (tail) ---\n{text[-4000:]}\n")


def test_policy_matrix(world: tuple[Any, OverlayServices, dict[str, Any]], tmp_path: Path) -> None:
    bed, services, agents = world
    alice, bob, carol = agents["alice"], agents["bob"], agents["carol"]
    admin = Admin(services)
    for name, group in (("alice", "eng"), ("bob", "servers"), ("carol", "guest")):
        out = admin.run("tags", "set", f"{name}.{D}", f"group={group}")
        assert out.returncode == 0, out.stderr
    admin.set_policy(
        {
            "rules": [
                {"from": ["group:eng"], "to": ["group:servers"], "proto": "tcp", "ports": [22]},
                {"from": ["group:eng"], "to": ["group:servers"], "proto": "icmp"},
            ]
        },
        tmp_path,
    )
    check = admin.run("policy", "check", f"alice.{D}", f"bob.{D}", "tcp/22")
    assert check.returncode == 0 and "allowed" in check.stdout, check.stdout + check.stderr
    check = admin.run("policy", "check", f"alice.{D}", f"bob.{D}", "tcp/80")
    assert check.returncode == 3 and "denied" in check.stdout

    listeners = [
        start_tcp_listener(bed.host("bob"), 22),
        start_tcp_listener(bed.host("bob"), 80),
        start_tcp_listener(bed.host("alice"), 22),
    ]
    try:
        # allowed, by name: DNS gives the address, the route comes up, the echo comes back
        (bob_v4,) = alice.resolve(bob.fqdn)
        assert tcp_connect(bed.host("alice"), bob_v4, 22, b"hello-22", timeout=5) == b"hello-22"
        assert ping(bed.host("alice"), bob_v4, count=2)
        # port-limited: the tunnel is up, but bob's agent drops tcp/80
        assert tcp_connect(bed.host("alice"), bob_v4, 80, b"x", timeout=3) is None
        # reverse: bob may not start traffic to alice, whose agent drops it
        alice_v4 = alice.status()["virtual_ipv4"]
        assert tcp_connect(bed.host("bob"), alice_v4, 22, b"x", timeout=3) is None
        assert bob.status()["policy"]["dropped"]["not_allowed"] >= 1
        assert alice.status()["policy"]["dropped"]["not_allowed"] >= 1
        # a forbidden name: NXDOMAIN, like a name that does not exist
        answer = carol.dig(bob.fqdn)
        assert "status: NXDOMAIN" in answer.stdout, answer.stdout
        assert tcp_connect(bed.host("carol"), bob_v4, 22, b"x", timeout=3) is None

        # a change while the tunnel is up: the open tunnel is filtered by the new rules
        admin.set_policy(
            {
                "rules": [
                    {"from": ["group:eng"], "to": ["group:servers"], "proto": "tcp", "ports": [80]}
                ]
            },
            tmp_path,
        )
        assert tcp_connect(bed.host("alice"), bob_v4, 80, b"now-80", timeout=5) == b"now-80"
        assert tcp_connect(bed.host("alice"), bob_v4, 22, b"x", timeout=3) is None

        # nothing allowed any more: the route is withdrawn, both agents close the tunnel
        # (each agent logs tunnel_down, whether the NMS's PeerOffline or the peer's close of
        # the QUIC connection reached it first)
        before_a = len(_event_times(alice.log_text(), "tunnel_down"))
        before_b = len(_event_times(bob.log_text(), "tunnel_down"))
        admin.set_policy({"rules": []}, tmp_path)
        alice.wait_logged('"tunnel_down"', timeout=10, count=before_a + 1)
        bob.wait_logged('"tunnel_down"', timeout=10, count=before_b + 1)
        changed = _event_times(services.log("nms").read_text(errors="replace"), "policy_replaced")[
            -1
        ]
        closed_a = _event_times(alice.log_text(), "tunnel_down")[-1]
        closed_b = _event_times(bob.log_text(), "tunnel_down")[-1]
        sys.stderr.write(
            f"\npolicy change to tunnel closed: alice {1000 * (closed_a - changed):.0f} ms, "
            f"bob {1000 * (closed_b - changed):.0f} ms\n"
        )
        assert closed_a - changed < 1.0 and closed_b - changed < 1.0
        assert not any(
            p["fqdn"] == bob.fqdn and p["state"] == "up" for p in alice.status()["peers"]
        )
        assert not ping(bed.host("alice"), bob_v4, count=1, timeout=1)
        history = json.loads(admin.run("policy", "history").stdout)
        assert len(history) == 3 and history[0]["new_document"] == {"rules": []}
    finally:
        for listener in listeners:
            listener.stop()
