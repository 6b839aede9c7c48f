#!/usr/bin/env python3
"""Cost of one scrape of the agent's metrics endpoint (cyphonic_agent.metrics).

    uv run --frozen python bench/agent_metrics.py [--peers 10,100,1000] [--scrapes 50]

No agent and no socket: a status snapshot with ``--peers`` peer rows (four tunnel counters
each) is turned into the Prometheus text exposition, as ``GET /metrics`` does on the
agent's event loop. Printed per peer count: milliseconds per scrape (best of 5 runs of
``--scrapes``) and the size of the answer. This is the time the event loop is busy per
scrape; nothing is added to the per-packet path.
"""

from __future__ import annotations

import argparse
import time

from cyphonic_agent.metrics import AgentFacts, agent_registry
from cyphonic_agent.status import AgentStatus, PeerStatus
from prometheus_client import generate_latest


def snapshot(peers: int) -> AgentStatus:
    return AgentStatus(
        fqdn="edge.cyphonic.internal",
        nms_state="connected",
        peers=[
            PeerStatus(
                fqdn=f"peer{i}.cyphonic.internal",
                state="up",
                pattern=("direct", "nat_connects", "relay")[i % 3],
                tx_packets=i * 10,
                tx_bytes=i * 10_000,
                rx_packets=i * 7,
                rx_bytes=i * 7_000,
            )
            for i in range(peers)
        ],
        policy={"revision": 3, "flows": 40, "passed": 10**6, "dropped": {"not_allowed": 17}},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="10,100,1000")
    parser.add_argument("--scrapes", type=int, default=50)
    args = parser.parse_args()
    facts = AgentFacts(version="0.1.0", certificate_not_after=1.9e9, crl_number=4, crl_age_s=3.0)
    print(f"{'peers':>6}  {'ms/scrape':>9}  {'bytes':>8}")
    for n in (int(x) for x in args.peers.split(",")):
        status = snapshot(n)
        registry = agent_registry(lambda status=status: status, lambda: facts)
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            for _ in range(args.scrapes):
                body = generate_latest(registry)
            best = min(best, (time.process_time() - started) / args.scrapes)
        print(f"{n:>6}  {best * 1000:>9.2f}  {len(body):>8}")


if __name__ == "__main__":
    main()
