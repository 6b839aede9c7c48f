#!/usr/bin/env python3
"""Route set-up latency: time from the DNS stub's answer to the first echo reply on a fresh
route, with the real AS, NMS and two ``cyphonic-agent up`` in a namespace test bed.

Run as root from the repository root:

    uv run --frozen python bench/route_setup.py [--pattern 1|2|both] [--rounds 5] [--json]

Per round, inside the connecting node's namespace: one DNS query to its agent's stub (which
asks the NMS; the NMS pushes the RouteDirection to both nodes before it answers), then an
ICMP echo request every 2 ms to the address in the answer until the first reply. The
connecting side's handshake (mutual TLS, both chains verified) and the tunnel's first
packets all fall inside the figure. The peer's agent is then restarted so that the next
round starts without a route. Pattern 1: bob, behind the enterprise firewall, reaches
alice over IPv6; pattern 2: alice, behind NAT and the firewall, reaches bob over IPv4.
Target (node-agent issue): under 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cyphonic_testbed import build, pattern1, pattern2
from cyphonic_testbed.overlay import first_reply_in, start_services

TARGET_MS = 50.0


def measure(pattern: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """``rounds`` fresh routes in the pattern's bed; the probe results and a summary."""
    topology = pattern1() if pattern == 1 else pattern2()
    src, dst = ("bob", "alice") if pattern == 1 else ("alice", "bob")
    with build(topology) as bed:
        services = start_services(bed, workdir=workdir)
        states = services.enrol_all([bed.host("alice"), bed.host("bob")])
        agents = {n: services.start_agent(bed.host(n), states[n]) for n in ("alice", "bob")}
        for agent in agents.values():
            agent.wait_up()
        results = []
        for i in range(rounds):
            load = os.getloadavg()[0]
            result = first_reply_in(bed.host(src), agents[dst].fqdn, timeout=15)
            result["load"] = load
            results.append(result)
            print(
                f"pattern {pattern} round {i + 1}: DNS answer {result['dns_ms']:.1f} ms, "
                f"first echo reply {result['first_reply_ms']:.1f} ms after it "
                f"(load {load:.1f})",
                file=sys.stderr,
                flush=True,
            )
            if i + 1 < rounds:  # a fresh route next time: the peer starts over
                agents[dst].stop()
                agents[dst] = services.start_agent(bed.host(dst), states[dst])
                agents[dst].wait_up()
                agents[src].wait_logged('"event": "tunnel_down"', count=i + 1, timeout=40)
                time.sleep(0.3)
        services.stop()
    ms = [r["first_reply_ms"] for r in results]
    return {
        "pattern": pattern,
        "rounds": results,
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "dns_median_ms": statistics.median(r["dns_ms"] for r in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", choices=("1", "2", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("route_setup.py: needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    patterns = (1, 2) if args.pattern == "both" else (int(args.pattern),)
    print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    summaries = []
    for pattern in patterns:
        with tempfile.TemporaryDirectory(prefix="cyphonic-route-setup-") as tmp:
            os.chmod(tmp, 0o755)
            summaries.append(measure(pattern, args.rounds, Path(tmp)))
    if args.json:
        print(json.dumps(summaries, indent=2))
        return 0
    print(
        f"{'pattern':<8} {'rounds':>6} {'DNS ms':>7} {'first reply ms (median/min/max)':>32}"
        f"  target < {TARGET_MS:g} ms"
    )
    for s in summaries:
        verdict = "PASS" if s["median_ms"] < TARGET_MS else "FAIL"
        print(
            f"{s['pattern']:<8} {len(s['rounds']):>6} {s['dns_median_ms']:>7.1f} "
            f"{s['median_ms']:>14.1f} / {s['min_ms']:.1f} / {s['max_ms']:.1f}"
            f"{'':>8}{verdict}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
