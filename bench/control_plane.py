#!/usr/bin/env python3
"""Control-plane benchmark: N simulated nodes against several NMS replicas, TRS replicas,
Postgres and Redis, phase by phase, with the CPU each process spends per operation.

The nodes are the agent's own signalling loop (``cyphonic_agent.nms.NmsClient``: login
skipped, dial, register, keepalive, reconnect with ``control.Reconnect``'s back-off), each
with its own node certificate and UDP socket, no TUN; they run in ``--workers`` client
processes so that the client side is measured (its CPU is printed) and spread over cores.
Postgres and Redis are private instances of this run (a temporary cluster and a
redis-server on free loopback ports): the benchmark restarts them.

    uv run --frozen python bench/control_plane.py [--nodes 1000] [--replicas 2] [--trs 2]
        [--workers 3] [--idle-s 30] [--routes 3000] [--skip-churn] [--skip-restarts]
        [--ping-s 25] [--keepalive-s 15]

10,000 nodes: ``--nodes 10000 --workers 4 --idle-s 60 --skip-churn --skip-restarts``
(register + idle + storm). Each node holds a UDP socket and a timerfd: a client process
raises its open-file limit to the hard limit (20,000 here), so 2,500 nodes a process fit.

Phases:
  register   every node connects (mutual-TLS QUIC handshake) and registers, --concurrency
             per worker in flight; rate, latency (handshake + registration)
  idle       --idle-s of keepalives only (QUIC PINGs every --ping-s; --ping-s 0: Keepalive
             requests every --keepalive-s, as older agents do); CPU % of each process,
             memory per node; take --idle-s above the PING interval
  churn      route requests between random nodes (decision + RouteDirection to both),
             moves (re-registration with a new address: routes re-decided), nodes going
             offline and coming back
  kill       SIGKILL one NMS replica; storm_s = until every one of its nodes registered
             again at another replica (detection by keepalive, back-off, dial); then the
             CPU of the survivor and of each client process while nodes came back
             (``storm load``), the nodes back every 5 s (``storm timeline``) and, if some
             are not back in --storm-limit-s, which and what their agent is doing
  redis      Redis restarted empty: until presence of every node and the TRS directory
             are back, and routes can be decided again
  postgres   Postgres restarted (fast shutdown): until registrations and route requests
             succeed again; every lease unchanged

The last line: ``RESULT nodes=N registrations_per_s=R route_decisions_per_s=D storm_s=S
idle_cpu_pct=P`` (R and D summed over the replicas; P: NMS replicas + Redis + Postgres
during the idle phase, in % of one core). Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

DOMAIN = "cyphonic.internal"
PREFIX = "cpbench:"

# --------------------------------------------------------------------------- measuring


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux /proc); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """``pid`` and its direct children (Postgres backends)."""
    out = [pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry.name))
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]


# --------------------------------------------------------------------------- worker side


@dataclass
class SimNode:
    """One simulated node: the agent's NMS client on its own endpoint."""

    index: int
    fqdn: str
    client: Any  # cyphonic_agent.nms.NmsClient
    home: int
    nat: bool
    port_shift: int = 0
    registered_at: list[float] = field(default_factory=list)
    registered_on: list[int] = field(default_factory=list)
    """The replica of each registration (``home`` is only the one dialled first)."""
    pushes: Counter[str] = field(default_factory=Counter)
    task: asyncio.Task[None] | None = None
    started: float = 0.0


