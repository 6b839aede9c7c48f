"""``cyphonic-agent ping`` and ``cyphonic-agent netcheck`` as a user runs them, inside the
nodes' namespaces, against real AS, NMS and TRS processes and real agents.

(a) pattern 2 (alice behind an EIM NAT and the enterprise firewall, bob global): ping by
    name says direct, at bob's address, over UDP; an unknown name fails; netcheck reaches
    the AS and NMS over UDP 443 and sees alice behind NAT; with no agent running (bob's
    stopped) it logs in at the AS itself to find the NMS; with UDP 443 dropped by an
    nftables table in alice's namespace it reports UDP 443 blocked, TCP 443's state, and
    exits 1, and ping gets no reply and exits 1.
(b) double NAT (symmetric on both sides), the TRS in the cloud: ping says "via TRS" and
    netcheck probes the TRS the agent relays through.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cyphonic_testbed import Node, double_nat, pattern2
from cyphonic_testbed.overlay import (
    BIN,
    AgentProcess,
    OverlayServices,
    start_services,
    start_trs,
    trs_endpoints,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(420)]


@pytest.fixture
def cli_bed(netbed: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``cli_bed(topology, trs=False)``: services up, alice and bob enrolled and up."""
    made: list[OverlayServices] = []

    def make(topology: Any, *, trs: bool = False) -> dict[str, AgentProcess]:
        bed = netbed(topology)
        os.chmod(tmp_path, 0o755)
        if trs:  # the embedded default: an in-process CID table, the NMS told where it is
            monkeypatch.setenv("CYPHONIC_TRS_ENDPOINTS", json.dumps(trs_endpoints(bed.host("trs"))))
        services = start_services(bed, workdir=tmp_path / "overlay")
        made.append(services)
        if trs:
            start_trs(services)
        states = services.enrol_all([bed.host("alice"), bed.host("bob")])
        agents = {
            name: services.start_agent(bed.host(name), states[name], "--accept-dns=false")
            for name in ("alice", "bob")
        }
        for agent in agents.values():
            agent.wait_up()
        return agents

    try:
        yield make
    finally:
        for services in made:
            for agent in services.agents:
                sys.stderr.write(f"\n--- agent {agent.name} ---\n{agent.log_text()[-4000:]}\n")
            services.stop()


