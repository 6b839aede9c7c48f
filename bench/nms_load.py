#!/usr/bin/env python3
"""NMS load benchmark: registrations/s and route decisions/s on ONE ``cyphonic-nms`` process.

Simulated nodes are real QUIC clients with node certificates (no TUN), each with its own UDP
socket, all in this process; the NMS runs as a child process on loopback. Phases:

1. connect   every node opens its mutual-TLS QUIC connection (handshakes/s, for context)
2. register  first registration of every node: NAT detection + lease allocation (INSERT)
3. re-register the same nodes again (lease exists; network information updated)
4. route     random pairs ask for routes: decide the pattern, push a RouteDirection to
             both nodes, answer; counted when the answer arrives

    uv run --frozen python bench/nms_load.py [--nodes 200] [--routes 2000] [--concurrency 32]
                                             [--database-url postgresql://...] [--redis-url ...]

Without ``--database-url`` the registry is a SQLite file in a temporary directory (the
embedded default). Traffic stays on loopback; every loop is bounded by the counts given.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from cyphonic.pki import init_pki
from cyphonic.registry import Node, create_engine, make_sessionmaker, migrate
from cyphonic_nms.routing import Endpoint
from cyphonic_testing.simnode import SimulatedNode, issue_node_identity

DOMAIN = "cyphonic.internal"
TOKEN = "nms-bench-admin-token-0123456789"


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _enrol(database_url: str, names: list[str]) -> None:
    engine = create_engine(database_url)
    now = datetime.datetime.now(datetime.UTC)
    try:
        async with make_sessionmaker(engine)() as s, s.begin():
            s.add_all(
                Node(
                    name=n,
                    fqdn=f"{n}.{DOMAIN}",
                    state="active",
                    tags={},
                    device_info={},
                    created_at=now,
                    updated_at=now,
                )
                for n in names
            )
    finally:
        await engine.dispose()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _phase(
    name: str, jobs: list[Callable[[], Awaitable[object]]], concurrency: int, nms_pid: int
) -> dict[str, float]:
    """Run ``jobs`` with at most ``concurrency`` in flight; rate and latency figures."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors = 0

    async def run(job: Callable[[], Awaitable[object]]) -> None:
        nonlocal errors
        async with gate:
            started = time.perf_counter()
            try:
                await job()
            except Exception as exc:
                errors += 1
                if errors <= 3:
                    print(f"  {name}: error {type(exc).__name__}: {exc}", file=sys.stderr)
                return
            latencies.append(time.perf_counter() - started)

    cpu_before = _cpu_seconds(nms_pid)
    started = time.perf_counter()
    await asyncio.gather(*(run(j) for j in jobs))
    elapsed = time.perf_counter() - started
    nms_cpu = _cpu_seconds(nms_pid) - cpu_before
    latencies.sort()
    figures = {
        "count": float(len(latencies)),
        "errors": float(errors),
        "seconds": elapsed,
        "per_second": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else 0.0,
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else 0.0,
        "nms_cpu_ms_each": 1000 * nms_cpu / len(latencies) if latencies else 0.0,
    }
    print(
        f"{name:<12} {int(figures['count']):>6} ok {errors:>4} err "
        f"{figures['seconds']:7.2f} s {figures['per_second']:9.1f} /s "
        f"p50 {figures['p50_ms']:7.1f} ms  p99 {figures['p99_ms']:7.1f} ms  "
        f"NMS CPU {figures['nms_cpu_ms_each']:5.2f} ms each",
        flush=True,
    )
    return figures