class Worker:
    """A client process: builds its nodes, answers the coordinator's commands."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.nodes: list[SimNode] = []
        self.names: list[str] = config["all_names"]
        self.gate: asyncio.Semaphore | None = None
        self.first_registration: dict[int, asyncio.Future[None]] = {}

    async def build(self) -> None:
        from cyphonic.pki import init_pki
        from cyphonic.quic import QuicEndpoint
        from cyphonic_agent.config import AgentSettings
        from cyphonic_agent.nms import NmsClient
        from cyphonic_agent.routes import Candidate
        from cyphonic_testing.nms_client import issue_node_identity, nms_only_state

        cfg = self.config
        material = init_pki(
            Path(cfg["pki_dir"]), domain=DOMAIN, now=datetime.datetime.now(datetime.UTC)
        )
        settings = AgentSettings(
            state_dir=Path(cfg["work"]),
            connect_timeout_s=cfg["connect_timeout_s"],
            peer_timeout_s=cfg["peer_timeout_s"],
            reconnect_max_s=cfg["reconnect_max_s"],
            log_level="error",
        )
        nms = [Candidate("127.0.0.1", p) for p in cfg["nms_ports"]]
        rng = random.Random(cfg["seed"])
        for position, (index, name) in enumerate(cfg["mine"]):
            fqdn = f"{name}.{DOMAIN}"
            identity = issue_node_identity(material.node_ca, fqdn)
            endpoint = await QuicEndpoint.open(
                host="127.0.0.1",
                port=0,
                identity=identity,
                trust=material.trust,
                idle_timeout=cfg["peer_timeout_s"],
            )
            # By position in this worker, not by global index: every worker holds nodes of
            # every replica, so a dead replica's storm is spread over all client processes.
            home = position % len(nms)
            state = nms_only_state(fqdn, name, DOMAIN)
            node = SimNode(index=index, fqdn=fqdn, client=None, home=home, nat=rng.random() < 0.5)

            def local(_nms: Any, ep: Any = endpoint, n: SimNode = node) -> Any:
                return self._local(ep, n)

            async def registered(_reg: Any, link: Any, n: SimNode = node) -> None:
                n.registered_at.append(time.monotonic())
                n.registered_on.append(nms.index(link.endpoint))
                fut = self.first_registration.get(n.index)
                if fut is not None and not fut.done():
                    fut.set_result(None)

            def pushed(envelope: Any, n: SimNode = node) -> None:
                n.pushes[envelope.WhichOneof("body")] += 1

            client = NmsClient(
                settings=settings,
                state=state,
                fqdn=fqdn,
                domain=DOMAIN,
                endpoint=lambda ep=endpoint: ep,
                on_push=pushed,
                on_registered=registered,
                local_endpoints=local,
            )
            # Login skipped: the NMS endpoints are known, home replica first.
            client.policy.nms_endpoints = nms[home:] + nms[:home]
            client.policy.failures_before_login = 1 << 30
            client.log = _Quiet()
            node.client = client
            self.nodes.append(node)

    async def _local(self, endpoint: Any, node: SimNode) -> list[Any]:
        host, port = endpoint.local_address
        port = int(port) + node.port_shift
        if node.nat:  # reports a private address: the NMS sees it as behind NAT
            return [(ip_address("192.168.1.2"), port)]
        return [(ip_address(host), port)]

    async def register(self, concurrency: int) -> dict[str, Any]:
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        errors = 0
        loop = asyncio.get_running_loop()

        async def bring_up(node: SimNode) -> None:
            nonlocal errors
            async with gate:
                fut: asyncio.Future[None] = loop.create_future()
                self.first_registration[node.index] = fut
                started = time.monotonic()
                node.task = asyncio.create_task(node.client.run())
                try:
                    await asyncio.wait_for(asyncio.shield(fut), 120)
                except TimeoutError:
                    errors += 1
                    return
                latencies.append(time.monotonic() - started)

        started = time.monotonic()
        await asyncio.gather(*(bring_up(n) for n in self.nodes))
        return {"latencies": latencies, "errors": errors, "seconds": time.monotonic() - started}

    async def routes(self, count: int, concurrency: int, seed: int) -> dict[str, Any]:
        from cyphonic.errors import CyphonicError
        from cyphonic.v1 import signalling_pb2 as pb
        from cyphonic.wire.messages import expect, wrap

        rng = random.Random(seed)
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        errors: Counter[str] = Counter()

        async def one() -> None:
            async with gate:
                node = rng.choice(self.nodes)
                peer = rng.choice(self.names)
                session = node.client.session()
                if session is None or peer == node.fqdn.split(".")[0]:
                    errors["not_connected_or_self"] += 1
                    return
                started = time.monotonic()
                try:
                    answer = await session.request(
                        wrap(pb.RouteRequest(fqdn=f"{peer}.{DOMAIN}")), timeout=15
                    )
                    expect(answer, pb.RouteResponse)
                except CyphonicError as exc:
                    errors[exc.code_name] += 1
                    return
                latencies.append(time.monotonic() - started)

        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(count)))
        return {
            "latencies": latencies,
            "errors": dict(errors),
            "seconds": time.monotonic() - started,
        }

    async def moves(self, count: int, seed: int) -> dict[str, Any]:
        """Re-register ``count`` nodes with a different reported address (a move)."""
        rng = random.Random(seed)
        latencies: list[float] = []
        errors = 0
        for node in rng.sample(self.nodes, min(count, len(self.nodes))):
            link = node.client.link
            if link is None:
                errors += 1
                continue
            node.port_shift += 1
            node.nat = not node.nat
            started = time.monotonic()
            try:
                await node.client.register(link)
            except Exception:
                errors += 1
                continue
            latencies.append(time.monotonic() - started)
        return {"latencies": latencies, "errors": errors}

    async def offline(self, count: int, seed: int) -> dict[str, Any]:
        """Close ``count`` nodes' NMS connections: offline, then back by the agent's loop."""
        from cyphonic.errors import Unavailable

        rng = random.Random(seed)
        chosen = rng.sample(self.nodes, min(count, len(self.nodes)))
        marks = {n.index: len(n.registered_at) for n in chosen}
        for node in chosen:
            link = node.client.link
            if link is not None:
                link.session.close(Unavailable("bench: node going offline"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(len(n.registered_at) > marks[n.index] for n in chosen):
                break
            await asyncio.sleep(0.2)
        back = sum(len(n.registered_at) > marks[n.index] for n in chosen)
        return {"closed": len(chosen), "back": back}

    def status(self, since: float | None, *, brief: bool = False) -> dict[str, Any]:
        """Nodes by the replica they registered at last; with ``since``, those that were
        registered at replica 0 then and registered again after it (``again``); ``brief``:
        only that and the CPU (polled twice a second in the storm, on the cores it
        measures)."""
        now = time.monotonic()
        by_replica: Counter[int] = Counter()
        again: Counter[int] = Counter()
        last_again = 0.0
        behind: list[str] = []  # nodes of replica 0 not registered since ``since``
        for node in self.nodes:
            if not node.registered_on:
                continue
            by_replica[node.registered_on[-1]] += 1
            if since is None:
                continue
            i = bisect.bisect_left(node.registered_at, since)
            if i == 0 or node.registered_on[i - 1] != 0:
                continue  # not at replica 0 at ``since``
            if i < len(node.registered_at):
                again[0] += 1
                last_again = max(last_again, node.registered_at[i])
            elif len(behind) < 5:
                c, task = node.client, node.task
                ended = task is not None and task.done() and not task.cancelled()
                died = f" task ended: {task.exception()!r}" if ended else ""
                behind.append(f"{node.fqdn}: {c.status} {c.detail!r}{died}")
        cpu = cpu_seconds(os.getpid())
        if brief:
            return {"now": now, "again": dict(again), "last_again": last_again, "cpu": cpu}
        connected = sum(1 for n in self.nodes if n.client.status == "connected")
        pushes: Counter[str] = Counter()
        for node in self.nodes:
            pushes.update(node.pushes)
        return {
            "now": now,
            "nodes": len(self.nodes),
            "connected": connected,
            "by_replica": dict(by_replica),
            "again": dict(again),
            "last_again": last_again,
            "pushes": dict(pushes),
            "warnings": dict(WARNINGS),
            "behind": behind,
            "cpu": cpu,
        }

    async def close(self) -> None:
        for node in self.nodes:
            if node.task is not None:
                node.task.cancel()
        for node in self.nodes:
            if node.task is not None:
                with contextlib.suppress(BaseException):  # cancelled or failed: closing anyway
                    await node.task
            endpoint = node.client.endpoint()
            await endpoint.close("bench over")


WARNINGS: Counter[str] = Counter()
"""The agents' warnings in this worker, by event and the start of the error."""


