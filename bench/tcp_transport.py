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
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cyphonic_testbed import NetBed
from cyphonic_testbed.overlay import AgentProcess, start_services, start_trs
from cyphonic_testbed.patterns import udp_blocked

SERVICES = ("as", "nms", "trs", "redis")
IPERF_PORT = 5201
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

    def first_reply(self, fqdn: str) -> float:
        proc = self.alice.run(
            [
                sys.executable,
                "-m",
                "cyphonic_testbed.overlay",
                "first-reply",
                "--name",
                fqdn,
                "--timeout",
                "20",
            ],
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"first-reply failed: {proc.stderr}")
        return float(json.loads(proc.stdout)["first_reply_ms"])

    def ping(self, phase: Phase, vip: str, count: int) -> None:
        out = self.alice.run(
            ["ping", "-n", "-q", "-c", str(count), "-i", "0.01", "-W", "2", vip],
            timeout=count * 0.05 + 30,
        ).stdout
        m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
        loss = re.search(r"([\d.]+)% packet loss", out)
        if not m:
            raise RuntimeError(f"ping output not understood: {out}")
        phase.rtt_avg_ms, phase.rtt_max_ms = float(m.group(2)), float(m.group(3))
        phase.ping_loss_pct = float(loss.group(1)) if loss else 0.0

    def iperf(self, vip: str, duration: float) -> tuple[float, int | None]:
        server = self.bob.popen(
            ["iperf3", "-s", "-1", "-B", vip, "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while f":{IPERF_PORT}" not in self.bob.run(["ss", "-Hltn"]).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError("iperf3 server did not listen")
            time.sleep(0.05)
        out = self.alice.run(
            ["iperf3", "-c", vip, "-p", str(IPERF_PORT), "-t", str(duration), "-O", "1", "-J"],
            timeout=duration + 60,
        )
        server.wait(timeout=15)
        if out.returncode != 0:
            raise RuntimeError(f"iperf3 failed: {out.stdout[-2000:]}{out.stderr}")
        end = json.loads(out.stdout)["end"]
        return end["sum_received"]["bits_per_second"] / 1e9, end["sum_sent"].get("retransmits")

    def phase(self, mode: str, repeat: int, *, duration: float, pings: int) -> Phase:
        result = Phase(mode=mode, repeat=repeat)
        self.udp(allowed=mode == "udp")
        alice, bob = self.agents_up()
        try:
            result.carrier = alice.status()["transport"]["carrier"]
            result.first_reply_ms = self.first_reply(bob.fqdn)
            (row,) = [p for p in alice.status()["peers"] if p["fqdn"] == bob.fqdn]
            result.pattern, result.path = row["pattern"], row["path"]
            vip = bob.status()["virtual_ipv4"]
            self.ping(result, vip, pings)
            result.gbit_s, result.retransmits = self.iperf(vip, duration)
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
