#!/usr/bin/env python3
"""Access-policy push latency: from ``PUT /v1/policy`` to the last node holding its filter.

One ``cyphonic-nms serve`` child process on loopback (SQLite registry unless
``--database-url``), ``--nodes`` simulated nodes (real QUIC clients with node certificates,
registered, half tagged ``group=eng``, half ``group=servers``). Each round replaces the
policy (allowing eng -> servers on a different TCP port each time) through the admin REST
and measures, per round: the REST answer time (the NMS answers after its own nodes' filters
are pushed) and the time until every node has received a ``PolicyFilter`` of the new
revision.

    uv run --frozen python bench/policy_push.py [--nodes 50] [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

from cyphonic.pki import init_pki
from cyphonic.registry import create_engine, make_sessionmaker, migrate
from cyphonic_testing.nms import NmsProcess, add_node
from cyphonic_testing.nms_client import NmsProtocolClient, issue_node_identity

DOMAIN = "cyphonic.internal"
TOKEN = "policy-bench-admin-token-0123456789"


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="policy-push-"))
    material = init_pki(work / "pki", domain=DOMAIN, now=datetime.datetime.now(datetime.UTC))
    url = args.database_url or f"sqlite+aiosqlite:///{work}/registry.db"
    await asyncio.to_thread(migrate, url)
    engine = create_engine(url)
    names = [f"n{i}" for i in range(args.nodes)]
    for n in names:
        await add_node(make_sessionmaker(engine), n)
    await engine.dispose()
    nms = NmsProcess(
        pki_dir=work / "pki",
        database_url=url,
        redis_url=None,
        replica_id="bench",
        log_path=work / "nms.log",
        admin_token=TOKEN,
        relay_secret="policy-bench-relay-secret-0123456789",
        # simulated nodes send no keepalives: keep them online for the whole run
        extra_env={"CYPHONIC_KEEPALIVE_INTERVAL_S": "60", "CYPHONIC_OFFLINE_TIMEOUT_S": "600"},
    )
    await nms.start()
    nodes: list[NmsProtocolClient] = []
    try:
        for n in names:
            node = NmsProtocolClient(
                identity=issue_node_identity(material.node_ca, f"{n}.{DOMAIN}"),
                trust=material.trust,
                nms=("127.0.0.1", nms.quic_port),
                server_name=f"nms.svc.{DOMAIN}",
            )
            nodes.append(node)
            await node.connect()
            await node.register()
        async with nms.admin() as admin:
            for i, n in enumerate(names):
                group = "eng" if i % 2 else "servers"
                r = await admin.put(f"/v1/nodes/{n}.{DOMAIN}/tags", json={"tags": {"group": group}})
                r.raise_for_status()
            answer_ms, all_ms = [], []
            for round_ in range(args.rounds):
                rule = {"from": ["group:eng"], "to": ["group:servers"], "proto": "tcp"}
                doc = {"rules": [{**rule, "ports": [1000 + round_]}]}
                start = time.perf_counter()
                r = await admin.put("/v1/policy", json=doc)
                answered = time.perf_counter()
                r.raise_for_status()
                revision = r.json()["revision"]
                async with asyncio.timeout(10):
                    while not all(  # noqa: ASYNC110  (2 ms polling of many nodes)
                        n.of("policy_filter")
                        and n.of("policy_filter")[-1].policy_filter.revision >= revision
                        for n in nodes
                    ):
                        await asyncio.sleep(0.002)
                done = time.perf_counter()
                answer_ms.append((answered - start) * 1000)
                all_ms.append((done - start) * 1000)
        load = os.getloadavg()
        print(f"{args.nodes} nodes, {args.rounds} policy changes, one NMS process")
        print(
            f"REST answer (filters pushed):  median {statistics.median(answer_ms):7.1f} ms"
            f"  max {max(answer_ms):7.1f} ms"
        )
        print(
            f"last node holds new filter:    median {statistics.median(all_ms):7.1f} ms"
            f"  max {max(all_ms):7.1f} ms"
        )
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    finally:
        for node in nodes:
            await node.close()
        nms.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--database-url", help="registry (default: a SQLite file)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