class _Quiet:
    """A logger that counts warnings instead of printing them (10,000 nodes' reconnect
    warnings are noise; their kinds and numbers are reported)."""

    def warning(self, event: str, **fields: Any) -> None:
        WARNINGS[f"{event}: {str(fields.get('error', ''))[:60]}"] += 1

    def __getattr__(self, _name: str) -> Any:
        return lambda *a, **k: None


async def worker_main() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)  # the config names every node
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    # Replies on a private copy of stdout; anything else printed (logs) goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(obj: dict[str, Any]) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    from cyphonic.log import configure
    from cyphonic.service import settle_collector

    configure("warning")
    # A node is a UDP socket and a timerfd: thousands per process need more than 1024 fds.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    config = json.loads(await reader.readline())
    # Thousands of agents' connections in one process: a heap like a replica's, not like
    # one agent's (its full collections stopped every node of the process for up to 2 s).
    settle_collector()
    worker = Worker(config)
    await worker.build()
    reply({"ok": True, "nodes": len(worker.nodes), "cpu": cpu_seconds(os.getpid())})
    try:
        while True:
            line = await reader.readline()
            if not line:
                return 0
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "register":
                result = await worker.register(cmd["concurrency"])
            elif op == "routes":
                result = await worker.routes(cmd["count"], cmd["concurrency"], cmd["seed"])
            elif op == "moves":
                result = await worker.moves(cmd["count"], cmd["seed"])
            elif op == "offline":
                result = await worker.offline(cmd["count"], cmd["seed"])
            elif op == "status":
                result = worker.status(cmd.get("since"), brief=cmd.get("brief", False))
            elif op == "quit":
                await worker.close()
                reply({"ok": True})
                return 0
            else:
                result = {"error": f"unknown op {op}"}
            result["cpu"] = cpu_seconds(os.getpid())
            reply(result)
    finally:
        await worker.close()