def cli(agent: AgentProcess, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``cyphonic-agent ARGS --socket <its socket>`` inside the agent's namespace."""
    proc: subprocess.CompletedProcess[str] = agent.node.run(
        [str(BIN / "cyphonic-agent"), *args, "--socket", str(agent.status_socket)],
        timeout=timeout,
    )
    return proc


def ping_json(agent: AgentProcess, name: str, count: int = 3) -> list[dict[str, Any]]:
    proc = cli(agent, "ping", name, "-c", str(count), "-i", "0.2", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def netcheck(agent: AgentProcess) -> tuple[int, dict[str, Any], str]:
    proc = cli(agent, "netcheck", "--state-dir", str(agent.state_dir), "--json", "--timeout", "3")
    table = cli(agent, "netcheck", "--state-dir", str(agent.state_dir), "--timeout", "3")
    return proc.returncode, json.loads(proc.stdout), table.stdout + table.stderr


def drop_udp_443(node: Node) -> str:
    """An nftables table in ``node``'s namespace dropping UDP to port 443; its name."""
    table = f"cyphonic_test_{secrets.token_hex(3)}"
    rules = (
        f"table inet {table} {{\n"
        "  chain out { type filter hook output priority 0; udp dport 443 drop; }\n"
        "}\n"
    )
    node.run(["nft", "-f", "-"], input=rules, check=True)
    return table


def test_ping_direct_and_netcheck_with_udp_blocked(cli_bed: Any) -> None:
    agents = cli_bed(pattern2(services=("as", "nms")))
    alice, bob = agents["alice"], agents["bob"]
    bob_outside = f"{bob.node.address('lanb', 4)}:443"

    probes = ping_json(alice, "bob")
    assert len(probes) == 3 and all(p["reply"] for p in probes), probes
    last = probes[-1]
    assert last["peer"] == bob.fqdn and last["address"] == bob.status()["virtual_ipv4"]
    assert (last["direct"], last["via_trs"], last["transport"]) == (True, None, "udp")
    assert (last["pattern"], last["path"]) == ("nat_connects", bob_outside)
    assert last["rtt_ms"] > 0 and [p["seq"] for p in probes] == [1, 2, 3]

    human = cli(alice, "ping", bob.fqdn, "-c", "1")
    sys.stderr.write(f"\nping in alice:\n{human.stdout}\n")
    assert human.returncode == 0 and "direct" in human.stdout and bob.fqdn in human.stdout, (
        human.stdout + human.stderr
    )
    unknown = cli(alice, "ping", "nobody", "-c", "1")
    assert unknown.returncode == 1 and "not_found" in unknown.stderr, unknown.stderr

    code, report, table = netcheck(alice)
    assert code == 0, table
    sys.stderr.write(f"\nnetcheck in alice:\n{table}\n")
    v4 = {c["service"]: c for c in report["services"] if c["family"] == 4}
    v6 = [c for c in report["services"] if c["family"] == 6]
    assert {"as", "nms"} <= set(v4), report
    for service in ("as", "nms"):
        assert v4[service]["udp443"]["state"] == "ok", report
        assert v4[service]["path_mtu"] == 1500 and v4[service]["tunnel_mtu"] == 1442
    # alice's network is IPv4 only: the services' IPv6 endpoints have no route.
    assert v6 and all(c["udp443"]["state"] == "no route" for c in v6), report
    assert report["ipv4"]["udp443"] == "ok" and report["ipv6"]["route"] is False
    assert report["nat"]["behind_nat"] is True and report["nat"]["kind"] != "none"
    assert "SERVICE" in table and "UDP 443" in table

    # No agent running (bob stopped): netcheck logs in at the AS itself for the NMS list.
    assert bob.stop() == 0
    code, alone, table = netcheck(bob)
    assert code == 0 and alone["agent"].startswith("not asked"), table
    assert any("Login at the AS" in n for n in alone["notes"]), alone
    nms = [c for c in alone["services"] if c["service"] == "nms" and c["family"] == 4]
    assert nms and nms[0]["udp443"]["state"] == "ok", alone
    assert alone["nat"]["known"] is False

    drop_udp_443(alice.node)  # the namespace (and the table) go with the bed
    code, report, table = netcheck(alice)
    # UDP 443 is blocked, but every service answers QUIC over TLS on TCP 443 as well
    # (docs/tcp-transport.md): the node can still reach the overlay, exit 0.
    assert code == 0, table
    for check in report["services"]:
        if check["family"] == 4:
            assert check["udp443"]["state"] == "blocked", report
            assert check["tcp443"]["state"] == "ok", report
    assert report["ipv4"]["udp443"] == "blocked"
    assert report["ipv4"]["tcp443"] in ("reachable", "ok"), report
    sys.stderr.write(f"\nnetcheck in alice, UDP 443 dropped:\n{table}\n")
    assert "blocked" in table

    # No reply (the tunnel's packets are dropped now): a line saying so, exit 1.
    silent = cli(alice, "ping", "bob", "-c", "2", "-i", "0.2", "--timeout", "2")
    assert silent.returncode == 1, silent.stdout + silent.stderr
    assert "no reply from" in silent.stdout or "cyphonic-agent ping:" in silent.stderr


def test_ping_via_the_trs_for_a_relayed_pair(cli_bed: Any) -> None:
    agents = cli_bed(double_nat(services=("as", "nms", "trs")), trs=True)
    alice, bob = agents["alice"], agents["bob"]
    trs_address = f"{alice.node.bed.host('trs').address('cloud', 4)}:443"

    probes = ping_json(alice, bob.fqdn)
    assert all(p["reply"] for p in probes), probes
    last = probes[-1]
    assert (last["direct"], last["pattern"], last["transport"]) == (False, "relay", "udp")
    assert last["via_trs"] is not None and last["via_trs"].startswith(trs_address), last

    human = cli(alice, "ping", "bob", "-c", "1")
    sys.stderr.write(f"\nping in alice (relayed):\n{human.stdout}\n")
    assert human.returncode == 0 and f"via TRS {trs_address}" in human.stdout, (
        human.stdout + human.stderr
    )

    code, report, table = netcheck(alice)
    sys.stderr.write(f"\nnetcheck in alice (relayed):\n{table}\n")
    assert code == 0, table
    trs = [c for c in report["services"] if c["endpoint"] == trs_address]
    assert trs and trs[0]["udp443"]["state"] == "ok", report