def _launch(
    env: dict[str, str], log_path: Path, *, profile: Path | None
) -> subprocess.Popen[bytes]:
    prefix = ["-m", "cProfile", "-o", str(profile)] if profile else []
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, *prefix, "-m", "cyphonic_nms.cli", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def main_async(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="nms-bench-"))
    material = init_pki(work / "pki", domain=DOMAIN, now=datetime.datetime.now(datetime.UTC))
    database_url = args.database_url or f"sqlite+aiosqlite:///{work}/registry.db"
    await asyncio.to_thread(migrate, database_url)
    names = [f"bench-{i:05d}" for i in range(args.nodes)]
    await _enrol(database_url, names)

    quic_port, http_port = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
    env = {
        **os.environ,
        "CYPHONIC_ENVIRONMENT": "test",
        "CYPHONIC_DATABASE_URL": database_url,
        "CYPHONIC_PKI_DIR": str(work / "pki"),
        "CYPHONIC_QUIC_HOST": "127.0.0.1",
        "CYPHONIC_QUIC_PORT": str(quic_port),
        "CYPHONIC_HTTP_PORT": str(http_port),
        "CYPHONIC_ADMIN_TOKEN": TOKEN,
        "CYPHONIC_REPLICA_ID": "nms-bench",
        "CYPHONIC_RELAY_TOKEN_SECRET": "bench-relay-secret-0123456789",
        "CYPHONIC_LOG_LEVEL": "warning",
        # Relayed routes need a TRS; its address is only handed out, never dialled here.
        "CYPHONIC_TRS_ENDPOINTS": '["127.0.0.1:4433"]',
    }
    if args.redis_url:
        env["CYPHONIC_REDIS_URL"] = args.redis_url
    log_path = work / "nms.log"
    proc = _launch(env, log_path, profile=args.profile)
    nodes: list[SimulatedNode] = []
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                if proc.poll() is not None:
                    print(log_path.read_text()[-3000:], file=sys.stderr)
                    return 1
                try:
                    if (await client.get(f"http://127.0.0.1:{http_port}/readyz")).is_success:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the QUIC endpoint opens right after the REST server
        print(
            f"NMS pid {proc.pid}; {args.nodes} simulated nodes; registry "
            f"{'postgres' if 'postgres' in database_url else 'sqlite'}; "
            f"{'redis' if args.redis_url else 'in-process'} presence",
            flush=True,
        )
        identities = [issue_node_identity(material.node_ca, f"{n}.{DOMAIN}") for n in names]
        nodes = [
            SimulatedNode(
                identity=ident,
                trust=material.trust,
                nms=("127.0.0.1", quic_port),
                server_name=f"nms.svc.{DOMAIN}",
            )
            for ident in identities
        ]
        await _phase("connect", [n.connect for n in nodes], args.concurrency, proc.pid)
        nodes = [n for n in nodes if n.session is not None]
        rng = random.Random(7)

        def register(node: SimulatedNode) -> Callable[[], Awaitable[object]]:
            # Half the nodes report a private address: seen as behind NAT.
            nat = rng.random() < 0.5
            addresses = [Endpoint.parse(f"192.168.1.2:{node.local.port}")] if nat else None
            return lambda: node.register(addresses)

        reg = await _phase("register", [register(n) for n in nodes], args.concurrency, proc.pid)
        await _phase("re-register", [register(n) for n in nodes], args.concurrency, proc.pid)

        def route() -> Callable[[], Awaitable[object]]:
            a, b = rng.sample(nodes, 2)
            return lambda: a.route(fqdn=b.fqdn)

        routes = await _phase(
            "route", [route() for _ in range(args.routes)], args.concurrency, proc.pid
        )
        received = sum(len(n.of("route_direction")) for n in nodes)
        print(
            f"route_direction pushes received: {received} (expected {2 * int(routes['count'])})",
            flush=True,
        )
        print(
            f"RESULT registrations_per_s={reg['per_second']:.1f} "
            f"route_decisions_per_s={routes['per_second']:.1f} "
            f"nms_cpu_ms_per_registration={reg['nms_cpu_ms_each']:.2f} "
            f"nms_cpu_ms_per_route={routes['nms_cpu_ms_each']:.2f}",
            flush=True,
        )
        return 0 if reg["errors"] == 0 and routes["errors"] == 0 else 1
    finally:
        for node in nodes:
            await node.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=200, help="simulated nodes (default 200)")
    parser.add_argument("--routes", type=int, default=2000, help="route requests (default 2000)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="requests in flight (default 32)"
    )
    parser.add_argument("--database-url", help="registry URL (default: SQLite in a temp dir)")
    parser.add_argument("--redis-url", help="Redis URL (default: in-process presence)")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the NMS here")
    args = parser.parse_args()
    if args.nodes < 2 or args.nodes > 5000 or args.routes > 100_000:
        parser.error("--nodes must be 2..5000 and --routes at most 100000")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
