#!/usr/bin/env python3
"""TCP 443 transport vs UDP: the same two agents in the same bed, UDP blocked and not.

Run as root from the repository root (network namespaces; about 3 minutes by default):

    .venv/bin/python bench/tcp_transport.py [--repeat 2] [--duration 8] [--json]

The bed is ``cyphonic_testbed.patterns.udp_blocked``: real ``cyphonic-as``, ``cyphonic-nms``
(SQLite registry, TRS directory in a Redis in the bed) and ``cyphonic-trs`` in the cloud;
alice behind an endpoint-independent NAT whose firewall lets no UDP out (only TCP 80/443),
bob on a global IPv4 address. Per repeat, two phases, both agents started afresh on a new
UDP port each time (alice; bob on 443):

* tcp: as built. alice reaches the AS, the NMS and the TRS over TLS on TCP 443; the NMS
  relays her (pattern 3) and the TRS forwards between her TCP stream and bob's UDP;
* udp: gwa's firewall lets UDP 443 out (the bed's ENTERPRISE policy): the NMS decides as
  for any NATed node (pattern 2: alice connects to bob directly, over UDP).

Measured per phase: the time from the DNS stub's answer for bob's name to the first echo
reply over the fresh route (``cyphonic_testbed.overlay first-reply``; target on the
UDP-blocked node: under 1 s), ping RTT over the tunnel (10 ms interval), and iperf3 TCP
throughput through the tunnel (alice -> bob's virtual IPv4, one stream, first second
omitted).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from cyphonic_testbed import NetBed
from cyphonic_testbed.overlay import AgentProcess, first_reply_in, start_services, start_trs
from cyphonic_testbed.patterns import udp_blocked
from cyphonic_testbed.probes import iperf_tcp, ping_stats

SERVICES = ("as", "nms", "trs", "redis")
FIRST_PORT = 21443


@dataclass
class Phase:
    mode: str  # tcp | udp
    repeat: int
    carrier: str = ""
    pattern: str = ""
    path: str = ""
    first_reply_ms: float = 0.0
    rtt_avg_ms: float = 0.0
    rtt_max_ms: float = 0.0
    ping_loss_pct: float = 0.0
    gbit_s: float = 0.0
    retransmits: int | None = None


class Bench:
    def __init__(self, bed: NetBed, workdir: Path) -> None:
        self.bed = bed
        redis = bed.start_redis("redis")
        self.services = start_services(bed, workdir=workdir, nms_args=["--redis-url", redis.url])
        self.trs = start_trs(self.services, redis_url=redis.url)
        self.alice, self.bob = bed.host("alice"), bed.host("bob")
        self.states = self.services.enrol_all([self.alice, self.bob])
        self.port = FIRST_PORT

    def udp(self, allowed: bool) -> None:
        gwa = self.bed.router("gwa")
        rules = gwa.run(["nft", "-a", "list", "chain", "inet", "cytb_fw", "forward"]).stdout
        handles = re.findall(r"udp dport 443 accept # handle (\d+)", rules)
        for handle in handles:
            gwa.run(["nft", "delete", "rule", "inet", "cytb_fw", "forward", "handle", handle])
        if allowed:
            rule = ["udp", "dport", "443", "accept"]
            gwa.run(["nft", "insert", "rule", "inet", "cytb_fw", "forward", *rule], check=True)

    def agents_up(self) -> tuple[AgentProcess, AgentProcess]:
        # bob on UDP 443 (what gwa's firewall lets out when it lets UDP out at all); alice on
        # a new port each phase, so no connection-tracking entry of an earlier one is reused.
        self.port += 1
        agents = [
            self.services.start_agent(self.bob, self.states["bob"]),
            self.services.start_agent(
                self.alice, self.states["alice"], "--quic-port", str(self.port)
            ),
        ]
        for agent in agents:
            agent.wait_up()
        return agents[1], agents[0]

    def ping(self, phase: Phase, vip: str, count: int) -> None:
        stats = ping_stats(self.alice, vip, count=count)
        phase.rtt_avg_ms, phase.rtt_max_ms = stats.avg_ms, stats.max_ms
        phase.ping_loss_pct = stats.loss_pct

    def phase(self, mode: str, repeat: int, *, duration: float, pings: int) -> Phase:
        result = Phase(mode=mode, repeat=repeat)
        self.udp(allowed=mode == "udp")
        alice, bob = self.agents_up()
        try:
            result.carrier = alice.status()["transport"]["carrier"]
            result.first_reply_ms = float(first_reply_in(self.alice, bob.fqdn)["first_reply_ms"])
            (row,) = [p for p in alice.status()["peers"] if p["fqdn"] == bob.fqdn]
            result.pattern, result.path = row["pattern"], row["path"]
            vip = bob.status()["virtual_ipv4"]
            self.ping(result, vip, pings)
            result.gbit_s, result.retransmits = iperf_tcp(
                self.alice, self.bob, vip, seconds=duration
            )
        finally:
            for agent in (alice, bob):
                agent.stop()
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--duration", type=float, default=8.0, help="iperf3 seconds")
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="bench-tcp-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        with NetBed(udp_blocked(services=SERVICES)) as bed:
            bench = Bench(bed, workdir / "overlay")
            try:
                for repeat in range(args.repeat):
                    for mode in ("tcp", "udp"):
                        phase = bench.phase(mode, repeat, duration=args.duration, pings=args.pings)
                        phases.append(phase)
                        print(
                            f"[{mode} #{repeat}] carrier {phase.carrier}, {phase.pattern}, "
                            f"first reply {phase.first_reply_ms:.0f} ms, "
                            f"rtt {phase.rtt_avg_ms:.2f} ms, {phase.gbit_s:.3f} Gbit/s",
                            file=sys.stderr,
                        )
            finally:
                bench.services.stop()
    if args.json:
        print(json.dumps([asdict(p) for p in phases], indent=2))
        return 0
    print(
        f"{'phase':<6} {'carrier':<8} {'pattern':<13} {'first reply':>12} {'RTT avg':>9} "
        f"{'Gbit/s':>8}"
    )
    for mode in ("tcp", "udp"):
        rows = [p for p in phases if p.mode == mode]
        for p in rows:
            print(
                f"{mode:<6} {p.carrier:<8} {p.pattern:<13} {p.first_reply_ms:>9.0f} ms "
                f"{p.rtt_avg_ms:>6.2f} ms {p.gbit_s:>8.3f}"
            )
        print(
            f"{mode:<6} median: first reply {statistics.median(p.first_reply_ms for p in rows):.0f}"
            f" ms, {statistics.median(p.gbit_s for p in rows):.3f} Gbit/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