# --------------------------------------------------------------------------- coordinator


class WorkerProcess:
    def __init__(self, config: dict[str, Any], log_path: Path) -> None:
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.send(config)

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    async def receive(self, wait_s: float = 1800) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), wait_s)
        if not line:
            raise RuntimeError(f"worker {self.proc.pid} exited ({self.proc.poll()})")
        result: dict[str, Any] = json.loads(line)
        return result

    async def call(self, obj: dict[str, Any], wait_s: float = 1800) -> dict[str, Any]:
        self.send(obj)
        return await self.receive(wait_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "quit"})
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


async def all_call(workers: list[WorkerProcess], obj: dict[str, Any]) -> list[dict[str, Any]]:
    for w in workers:
        w.send(obj)
    return list(await asyncio.gather(*(w.receive() for w in workers)))


@dataclass
class Processes:
    """Pids whose CPU the phases report."""

    nms: dict[str, int]
    trs: dict[str, int]
    redis: Any
    postgres: Any
    workers: list[WorkerProcess]

    def snapshot(self) -> dict[str, float]:
        snap = {name: cpu_seconds(pid) for name, pid in self.nms.items()}
        snap.update({name: cpu_seconds(pid) for name, pid in self.trs.items()})
        snap["redis"] = cpu_seconds(self.redis.pid) if self.redis.proc else 0.0
        snap["postgres"] = (
            sum(cpu_seconds(p) for p in children(self.postgres.pid)) if self.postgres.proc else 0
        )
        snap["clients"] = sum(cpu_seconds(w.proc.pid) for w in self.workers)
        return snap


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: max(0.0, after.get(k, 0.0) - v) for k, v in before.items()}


IDLE_RATE: dict[str, float] = {}
"""CPU seconds per second of each process while idle (keepalives, periodic jobs): taken
off the phases measured after the idle phase, so that CPU per operation is the operation's."""


def report(
    phase: str,
    *,
    ops: int,
    seconds: float,
    latencies: list[float],
    errors: object,
    cpu: dict[str, float],
    extra: str = "",
) -> dict[str, float]:
    cpu = {k: max(0.0, v - IDLE_RATE.get(k, 0.0) * seconds) for k, v in cpu.items()}
    rate = ops / seconds if seconds else 0.0
    p50 = 1000 * statistics.median(latencies) if latencies else 0.0
    p99 = 1000 * percentile(latencies, 0.99)
    per_op = " ".join(f"{k}={1000 * v / ops:.2f}" for k, v in cpu.items() if ops) if ops else ""
    print(
        f"{phase:<10} {ops:>7} ops {seconds:7.2f} s {rate:8.1f}/s p50 {p50:7.1f} ms "
        f"p99 {p99:7.1f} ms errors {errors} {extra}",
        flush=True,
    )
    if per_op:
        net = " (net of idle)" if IDLE_RATE else ""
        print(f"{'':<10} CPU ms per op{net}: {per_op}", flush=True)
    return {"rate": rate, "p50": p50, "p99": p99}


def storm_load(samples: list[tuple[float, int, float, list[float]]]) -> str:
    """CPU % of a core of the survivor and of each client process while nodes came back
    (from the first re-registration seen to the last): a process near 100% is the
    bottleneck (each is one Python thread), one well below it is waiting for others."""
    busy = [s for s in samples if s[1] > 0]
    if len(busy) < 2:
        return "storm load: too few samples"
    (t0, n0, nms0, w0), (t1, n1, nms1, w1) = busy[0], busy[-1]
    span = t1 - t0
    if span <= 0:
        return "storm load: too short"
    clients = [100 * (b - a) / span for a, b in zip(w0, w1, strict=True)]
    return (
        f"storm load over {span:.1f} s ({n1 - n0} nodes back, {(n1 - n0) / span:.0f}/s): "
        f"CPU % of a core survivor={100 * (nms1 - nms0) / span:.0f} clients="
        + "/".join(f"{c:.0f}" for c in clients)
        + f" (sum {sum(clients):.0f}; two cores = 200)"
    )


def storm_timeline(samples: list[tuple[float, int, float, list[float]]], killed_at: float) -> str:
    """Nodes of the dead replica back, every 5 s after the kill: detection (a PING
    interval and its ack wait) is the first ~35 s; a long tail is the survivor's pacing."""
    marks: list[str] = []
    step = 5.0
    for t, again, _nms, _w in samples:
        while t - killed_at >= step * (len(marks) + 1):
            marks.append(f"{step * (len(marks) + 1):.0f}s={again}")
    return "storm timeline: " + " ".join(marks)


