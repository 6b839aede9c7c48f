"""``make demo``: the overlay on the embedded default, several nodes in namespaces.

    cloud   as, nms, trs (dual-stack 192.0.2.0/24, 2001:db8:100::/64)
    office  192.168.1.10   behind gwa: NAT (endpoint-independent) + enterprise firewall
    server  203.0.113.10 + 2001:db8:b::10   global, dual-stack
    phone   2001:db8:a::10 IPv6 only
    home    192.168.2.10   behind gwb: symmetric NAT + enterprise firewall
    cafe    192.168.3.0/24 behind gwc: NAT (endpoint-independent) + enterprise firewall,
            where office moves at the end (its uplink there is down until then)
    hotel   192.168.4.10   behind gwd: NAT + a firewall that lets no UDP out (TCP 80/443
            only): its QUIC goes over TLS on TCP 443 (docs/tcp-transport.md)

Real processes only: ``cyphonic-as serve`` and ``cyphonic-nms serve`` (SQLite registry),
``cyphonic-agent enroll`` and ``cyphonic-agent up`` in each node. For each pair the demo
resolves the peer's name through the agent's DNS stub, pings it, runs iperf3 over the
overlay and prints one table: pair, pattern, RTT, throughput, ok. Last, office moves from
its office network to the cafe's while a 10 ms ping stream and a checked TCP stream run to
server over the overlay: its row shows the longest ping gap and TCP stall of the move, and
the stream arriving intact. Everything it made is removed at the end, also on failure or
Ctrl-C.

Usage: ``python -m cyphonic_testbed.demo [--seconds 3] [--keep-logs DIR]`` (as root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cyphonic_testbed.bed import NetBed, build
from cyphonic_testbed.errors import TestbedError
from cyphonic_testbed.interruption import measure_move
from cyphonic_testbed.mobility import TARGET_DIRECT_MS
from cyphonic_testbed.overlay import AgentProcess, start_services, start_trs, trs_endpoints
from cyphonic_testbed.probes import iperf_tcp, ping_stats
from cyphonic_testbed.topology import (
    FirewallPolicy,
    Host,
    Link,
    NatMapping,
    Network,
    Router,
    Topology,
)

# (from, to): the pairs shown, in order. The NMS decides the pattern; the table shows it.
PAIRS: tuple[tuple[str, str], ...] = (
    ("phone", "server"),  # IPv6 both sides: direct
    ("office", "server"),  # NATed IPv4 to global IPv4: the NATed side connects
    ("home", "server"),  # symmetric NAT to global IPv4: the NATed side connects
    ("office", "home"),  # both behind NATs: relayed through the TRS
    ("phone", "office"),  # IPv6-only to IPv4-only behind NAT: relayed through the TRS
    ("hotel", "server"),  # no UDP out at all: QUIC over TCP 443, relayed through the TRS
)


def showcase() -> Topology:
    """The demo's topology (see the module docstring)."""
    return Topology(
        name="demo",
        networks=[
            Network("cloud", ipv4="192.0.2.0/24", ipv6="2001:db8:100::/64"),
            Network("lanphone", ipv6="2001:db8:a::/64"),
            Network("lanserver", ipv4="203.0.113.0/24", ipv6="2001:db8:b::/64"),
            Network("wana", ipv4="198.51.100.0/26"),
            Network("lanoffice", ipv4="192.168.1.0/24"),
            Network("wanb", ipv4="198.51.100.64/26"),
            Network("lanhome", ipv4="192.168.2.0/24"),
            Network("wanc", ipv4="198.51.100.128/26"),
            Network("lancafe", ipv4="192.168.3.0/24"),
            Network("wand", ipv4="198.51.100.192/26"),
            Network("lanhotel", ipv4="192.168.4.0/24"),
        ],
        routers=[
            Router(
                "core",
                networks=["cloud", "lanphone", "lanserver", "wana", "wanb", "wanc", "wand"],
            ),
            Router(
                "gwa",
                networks=["wana", "lanoffice"],
                uplink="wana",
                nat=NatMapping.ENDPOINT_INDEPENDENT,
                firewall=FirewallPolicy.ENTERPRISE,
            ),
            Router(
                "gwb",
                networks=["wanb", "lanhome"],
                uplink="wanb",
                nat=NatMapping.SYMMETRIC,
                firewall=FirewallPolicy.ENTERPRISE,
            ),
            Router(
                "gwc",
                networks=["wanc", "lancafe"],
                uplink="wanc",
                nat=NatMapping.ENDPOINT_INDEPENDENT,
                firewall=FirewallPolicy.ENTERPRISE,
            ),
            Router(
                "gwd",
                networks=["wand", "lanhotel"],
                uplink="wand",
                nat=NatMapping.ENDPOINT_INDEPENDENT,
                firewall=FirewallPolicy.ENTERPRISE_NO_UDP,
            ),
        ],
        hosts=[
            Host("as", networks=["cloud"]),
            Host("nms", networks=["cloud"]),
            Host("trs", networks=["cloud"]),
            Host("phone", networks=["lanphone"]),
            Host("server", networks=["lanserver"]),
            Host("office", networks=["lanoffice", Link("lancafe", up=False)]),
            Host("home", networks=["lanhome"]),
            Host("hotel", networks=["lanhotel"]),
        ],
    )


