#!/usr/bin/env python3
"""Relayed vs direct: the same two agents measured on a direct route and through the TRS.

Run as root from the repository root (network namespaces; about 4 minutes with the defaults):

    .venv/bin/python bench/relay_vs_direct.py [--repeat 3] [--engine qh3|aioquic] [--json]

One test bed, built once: real ``cyphonic-as``, ``cyphonic-nms`` (SQLite registry, TRS
directory in a Redis in the bed) and ``cyphonic-trs`` (pinned to one CPU with ``taskset``)
in the cloud; alice and bob each behind their own router (``double_nat`` without firewalls)
and joined with ``cyphonic-agent up``. Nothing in the products is told to relay: the NMS
decides the pattern from what it observes, as always, and the bench changes the network:

* direct: the routers do not translate (the core routes the two LANs), so each node is seen
  at the address it reports and the NMS picks pattern 1, alice connecting to bob;
* relayed: the routers are symmetric NATs (the bed's own ruleset), so the NMS relays
  (pattern 3) through the TRS. The path crosses the core twice (node - TRS - node).

Between phases both agents are stopped, the routers switched and the agents started again on
a new UDP port (so no connection-tracking entry of the previous phase is reused). Each
repeat measures one direct and one relayed phase, so both see the same machine load. Per
phase: ping RTT over the tunnel (alice -> bob's virtual IPv4, 10 ms interval) and iperf3
TCP throughput (one stream, first second omitted). In the relayed phase also: the TRS's
forwarded packets per second and per CPU-second it used (from its admin REST and
``/proc``), and the same iperf3 again while a third host floods the TRS with packets of
random connection IDs and of a connection ID stolen from the relayed route (the issue's
attack; the transfer must not be disturbed beyond the CPU the flood costs).

Last, the TRS's forwarding rate on one core in isolation (``bench/trs_forward.py``, loopback).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cyphonic.hostport import parse_host_port
from cyphonic.quic.endpoint import DEFAULT_ENGINE, ENGINES
from cyphonic_testbed import NetBed, double_nat
from cyphonic_testbed.overlay import AgentProcess, OverlayServices, start_services, start_trs
from cyphonic_testbed.probes import iperf_tcp, ping_stats
from cyphonic_testbed.topology import NAT_TABLE, render_ruleset

HERE = Path(__file__).resolve().parent
SERVICES = ("as", "nms", "trs", "redis", "mallory")
TRS_CPU = 1
"""The CPU the TRS is pinned to (modulo the CPUs there are)."""
FIRST_PORT = 20443
"""Agents' UDP port in the first phase; each phase uses the next one."""

# A third host's flood: per round, one packet with a fresh random 8-byte DCID (handed to the
# TRS's QUIC server, which finds no connection) and one with the stolen CID (refused: wrong
# source). Paced to argv[4] packets per second; prints "ready" once sending.
FLOODER = r"""
import os, socket, sys, time
host, cid, size, pps = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((host, 443))
stolen = b"\x40" + cid + os.urandom(size - 1 - len(cid))
randoms = [b"\x40" + os.urandom(size - 1) for _ in range(4096)]
print("ready", flush=True)
start, sent, i = time.monotonic(), 0, 0
while True:
    for _ in range(32):
        try:
            s.send(randoms[i & 4095]); s.send(stolen)
        except OSError:
            pass
        i += 1; sent += 2
    ahead = sent / pps - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
"""


@dataclass
class Phase:
    """One measurement of one route between the two agents."""

    mode: str  # direct | relayed
    repeat: int
    pattern: str = ""
    path: str = ""
    rtt_min_ms: float = 0.0
    rtt_avg_ms: float = 0.0
    rtt_max_ms: float = 0.0
    ping_loss_pct: float = 0.0
    gbit_s: float = 0.0
    retransmits: int | None = None
    # relayed only
    trs_pps: float | None = None
    trs_pps_per_cpu_s: float | None = None
    trs_cpu_share: float | None = None
    trs_send_dropped: int | None = None
    kernel_drops: dict[str, int] = field(default_factory=dict)
    tunnel: dict[str, Any] = field(default_factory=dict)
    agent_cpu_share: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0
    """Share of all CPUs busy (any process, softirq included) during the iperf3."""
    flood_pps: int | None = None
    flood_gbit_s: float | None = None
    flood_retransmits: int | None = None
    flood_spoofed_dropped: int | None = None
    flood_to_local_server: int | None = None
    flood_forwarded_to_flooder: bool | None = None
    notes: list[str] = field(default_factory=list)


UDP_COUNTERS = (
    "UdpRcvbufErrors",
    "UdpSndbufErrors",
    "UdpInErrors",
    "Udp6RcvbufErrors",
    "Udp6SndbufErrors",
    "Udp6InErrors",
)