def endpoint_stats(log: Path) -> str:
    """The refusal counters of a service's QUIC endpoint, logged when it closed."""
    if not log.exists():
        return "no log"
    lines = [x for x in log.read_text(errors="replace").splitlines() if "endpoint_stats" in x]
    if not lines:
        return "not logged (--log-level info logs them)"
    keys = (
        "connections_accepted",
        "handshakes_refused",
        "refusals_sent",
        "retries_sent",
        "passes_cut",
    )
    try:
        fields = json.loads(lines[-1])  # CYPHONIC_LOG_FORMAT=json
    except ValueError:
        fields = dict(re.findall(r"(\w+)=(\S+)", lines[-1]))
    return " ".join(f"{k}={fields.get(k, '?')}" for k in keys)


async def enrol(url: str, names: list[str]) -> None:
    from cyphonic.registry import Node, create_engine
    from sqlalchemy import insert

    engine = create_engine(url)
    now = datetime.datetime.now(datetime.UTC)
    rows = [
        {
            "name": n,
            "fqdn": f"{n}.{DOMAIN}",
            "state": "active",
            "tags": {},
            "device_info": {},
            "created_at": now,
            "updated_at": now,
        }
        for n in names
    ]
    try:
        async with engine.begin() as conn:
            for i in range(0, len(rows), 2000):
                await conn.execute(insert(Node), rows[i : i + 2000])
    finally:
        await engine.dispose()


async def leases_snapshot(url: str) -> dict[int, tuple[str, str]]:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        rows = await conn.fetch("SELECT node_id, ipv4, ipv6 FROM address_leases")
    finally:
        await conn.close()
    return {r["node_id"]: (r["ipv4"], r["ipv6"]) for r in rows}


def _s(seconds: float | None) -> str:
    return "never (60 s)" if seconds is None or seconds == float("inf") else f"{seconds:.1f} s"