@dataclass
class PairResult:
    pair: str
    pattern: str = "-"
    rtt_ms: float | None = None
    mbit_s: float | None = None
    #: For a move: the longest gap in the 10 ms ping stream and the TCP stall (ms).
    gap_ms: float | None = None
    stall_ms: float | None = None
    ok: bool = False
    note: str = ""


def _ping(agent: AgentProcess, address: str, count: int) -> float | None:
    """Average RTT in ms of ``count`` pings over the overlay, or None if none answered."""
    try:
        return ping_stats(agent.node, address, count=count, interval=0.2).avg_ms
    except TestbedError:
        return None


def _iperf(client: AgentProcess, server: AgentProcess, address: str, seconds: int) -> float | None:
    """iperf3 TCP throughput in Mbit/s from ``client`` to ``server``'s virtual address."""
    try:
        gbit_s, _ = iperf_tcp(client.node, server.node, address, seconds=seconds)
    except TestbedError:
        return None
    return gbit_s * 1000


def _pattern(agent: AgentProcess, peer_fqdn: str) -> str:
    status = agent.status()
    carrier = (status.get("transport") or {}).get("carrier", "udp")
    over = "" if carrier == "udp" else f" over {carrier} 443"
    for peer in status.get("peers", []):
        if peer.get("fqdn") == peer_fqdn:
            return str(peer.get("pattern", "-")) + over
    return "-"


def run_pair(a: AgentProcess, b: AgentProcess, *, seconds: int) -> PairResult:
    """Resolve ``b`` by name at ``a``'s DNS stub, then ping and iperf3 over the overlay."""
    result = PairResult(pair=f"{a.name} -> {b.name}")
    try:
        addresses = a.resolve(b.fqdn, "A")  # every node has a virtual IPv4 and IPv6
    except TestbedError as exc:
        result.note = f"DNS: {exc}"
        return result
    if not addresses:
        result.note = "no address from the DNS stub"
        return result
    address = addresses[0]
    # The lookup started the route; give the first packets a moment, then measure.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _ping(a, address, 1) is None:
        time.sleep(0.5)
    result.rtt_ms = _ping(a, address, 10)
    result.pattern = _pattern(a, b.fqdn)
    if result.rtt_ms is None:
        result.note = "no echo reply over the overlay"
        return result
    result.mbit_s = _iperf(a, b, address, seconds)
    result.ok = result.mbit_s is not None
    if not result.ok:
        result.note = "iperf3 failed"
    return result


