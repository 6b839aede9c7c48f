"""The reachability matrix (issue 14, item 7): every network situation of ``reach_matrix``
in one namespace bed, real ``cyphonic-as``/``-nms``/``-trs`` and one ``cyphonic-agent up``
per node. For each row: the source resolves the peer's name through its DNS stub and pings
the answer (time from the DNS answer to the first echo reply), then both agents' status
must show the expected pattern, transport, direct or relayed path and the reason in words.

- EIM NAT on both sides: relayed first (the first packet never waits for punching), then
  direct after hole punching; the time to the direct path is printed.
- symmetric NAT on one side: relayed, and it stays so (no endless punching).
- firewalled public node: known at registration (the NMS's inbound probe got no echo), so
  the pair is pattern 2 from the first packet: no 2 s route reversal.
- UDP fully blocked (only TCP 80/443 out) and HTTPS proxy only (tinyproxy allowing CONNECT
  to 443, the node started with ``--https-proxy``): QUIC over TLS on TCP 443, relayed, the
  status row's transport ``tcp`` / ``proxy`` (issue 14 wants the first reply < 1 s).

The matrix is printed at the end (pair, pattern, transport, direct/relayed, first reply).
Bounds are generous (a loaded machine); the figures are what to read.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cyphonic_testbed.overlay import (
    AgentProcess,
    OverlayServices,
    first_reply_in,
    start_services,
    start_trs,
    trs_endpoints,
)
from cyphonic_testbed.proxy import Tinyproxy, proxy_only
from reach_matrix import NODES, PROXY_ALLOW, PROXY_HOST, PROXY_NET, PROXY_ONLY, ROWS, Row, topology

pytestmark = [pytest.mark.netns, pytest.mark.timeout(900)]


@pytest.fixture
def world(
    netbed: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[OverlayServices, dict[str, AgentProcess]]]:
    bed = netbed(topology())
    os.chmod(tmp_path, 0o755)
    monkeypatch.setenv("CYPHONIC_TRS_ENDPOINTS", json.dumps(trs_endpoints(bed.host("trs"))))
    services = start_services(bed, workdir=tmp_path / "overlay")
    agents: dict[str, AgentProcess] = {}
    proxy: Tinyproxy | None = None
    try:
        start_trs(services)
        wanted = _wanted_nodes()
        states = services.enrol_all([bed.host(n) for n in wanted])
        for name in wanted:
            args: list[str] = []
            if name in PROXY_ONLY:
                if proxy is None:
                    proxy = Tinyproxy(
                        bed.host(PROXY_HOST),
                        tmp_path / "proxy",
                        allow=PROXY_ALLOW,
                        network=PROXY_NET,
                    )
                proxy_only(bed.host(name), proxy.address)
                args = ["--https-proxy", proxy.url]
            agents[name] = services.start_agent(bed.host(name), states[name], *args)
        for agent in agents.values():
            agent.wait_up(timeout=120)
        yield services, agents
    finally:
        for agent in services.agents:
            sys.stderr.write(
                f"\n--- agent {agent.name} log (tail) ---\n{agent.log_text()[-3000:]}\n"
            )
        for name in ("nms",):
            log = services.log(name)
            text = log.read_text(errors="replace") if log.exists() else ""
            sys.stderr.write(f"\n--- {name} log (tail) ---\n{text[-4000:]}\n")
        if proxy is not None:
            sys.stderr.write(f"\n--- tinyproxy log ---\n{proxy.log.read_text()[-1500:]}\n")
            proxy.stop()
        services.stop()


def _rows() -> list[Row]:
    """``REACH_ROWS=situation,situation`` narrows the matrix (debugging one cell)."""
    only = {s.strip() for s in os.environ.get("REACH_ROWS", "").split(",") if s.strip()}
    return [r for r in ROWS if not only or r.situation in only]


def _wanted_nodes() -> list[str]:
    used = {n for r in _rows() for n in (r.src, r.dst)}
    return [n for n in NODES if n in used]


def _nms_events(services: OverlayServices, event: str) -> list[dict[str, Any]]:
    out = []
    for line in services.log("nms").read_text(errors="replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and item.get("event") == event:
            out.append(item)
    return out


def _wait_probed(services: OverlayServices, agents: dict[str, AgentProcess]) -> None:
    """Every node's reachability probe decided (a node is probed right after registering;
    not one on TCP 443, which has no UDP to probe)."""
    deadline = time.monotonic() + 30
    on_streams = {r.src for r in _rows() if r.transport != "udp"}
    fqdns = {a.fqdn for name, a in agents.items() if name not in on_streams}
    while time.monotonic() < deadline:
        probed = {e["fqdn"] for e in _nms_events(services, "reach_probed")}
        if fqdns <= probed:
            return
        time.sleep(0.2)
    raise AssertionError(f"not probed: {sorted(fqdns - probed)}")


def _peer_row(agent: AgentProcess, fqdn: str) -> dict[str, Any]:
    rows = [p for p in agent.status()["peers"] if p["fqdn"] == fqdn]
    if not rows:
        return {
            "fqdn": fqdn,
            "state": "none",
            "pattern": "-",
            "transport": "-",
            "direct": None,
            "reason_code": "",
            "reason": "",
            "via": None,
        }
    return rows[0]


def _settled_row(agent: AgentProcess, fqdn: str, row: Row) -> dict[str, Any]:
    """The source's status row once the tunnel is up and, for a pair that goes direct
    after punching, once it is direct (bounded by ``row.direct_within_s``)."""
    deadline = time.monotonic() + (row.direct_within_s or 10.0)
    peer = _peer_row(agent, fqdn)
    while time.monotonic() < deadline:
        if peer["state"] == "up" and (row.direct_within_s is None or peer["direct"]):
            break
        time.sleep(0.1)
        peer = _peer_row(agent, fqdn)
    return peer


def test_reachability_matrix(world: tuple[OverlayServices, dict[str, AgentProcess]]) -> None:
    services, agents = world
    _wait_probed(services, agents)
    results: list[tuple[Row, dict[str, Any], dict[str, Any]]] = []
    failures: list[str] = []
    for row in _rows():
        src, dst = agents[row.src], agents[row.dst]
        probe = first_reply_in(src.node, dst.fqdn, family=row.family)
        peer = _settled_row(src, dst.fqdn, row)
        results.append((row, probe, peer))
        where = f"{row.situation} ({row.src} -> {row.dst})"
        if probe["first_reply_ms"] > row.first_reply_s * 1000:
            failures.append(f"{where}: first reply after {probe['first_reply_ms']:.0f} ms")
        got = (peer["state"], peer["pattern"], peer["transport"], peer["direct"])
        want = ("up", row.pattern, row.transport, row.direct)
        if got != want:
            failures.append(f"{where}: (state, pattern, transport, direct) {got} != {want}")
        # The NMS's reason, as the route's establishing row or the peer's status shows it
        # (a punched tunnel's row says "hole_punched" instead).
        codes = {peer["reason_code"], peer.get("route_reason_code", "")}
        if row.reason_code not in codes:
            failures.append(f"{where}: reason {peer['reason_code']!r} != {row.reason_code!r}")
        if not peer["reason"]:
            failures.append(f"{where}: no reason in words")
        if (
            row.direct_within_s is not None
            and peer["direct"]
            and peer["reason_code"] != "hole_punched"
        ):
            failures.append(f"{where}: direct, but the reason is {peer['reason_code']!r}")
        # The settled path carries traffic (for a punched pair: the direct connection).
        target = probe["address"]
        pinged = src.node.run(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "5", target], timeout=60)
        if " 0% packet loss" not in pinged.stdout:
            failures.append(f"{where}: ping over the settled path: {pinged.stdout[-200:]}")
        if row.no_reversal and "route_reversed" in src.log_text():
            failures.append(f"{where}: the route was reversed (the block was not known)")
    _print_matrix(results)
    # Relayed pairs stay relayed: no endless punching, the path unchanged a while later.
    time.sleep(2)
    for row, _probe, _peer in results:
        if not row.direct:
            again = _peer_row(agents[row.src], agents[row.dst].fqdn)
            if again["direct"]:
                failures.append(f"{row.situation}: went direct later: {again}")
        if row.direct_within_s is not None:
            again = _peer_row(agents[row.src], agents[row.dst].fqdn)
            sys.stderr.write(f"\n{row.situation}: {agents[row.src].status_table()}\n")
            if not again["direct"]:
                failures.append(f"{row.situation}: left the direct path: {again}")
    assert not failures, "\n".join(failures)


def _print_matrix(results: list[tuple[Row, dict[str, Any], dict[str, Any]]]) -> None:
    header = ("situation", "pair", "pattern", "transport", "path", "first reply", "why")
    lines = [header]
    for row, probe, peer in results:
        path = "direct" if peer["direct"] else f"relayed via {peer.get('via') or '?'}"
        if peer.get("direct_after_ms") is not None:
            path += f" (after {peer['direct_after_ms']:.0f} ms)"
        lines.append(
            (
                row.situation,
                f"{row.src} -> {row.dst}",
                str(peer["pattern"]),
                str(peer["transport"]),
                path,
                f"{probe['first_reply_ms']:.1f} ms",
                str(peer["reason"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )
    sys.stderr.write(f"\nreachability matrix:\n{text}\n")
    print(f"\nreachability matrix:\n{text}")