async def wait_until(check: Any, *, within_s: float, every_s: float = 0.2) -> float | None:
    """Seconds until ``await check()`` is true; None after ``within_s``."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        try:
            if await check():
                return time.monotonic() - started
        except Exception:  # the server is coming back; ask again
            pass
        await asyncio.sleep(every_s)
    return None


async def churn(
    args: argparse.Namespace, workers: list[WorkerProcess], procs: Processes, redis_url: str
) -> dict[str, Any]:
    """Route requests, moves, offline-and-back; the routes phase's report."""
    import redis.asyncio as aioredis

    per_worker = max(1, args.routes // args.workers)
    before = procs.snapshot()
    started = time.monotonic()
    results = await asyncio.gather(
        *(
            w.call(
                {
                    "op": "routes",
                    "count": per_worker,
                    "concurrency": args.concurrency,
                    "seed": i,
                }
            )
            for i, w in enumerate(workers)
        )
    )
    seconds = time.monotonic() - started
    lat = [x for r in results for x in r["latencies"]]
    errs: Counter[str] = Counter()
    for r in results:
        errs.update(r["errors"])
    probe = aioredis.Redis.from_url(redis_url)
    stored_routes = int(await probe.zcard(f"{PREFIX}nms:route-index"))
    await probe.aclose()
    route = report(
        "routes",
        ops=len(lat),
        seconds=seconds,
        latencies=lat,
        errors=dict(errs),
        cpu=cpu_delta(before, procs.snapshot()),
        extra=f"({stored_routes} routes stored)",
    )
    moves_each = max(1, args.moves // args.workers)
    before = procs.snapshot()
    started = time.monotonic()
    results = await all_call(workers, {"op": "moves", "count": moves_each, "seed": 99})
    lat = [x for r in results for x in r["latencies"]]
    report(
        "moves",
        ops=len(lat),
        seconds=time.monotonic() - started,
        latencies=lat,
        errors=sum(r["errors"] for r in results),
        cpu=cpu_delta(before, procs.snapshot()),
    )
    before = procs.snapshot()
    started = time.monotonic()
    results = await all_call(workers, {"op": "offline", "count": moves_each, "seed": 7})
    closed = sum(r["closed"] for r in results)
    back = sum(r["back"] for r in results)
    report(
        "offline",
        ops=back,
        seconds=time.monotonic() - started,
        latencies=[],
        errors=closed - back,
        cpu=cpu_delta(before, procs.snapshot()),
        extra=f"({closed} closed, {back} back)",
    )
    return route


async def main_async(args: argparse.Namespace) -> int:
    import redis.asyncio as aioredis
    from cyphonic.pki import init_pki
    from cyphonic.registry import migrate
    from cyphonic_testing.private_servers import PrivatePostgres, PrivateRedis, available
    from cyphonic_testing.processes import ServiceProcess, free_port

    why = available()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cp-bench-"))
    os.chmod(work, 0o755)
    pg = PrivatePostgres(work / "pg")
    rds = PrivateRedis(work / "redis")
    nms_procs: list[ServiceProcess] = []
    trs_procs: list[ServiceProcess] = []
    workers: list[WorkerProcess] = []
    try:
        pg.start(max_connections=50 + 25 * args.replicas)
        rds.start()
        url = await pg.create_database("registry")
        await asyncio.to_thread(migrate, url)
        init_pki(work / "pki", domain=DOMAIN, now=datetime.datetime.now(datetime.UTC))
        names = [f"n{i:06d}" for i in range(args.nodes)]
        await enrol(url, names)
        common = {
            "CYPHONIC_DATABASE_URL": url,
            "CYPHONIC_REDIS_URL": rds.url,
            "CYPHONIC_REDIS_PREFIX": PREFIX,
            "CYPHONIC_PKI_DIR": str(work / "pki"),
            "CYPHONIC_DOMAIN": DOMAIN,
            "CYPHONIC_QUIC_HOST": "127.0.0.1",
            "CYPHONIC_LOG_LEVEL": args.log_level,
            "CYPHONIC_KEEPALIVE_INTERVAL_S": str(args.keepalive_s),
            "CYPHONIC_PING_INTERVAL_S": str(args.ping_s),
            # The replicas share a ticket secret, as the chart gives them one: a node of a
            # dead replica resumes its TLS session at another (--no-resumption: full ones).
            **(
                {}
                if args.no_resumption
                else {"CYPHONIC_SESSION_TICKET_SECRET": secrets.token_hex(32)}
            ),
            **(
                {"CYPHONIC_MAX_PENDING_REGISTRATIONS": str(args.max_pending)}
                if args.max_pending
                else {}
            ),
        }
        nms_ports = [free_port(socket.SOCK_DGRAM, host="127.0.0.1") for _ in range(args.replicas)]
        for i, port in enumerate(nms_ports):
            nms_procs.append(
                ServiceProcess(
                    "cyphonic_nms.cli",
                    log_path=work / f"nms-{i}.log",
                    ready_marker=b"quic_listening" if args.log_level == "info" else b"",
                    env={
                        **common,
                        "CYPHONIC_QUIC_PORT": str(port),
                        "CYPHONIC_REPLICA_ID": f"nms-{i}",
                    },
                )
            )
        for i in range(args.trs):
            port = free_port(socket.SOCK_DGRAM, host="127.0.0.1")
            trs_procs.append(
                ServiceProcess(
                    "cyphonic_trs.cli",
                    log_path=work / f"trs-{i}.log",
                    ready_marker=b"trs_serving" if args.log_level == "info" else b"",
                    env={**common, "CYPHONIC_QUIC_PORT": str(port), "CYPHONIC_REPLICA_ID": str(i)},
                )
            )
        await asyncio.gather(*(p.start(within_s=300) for p in [*nms_procs, *trs_procs]))
        await asyncio.sleep(1.0)  # the QUIC endpoints open right after the REST servers
        procs = Processes(
            nms={f"nms-{i}": p.proc.pid for i, p in enumerate(nms_procs) if p.proc},
            trs={f"trs-{i}": p.proc.pid for i, p in enumerate(trs_procs) if p.proc},
            redis=rds,
            postgres=pg,
            workers=workers,
        )
        per = [list(enumerate(names))[w :: args.workers] for w in range(args.workers)]
        for w in range(args.workers):
            workers.append(
                WorkerProcess(
                    {
                        "pki_dir": str(work / "pki"),
                        "work": str(work),
                        "nms_ports": nms_ports,
                        "mine": per[w],
                        "all_names": names,
                        "seed": w,
                        "connect_timeout_s": args.connect_timeout_s,
                        "peer_timeout_s": args.peer_timeout_s,
                        "reconnect_max_s": args.reconnect_max_s,
                    },
                    work / f"worker-{w}.log",
                )
            )
        await asyncio.gather(*(w.receive(wait_s=900) for w in workers))
        print(
            f"{args.nodes} nodes in {args.workers} client processes; {args.replicas} NMS "
            f"replicas, {args.trs} TRS; private Postgres :{pg.port}, Redis :{rds.port}; "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        rss0 = {n: rss_bytes(p) for n, p in procs.nms.items()}

        # ---- register
        before = procs.snapshot()
        started = time.monotonic()
        results = await all_call(workers, {"op": "register", "concurrency": args.concurrency})
        seconds = time.monotonic() - started
        lat = [x for r in results for x in r["latencies"]]
        errors = sum(r["errors"] for r in results)
        reg = report(
            "register",
            ops=len(lat),
            seconds=seconds,
            latencies=lat,
            errors=errors,
            cpu=cpu_delta(before, procs.snapshot()),
        )
        registered = len(lat)

        # ---- idle
        await asyncio.sleep(2)
        before = procs.snapshot()
        await asyncio.sleep(args.idle_s)
        idle = cpu_delta(before, procs.snapshot())
        IDLE_RATE.update({k: v / args.idle_s for k, v in idle.items() if k != "clients"})
        pct = {k: 100 * v / args.idle_s for k, v in idle.items()}
        control = sum(
            v for k, v in pct.items() if k.startswith("nms") or k in ("redis", "postgres")
        )
        mem = " ".join(
            f"{n}={(rss_bytes(p) - rss0[n]) / max(1, registered / args.replicas) / 1024:.1f}KiB"
            for n, p in procs.nms.items()
        )
        print(
            f"idle       {args.idle_s:.0f} s, {registered} nodes: CPU % of a core "
            + " ".join(f"{k}={v:.1f}" for k, v in pct.items())
            + f"; control plane {control:.1f}%; NMS memory per node {mem}",
            flush=True,
        )

        # ---- churn: routes, moves, offline
        route: dict[str, Any] = {"rate": float("nan")}
        if not args.skip_churn:
            route = await churn(args, workers, procs, rds.url)

        # ---- kill one replica
        storm_s = -1.0
        if args.replicas >= 2:
            victim = nms_procs[0]
            assert victim.proc is not None
            status = await all_call(workers, {"op": "status"})
            home0 = sum(s["by_replica"].get("0", 0) for s in status)
            mark = status[0]["now"]  # workers share the machine's monotonic clock
            before = procs.snapshot()
            killed_at = time.monotonic()
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(timeout=10)
            procs.nms.pop("nms-0", None)
            survivor = procs.nms["nms-1"]

            samples: list[tuple[float, int, float, list[float]]] = []

            async def storm_over() -> bool:
                st = await all_call(workers, {"op": "status", "since": mark, "brief": True})
                again = sum(s["again"].get("0", 0) for s in st)
                samples.append(
                    (time.monotonic(), again, cpu_seconds(survivor), [s["cpu"] for s in st])
                )
                return again >= home0

            waited = await wait_until(storm_over, within_s=args.storm_limit_s, every_s=0.5)
            storm_s = waited if waited is not None else -1.0
            st = await all_call(workers, {"op": "status", "since": mark})
            again = sum(s["again"].get("0", 0) for s in st)
            last = max(s["last_again"] for s in st)
            if waited is not None:
                storm_s = last - mark if last else waited
            warned: Counter[str] = Counter()
            for s in st:
                warned.update(s["warnings"])
            print(f"           agents' warnings so far: {dict(warned.most_common(6))}", flush=True)
            report(
                "storm",
                ops=again,
                seconds=time.monotonic() - killed_at,
                latencies=[],
                errors=home0 - again,
                cpu=cpu_delta(before, procs.snapshot()),
                extra=f"storm_s={storm_s:.1f} ({again}/{home0} nodes of nms-0 back)",
            )
            print(f"{'':<10} {storm_load(samples)}", flush=True)
            print(f"{'':<10} {storm_timeline(samples, killed_at)}", flush=True)
            if again < home0:
                print(f"{'':<10} not back: {[b for s in st for b in s['behind']]}", flush=True)

        if not args.skip_restarts:
            redis_client = aioredis.Redis.from_url(rds.url)
            live = [n for n in procs.nms]

            async def presence_count() -> int:
                count = 0
                async for _ in redis_client.scan_iter(f"{PREFIX}nms:presence:*", count=5000):
                    count += 1
                return count

            present_before = await presence_count()
            status = await all_call(workers, {"op": "status"})
            connected = sum(s["connected"] for s in status)
            # ---- Redis restart, empty
            started = time.monotonic()
            await asyncio.to_thread(rds.restart, keep_data=False)
            await redis_client.aclose()
            redis_client = aioredis.Redis.from_url(rds.url)

            async def presence_back() -> bool:
                return await presence_count() >= present_before

            async def trs_back() -> bool:
                return int(await redis_client.scard(f"{PREFIX}trs:replicas")) >= args.trs

            async def routes_back() -> bool:
                return int(await redis_client.zcard(f"{PREFIX}nms:route-index")) >= routes_before

            routes_before = int(await redis_client.zcard(f"{PREFIX}nms:route-index"))
            waited_presence, waited_trs, waited_routes = await asyncio.gather(
                wait_until(presence_back, within_s=60, every_s=0.25),
                wait_until(trs_back, within_s=60, every_s=0.25),
                wait_until(routes_back, within_s=60, every_s=0.25),
            )
            waited = max(
                (w if w is not None else float("inf"))
                for w in (waited_presence, waited_trs, waited_routes)
            )
            probe = await all_call(
                workers, {"op": "routes", "count": 20, "concurrency": 5, "seed": 5}
            )
            probe_ok = sum(len(p["latencies"]) for p in probe)
            print(
                f"redis      restarted empty: back after presence of {present_before} nodes "
                f"({connected} connected) {_s(waited_presence)}, {args.trs} TRS in the "
                f"directory {_s(waited_trs)}, {routes_before} routes {_s(waited_routes)}; "
                f"all {_s(waited)}; probe routes ok {probe_ok}/{20 * len(workers)} "
                f"(replicas {live}; restart itself "
                f"{time.monotonic() - started - (waited or 0):.1f} s)",
                flush=True,
            )
            # ---- Postgres restart
            leases = await leases_snapshot(url)
            started = time.monotonic()
            await asyncio.to_thread(pg.restart)
            await pg.ready()

            async def pg_back() -> bool:
                res = await all_call(workers, {"op": "moves", "count": 2, "seed": 3})
                return all(r["errors"] == 0 for r in res)

            waited = await wait_until(pg_back, within_s=60, every_s=0.25)
            after = await leases_snapshot(url)
            same = sum(1 for k, v in leases.items() if after.get(k) == v)
            print(
                f"postgres   restarted: registrations succeed again after "
                f"{waited if waited is not None else float('nan'):.1f} s; "
                f"leases unchanged {same}/{len(leases)}",
                flush=True,
            )
            await redis_client.aclose()

        client_cpu = sum(cpu_seconds(w.proc.pid) for w in workers)
        print(
            f"clients: {args.workers} processes, {client_cpu:.1f} CPU s in all "
            f"(a client process at 100% of a core would be the bottleneck)",
            flush=True,
        )
        print(
            f"RESULT nodes={registered} registrations_per_s={reg['rate']:.1f} "
            f"route_decisions_per_s={route['rate']:.1f} storm_s={storm_s:.1f} "
            f"idle_cpu_pct={control:.1f}",
            flush=True,
        )
        return 0
    finally:
        for w in workers:
            w.stop()
        for p in [*nms_procs, *trs_procs]:
            if p.proc is not None and p.proc.poll() is None:
                p.stop()
        for i in range(1, len(nms_procs)):
            print(f"nms-{i} QUIC endpoint: {endpoint_stats(work / f'nms-{i}.log')}", flush=True)
        rds.stop(keep_data=False)
        pg.destroy()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)


def main() -> int:
    if "--worker" in sys.argv:
        return asyncio.run(worker_main())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=2, help="NMS replicas (default 2)")
    parser.add_argument("--trs", type=int, default=2, help="TRS replicas (default 2)")
    parser.add_argument("--workers", type=int, default=3, help="client processes (default 3)")
    parser.add_argument("--concurrency", type=int, default=8, help="in flight per worker")
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--routes", type=int, default=3000)
    parser.add_argument("--moves", type=int, default=60)
    parser.add_argument(
        "--keepalive-s", type=float, default=15.0, help="Keepalive interval (agents not PINGing)"
    )
    parser.add_argument(
        "--ping-s", type=float, default=25.0, help="QUIC PING interval (0: Keepalive requests)"
    )
    parser.add_argument("--peer-timeout-s", type=float, default=30.0, help="agent idle timeout")
    parser.add_argument("--connect-timeout-s", type=float, default=5.0)
    parser.add_argument("--reconnect-max-s", type=float, default=30.0)
    parser.add_argument("--storm-limit-s", type=float, default=180.0)
    parser.add_argument("--max-pending", type=int, default=0, help="NMS admission limit")
    parser.add_argument(
        "--no-resumption",
        action="store_true",
        help="no shared TLS ticket secret: every reconnection is a full handshake",
    )
    parser.add_argument(
        "--log-level", default="info", help="of the services (info: as deployed; warning)"
    )
    parser.add_argument(
        "--skip-churn", action="store_true", help="no routes, moves, offline phases"
    )
    parser.add_argument("--skip-restarts", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if not 2 <= args.nodes <= 20000 or not 1 <= args.replicas <= 8:
        parser.error("--nodes 2..20000, --replicas 1..8")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