def run_move(bed: NetBed, mover: AgentProcess, peer: AgentProcess, *, to: str) -> PairResult:
    """Move ``mover`` onto network ``to`` while a 10 ms ping stream and a checked TCP stream
    run from it to ``peer`` over the overlay (the route already up)."""
    result = PairResult(pair=f"{mover.name} -> {peer.name}, {mover.name} moves to {to}")
    address = mover.resolve(peer.fqdn, "A")[0]
    before = mover.status()
    try:
        moved = measure_move(
            src=mover.node,
            dst=peer.node,
            address=address,
            move=lambda: bed.move(mover.name, to),
            size=6_000_000,
        )
    except TestbedError as exc:
        result.note = f"move: {str(exc).splitlines()[0][:100]}"
        return result
    result.gap_ms, result.stall_ms = moved.ping_gap_ms, moved.tcp_stall_ms
    result.rtt_ms = _ping(mover, address, 5)
    result.pattern = _pattern(mover, peer.fqdn)
    after = mover.status()
    same = all(before[k] == after[k] for k in ("virtual_ipv4", "virtual_ipv6"))
    result.ok = moved.tcp_intact and same and result.rtt_ms is not None
    if not same:
        result.note = "virtual addresses changed"
    elif not moved.tcp_intact:
        result.note = f"TCP stream broken ({moved.tcp_bytes} bytes arrived)"
    elif moved.ping_gap_ms is None or moved.ping_gap_ms > TARGET_DIRECT_MS:
        result.note = f"interruption over the {TARGET_DIRECT_MS:.0f} ms target"
    else:
        result.note = "TCP stream intact, same virtual addresses"
    return result


def format_table(results: Sequence[PairResult]) -> str:
    rows = [("pair", "pattern", "RTT ms", "Mbit/s", "move gap ms", "TCP stall ms", "ok", "")]
    for r in results:
        rows.append(
            (
                r.pair,
                r.pattern,
                "-" if r.rtt_ms is None else f"{r.rtt_ms:.2f}",
                "-" if r.mbit_s is None else f"{r.mbit_s:.0f}",
                "-" if r.gap_ms is None else f"{r.gap_ms:.0f}",
                "-" if r.stall_ms is None else f"{r.stall_ms:.0f}",
                "yes" if r.ok else "NO",
                r.note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=3, help="iperf3 duration per pair")
    parser.add_argument("--keep-logs", type=Path, help="copy the services' and agents' logs here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("make demo: needs root (network namespaces, nftables, TUN devices)", file=sys.stderr)
        return 2
    for tool in ("ip", "nft", "iperf3", "ping", "dig"):
        if shutil.which(tool) is None:
            print(f"make demo: {tool} is missing; run scripts/setup.sh first", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="cyphonic-demo-"))
    results: list[PairResult] = []
    try:
        print("building the topology (8 hosts, 5 routers) ...", flush=True)
        with build(showcase()) as bed:
            print(
                "starting cyphonic-as, cyphonic-nms (SQLite registry) and cyphonic-trs "
                "(in-process CID table) ...",
                flush=True,
            )
            # No Redis on the embedded default: the NMS is told the one TRS directly.
            os.environ["CYPHONIC_TRS_ENDPOINTS"] = json.dumps(trs_endpoints(bed.host("trs")))
            services = start_services(bed, workdir=workdir)
            start_trs(services)
            names = ["phone", "server", "office", "home", "hotel"]
            print(f"enrolling {', '.join(names)} ...", flush=True)
            states = services.enrol_all([bed.host(n) for n in names])
            agents = {n: services.start_agent(bed.host(n), states[n]) for n in names}
            for agent in agents.values():
                agent.wait_up()
            print("all agents up; measuring each pair\n", flush=True)
            for a, b in PAIRS:
                results.append(run_pair(agents[a], agents[b], seconds=args.seconds))
                print(f"  {results[-1].pair}: {'ok' if results[-1].ok else 'failed'}", flush=True)
            print("office moves from its office network to the cafe's ...", flush=True)
            results.append(run_move(bed, agents["office"], agents["server"], to="lancafe"))
            print(f"  {results[-1].pair}: {'ok' if results[-1].ok else 'failed'}", flush=True)
            print("\n" + format_table(results) + "\n")
            print(agents["office"].status_table())
            services.stop()
            if args.keep_logs:
                shutil.copytree(
                    workdir,
                    args.keep_logs,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.key", "pki"),
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