def _udp_counters(node: Any) -> dict[str, int]:
    """The kernel's UDP error counters in ``node``'s namespace (absolute values)."""
    out = node.run(["nstat", "-asz", *UDP_COUNTERS]).stdout
    found = dict.fromkeys(UDP_COUNTERS, 0)
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in found:
            found[parts[0]] = int(parts[1])
    return found


def _machine_ticks() -> tuple[int, int]:
    """Busy and total clock ticks of all CPUs (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (all threads), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class Bench:
    def __init__(self, bed: NetBed, workdir: Path, *, engine: str, pin: bool) -> None:
        self.bed = bed
        self.engine = engine
        self.redis = bed.start_redis("redis")
        self.services: OverlayServices = start_services(
            bed, workdir=workdir, nms_args=["--redis-url", self.redis.url]
        )
        self.trs = start_trs(self.services, redis_url=self.redis.url)
        cpus = sorted(os.sched_getaffinity(0))
        self.trs_cpu: int | None = None
        if pin:
            self.trs_cpu = cpus[TRS_CPU % len(cpus)]
            subprocess.run(
                ["taskset", "-a", "-p", "-c", str(self.trs_cpu), str(self.trs.proc.pid)],
                check=True,
                capture_output=True,
            )
        self.alice, self.bob = bed.host("alice"), bed.host("bob")
        self.states = self.services.enrol_all([self.alice, self.bob])
        self.port = FIRST_PORT
        # The core routes the private LANs, used only when the routers do not translate.
        core = bed.router("core")
        for lan, router, uplink in (("lana", "gwa", "wana"), ("lanb", "gwb", "wanb")):
            subnet = next(n for n in bed.topology.networks if n.name == lan).ipv4
            via = bed.router(router).address(uplink, 4)
            core.run(["ip", "route", "replace", str(subnet), "via", via], check=True)
        self.rulesets = {
            r.name: render_ruleset(r) for r in bed.topology.routers if r.nat is not None
        }

    # -- the network -----------------------------------------------------------------------

    def translate(self, on: bool) -> None:
        """Make gwa and gwb symmetric NATs (``on``) or plain routers."""
        for name, ruleset in self.rulesets.items():
            router = self.bed.router(name)
            router.run(["nft", "delete", "table", "ip", NAT_TABLE])  # absent is fine
            if on and ruleset:
                router.run(["nft", "-f", "-"], input=ruleset, check=True)

    # -- the agents --------------------------------------------------------------------------

    def agents_up(self) -> tuple[AgentProcess, AgentProcess]:
        self.port += 1
        agents = []
        for node in (self.alice, self.bob):
            agents.append(
                self.services.start_agent(
                    node,
                    self.states[node.name],
                    "--quic-port",
                    str(self.port),
                    env={"CYPHONIC_QUIC_ENGINE": self.engine},
                )
            )
        for agent in agents:
            agent.wait_up()
        return agents[0], agents[1]

    # -- measurements --------------------------------------------------------------------------

    def ping(self, phase: Phase, vip: str, count: int) -> None:
        stats = ping_stats(self.alice, vip, count=count)
        phase.rtt_min_ms, phase.rtt_avg_ms = stats.min_ms, stats.avg_ms
        phase.rtt_max_ms, phase.ping_loss_pct = stats.max_ms, stats.loss_pct

    def stolen_cid(self, fqdn: str) -> str:
        """A relay CID owned by ``fqdn`` (from the CID table in Redis)."""
        cli = ["redis-cli", "-h", self.redis.address, "-p", str(self.redis.port)]
        keys = self.redis.node.run(
            [*cli, "--scan", "--pattern", "cyphonic:trs:cid:*"], check=True
        ).stdout.split()
        for key in keys:
            owner = self.redis.node.run([*cli, "hget", key, "fqdn"], check=True).stdout.strip()
            if owner == fqdn:
                return key.rsplit(":", 1)[1]
        raise RuntimeError(f"no relay CID of {fqdn} in the CID table")

    def phase(
        self, mode: str, repeat: int, *, duration: float, pings: int, flood_pps: int
    ) -> Phase:
        result = Phase(mode=mode, repeat=repeat)
        self.translate(mode == "relayed")
        alice, bob = self.agents_up()
        try:
            vip = bob.status()["virtual_ipv4"]
            # The first packet to bob's virtual address asks the NMS for the route.
            deadline = time.monotonic() + 60
            while (
                self.alice.run(["ping", "-n", "-c", "1", "-W", "1", vip], timeout=10).returncode
                != 0
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{mode}: no route to bob within 60 s")
            (row,) = [p for p in alice.status()["peers"] if p["fqdn"] == bob.fqdn]
            result.pattern, result.path = row["pattern"], row["path"]
            if (result.pattern == "relay") != (mode == "relayed"):
                raise RuntimeError(f"{mode} phase got pattern {result.pattern!r}")
            self.ping(result, vip, pings)
            before = self.trs.get("/v1/replica")
            hosts = {"trs": self.trs.node, "alice": self.alice, "bob": self.bob}
            kernel = {name: _udp_counters(node) for name, node in hosts.items()}
            ticks, wall = _cpu_ticks(self.trs.proc.pid), time.monotonic()
            agent_ticks = {a.name: _cpu_ticks(a.proc.pid) for a in (alice, bob)}
            machine = _machine_ticks()
            result.gbit_s, result.retransmits = iperf_tcp(
                self.alice, self.bob, vip, seconds=duration
            )
            elapsed = time.monotonic() - wall
            busy, total = (a - b for a, b in zip(_machine_ticks(), machine, strict=True))
            result.machine_busy = round(busy / max(total, 1), 2)
            result.agent_cpu_share = {
                a.name: round(
                    (_cpu_ticks(a.proc.pid) - agent_ticks[a.name])
                    / os.sysconf("SC_CLK_TCK")
                    / elapsed,
                    2,
                )
                for a in (alice, bob)
            }
            for agent in (alice, bob):
                (row,) = [p for p in agent.status()["peers"] if p["fqdn"] != agent.fqdn]
                result.tunnel[agent.name] = row
            result.kernel_drops = {
                f"{name} {k}": v - kernel[name][k]
                for name, node in hosts.items()
                for k, v in _udp_counters(node).items()
                if v != kernel[name][k]
            }
            if mode == "relayed":
                cpu_s = (_cpu_ticks(self.trs.proc.pid) - ticks) / os.sysconf("SC_CLK_TCK")
                after = self.trs.get("/v1/replica")
                forwarded = after["forwarded_packets"] - before["forwarded_packets"]
                result.trs_pps = forwarded / elapsed
                result.trs_pps_per_cpu_s = forwarded / max(cpu_s, 1e-9)
                result.trs_cpu_share = cpu_s / elapsed
                result.trs_send_dropped = after["send_dropped"] - before["send_dropped"]
                if flood_pps:
                    self.flooded(result, vip, bob.fqdn, duration=duration, pps=flood_pps)
        finally:
            for agent in (alice, bob):
                agent.stop()
        return result

    def flooded(self, result: Phase, vip: str, victim: str, *, duration: float, pps: int) -> None:
        mallory = self.bed.host("mallory")
        trs_address = self.trs.node.address("cloud", 4)
        flooder = mallory.popen(
            [sys.executable, "-c", FLOODER, trs_address, self.stolen_cid(victim), "1200", str(pps)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert flooder.stdout is not None
            if flooder.stdout.readline() != b"ready\n":
                raise RuntimeError("flooder did not start")
            time.sleep(0.5)
            before = self.trs.get("/v1/replica")
            result.flood_gbit_s, result.flood_retransmits = iperf_tcp(
                self.alice, self.bob, vip, seconds=duration
            )
            after = self.trs.get("/v1/replica")
        finally:
            flooder.kill()
            flooder.wait(timeout=10)
        result.flood_pps = pps
        result.flood_spoofed_dropped = after["drops"].get("spoofed_source", 0) - before[
            "drops"
        ].get("spoofed_source", 0)
        result.flood_to_local_server = after["to_local_server"] - before["to_local_server"]
        sessions = self.trs.get("/v1/sessions")["items"]
        flooder_ip = mallory.address("cloud", 4)
        result.flood_forwarded_to_flooder = any(
            parse_host_port(side["address"])[0] == flooder_ip
            for s in sessions
            for side in s["sides"]
            if side
        )


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.3f} (min {min(values):.3f}, max {max(values):.3f})"


def trs_one_core(duration: float) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    import trs_forward

    figures: dict[str, Any] = trs_forward.measure(duration=duration, size=1252)
    return figures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="direct + relayed phases")
    parser.add_argument("--duration", type=float, default=8, help="iperf3 seconds")
    parser.add_argument("--pings", type=int, default=300, help="pings per phase")
    parser.add_argument(
        "--flood-pps",
        type=int,
        default=20_000,
        help="flood rate during the second relayed iperf3 (0: none)",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=DEFAULT_ENGINE,
        help="the QUIC engine of the agents and the services (CYPHONIC_QUIC_ENGINE); "
        f"default: the products' default, {DEFAULT_ENGINE}",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="leave the TRS on every CPU (default: pinned to one)"
    )
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    os.environ["CYPHONIC_QUIC_ENGINE"] = args.engine  # the services inherit it
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="relay-vs-direct-") as tmp:
        os.chmod(tmp, 0o755)
        topology = double_nat(firewall=None, services=SERVICES)
        with NetBed(topology) as bed:
            bench = Bench(bed, Path(tmp), engine=args.engine, pin=not args.no_pin)
            try:
                for repeat in range(args.repeat):
                    for mode in ("direct", "relayed"):
                        phase = bench.phase(
                            mode,
                            repeat,
                            duration=args.duration,
                            pings=args.pings,
                            flood_pps=args.flood_pps,
                        )
                        phases.append(phase)
                        print(
                            f"  {mode:<8} #{repeat}: {phase.gbit_s:.3f} Gbit/s "
                            f"({phase.retransmits} retransmits), "
                            f"RTT avg {phase.rtt_avg_ms:.3f} ms"
                            + (
                                f", TRS {phase.trs_pps:,.0f} pps, send buffer full "
                                f"{phase.trs_send_dropped}"
                                if phase.mode == "relayed"
                                else ""
                            )
                            + f", UDP drops {phase.kernel_drops}, agents' CPU share "
                            f"{phase.agent_cpu_share}, all CPUs busy {phase.machine_busy:.0%}"
                            + (
                                f"; during the flood {phase.flood_gbit_s:.3f} Gbit/s "
                                f"({phase.flood_retransmits} retransmits)"
                                if phase.flood_gbit_s is not None
                                else ""
                            ),
                            flush=True,
                        )
            finally:
                bench.services.stop()
    one_core = trs_one_core(5.0)
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    direct = [p for p in phases if p.mode == "direct"]
    relayed = [p for p in phases if p.mode == "relayed"]
    ratios = [r.gbit_s / d.gbit_s for d, r in zip(direct, relayed, strict=True) if d.gbit_s]
    rtt_ratios = [
        r.rtt_avg_ms / d.rtt_avg_ms for d, r in zip(direct, relayed, strict=True) if d.rtt_avg_ms
    ]
    flood_ratios = [
        r.flood_gbit_s / r.gbit_s for r in relayed if r.flood_gbit_s is not None and r.gbit_s
    ]
    print(
        f"\nrelayed vs direct, {len(direct)} repeat(s), iperf3 TCP {args.duration:g} s, "
        f"{args.pings} pings at 10 ms; load average before {' '.join(load_before)}, "
        f"after {' '.join(load_after)}; {len(os.sched_getaffinity(0))} CPUs, "
        f"TRS pinned to CPU {bench.trs_cpu} (None: not pinned); "
        f"agents' QUIC engine {args.engine}"
    )
    print(f"  direct  throughput Gbit/s: {_spread([p.gbit_s for p in direct])}")
    print(f"  relayed throughput Gbit/s: {_spread([p.gbit_s for p in relayed])}")
    print(f"  relayed / direct throughput (same repeat): {_spread(ratios)}  (target >= 0.9)")
    print(
        f"  all CPUs busy during iperf3: direct "
        f"{_spread([p.machine_busy for p in direct])}, relayed "
        f"{_spread([p.machine_busy for p in relayed])}"
    )
    print(f"  direct  RTT avg ms: {_spread([p.rtt_avg_ms for p in direct])}")
    print(f"  relayed RTT avg ms: {_spread([p.rtt_avg_ms for p in relayed])}")
    print(f"  relayed / direct RTT: {_spread(rtt_ratios)}")
    print(
        f"  TRS during the relayed iperf3: "
        f"{_spread([p.trs_pps or 0.0 for p in relayed])} pps, per TRS CPU-second "
        f"{_spread([p.trs_pps_per_cpu_s or 0.0 for p in relayed])} pps, CPU share "
        f"{_spread([p.trs_cpu_share or 0.0 for p in relayed])}"
    )
    if flood_ratios:
        print(
            f"  relayed during a {args.flood_pps:,} pps flood (random CIDs + a stolen CID, "
            f"1200 B): {_spread([p.flood_gbit_s or 0.0 for p in relayed])} Gbit/s; "
            f"flood / quiet: {_spread(flood_ratios)}; stolen-CID packets refused "
            f"{[p.flood_spoofed_dropped for p in relayed]}, random-CID packets to the "
            f"TRS's QUIC server {[p.flood_to_local_server for p in relayed]}, flooder "
            f"ever a relay side: {any(p.flood_forwarded_to_flooder for p in relayed)}"
        )
    print(
        f"  TRS on one core, loopback (bench/trs_forward.py): {one_core['relay_pps']:,} pps "
        f"({one_core['relay_gbit_s']} Gbit/s of 1252 B), {one_core['relay_pps_per_cpu_s']:,} "
        f"pps per relay CPU-second (relay got {one_core['relay_cpu_share']:.0%} of its CPU)"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "load_before": load_before,
                    "load_after": load_after,
                    "phases": [asdict(p) for p in phases],
                    "trs_one_core": one_core,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
