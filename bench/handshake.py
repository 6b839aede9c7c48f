#!/usr/bin/env python3
"""CPU of one QUIC + mutual-TLS handshake, per side, with the real endpoint on loopback.

    uv run --frozen python bench/handshake.py [--count 200] [--concurrency 32]
        [--engine qh3] [--resume] [--profile server|client]

The server (a service identity, node peers required) runs in a child process so that each
side's CPU is its own process's (``time.process_time``); nodes have real certificates
from ``cyphonic.pki.init_pki``. Printed per phase (N sequential connects, then
``--concurrency`` at once, repeated to ``--count``): ms of server and client CPU per
handshake and handshakes/s. ``--resume``: the server issues session tickets under a
shared key and every node reconnects with its last ticket (the first connect of each node
is a full handshake and is not counted). ``--profile``: cProfile of that side's
sequential phase, top functions by cumulative time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime
import io
import multiprocessing as mp
import os
import pstats
import tempfile
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection as Pipe
from typing import Any

from aioquic.quic.events import QuicEvent
from cyphonic import log, pki
from cyphonic.errors import CyphonicError
from cyphonic.quic import QuicEndpoint
from cyphonic.quic.endpoint import Acceptor, Connection
from cyphonic.quic.tickets import TicketKeys

DOMAIN = "cyphonic.internal"
SERVICE = f"nms.svc.{DOMAIN}"
ALPN = "cyphonic-bench"


class _Quiet:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def quic_event_received(self, event: QuicEvent) -> None:
        pass

    def connection_lost(self, error: CyphonicError | None) -> None:
        pass


def _profile_report(profiler: cProfile.Profile, lines: int = 30) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats(
        os.environ.get("BENCH_SORT", "cumulative")
    ).print_stats(lines)
    return out.getvalue()


def _server(
    pipe: Pipe, material_dir: str, engine: str, ticket_key: bytes | None, prof: bool
) -> None:
    log.configure(level="warning")

    async def run() -> None:
        material = pki.init_pki(material_dir, domain=DOMAIN, now=_now())
        endpoint = await _open_server(material, engine, ticket_key)
        pipe.send(endpoint.local_address[1])
        loop = asyncio.get_running_loop()
        profiler = cProfile.Profile() if prof else None
        while True:
            command = await loop.run_in_executor(None, pipe.recv)
            if command == "stop":
                break
            if command == "mark":
                if profiler is not None:
                    profiler.enable()
                pipe.send(time.process_time())
            elif command == "report":
                if profiler is not None:
                    profiler.disable()
                pipe.send((time.process_time(), _profile_report(profiler) if profiler else ""))
                profiler = None
        await endpoint.close()

    asyncio.run(run())


async def _open_server(
    material: pki.PkiMaterial, engine: str, ticket_key: bytes | None, *, ack_at_once: bool = False
) -> QuicEndpoint:
    # ticket_keys passed only when set, so the bench also runs on code without resumption.
    tickets = {} if ticket_key is None else {"ticket_keys": TicketKeys([ticket_key])}
    return await QuicEndpoint.open(
        host="127.0.0.1",
        identity=material.services["nms"],
        trust=material.trust,
        accept={ALPN: Acceptor(handler_factory=_Quiet, expect="node")},
        engine=engine,
        max_handshakes=4096,
        ack_at_once=ack_at_once,
        **tickets,
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _node(material: pki.PkiMaterial, i: int) -> pki.CertifiedKey:
    key = pki.generate_key()
    fqdn = f"bench-{i}.{DOMAIN}"
    cert = pki.sign_node_csr(material.node_ca, pki.make_csr(key, fqdn), fqdn=fqdn, now=_now())
    return pki.CertifiedKey(key=key, cert=cert, chain=[material.node_ca.cert])


async def _clients(args: argparse.Namespace, material_dir: str, pipe: Pipe, port: int) -> None:
    material = pki.init_pki(material_dir, domain=DOMAIN, now=_now())
    nodes = [
        await QuicEndpoint.open(
            host="127.0.0.1", identity=_node(material, i), trust=material.trust, engine=args.engine
        )
        for i in range(args.concurrency)
    ]
    address = ("127.0.0.1", port)

    async def once(endpoint: QuicEndpoint) -> bool:
        conn = await endpoint.connect(address, alpn=ALPN, expect="service", expected_name=SERVICE)
        resumed = getattr(conn, "resumed", False)
        conn.close()
        return resumed

    if args.resume:  # every node gets its first ticket; not counted
        await asyncio.gather(*(once(n) for n in nodes))
        await asyncio.sleep(0.1)

    async def phase(name: str, concurrent: bool, profile: bool) -> None:
        rounds = max(1, args.count // (len(nodes) if concurrent else 1))
        total = rounds * (len(nodes) if concurrent else 1)
        pipe.send("mark")
        server_start = pipe.recv()
        profiler = cProfile.Profile() if profile else None
        started, cpu = time.perf_counter(), time.process_time()
        if profiler is not None:
            profiler.enable()
        resumed = 0
        for _ in range(rounds):
            if concurrent:
                resumed += sum(await asyncio.gather(*(once(n) for n in nodes)))
            else:
                resumed += await once(nodes[0])
        if profiler is not None:
            profiler.disable()
        client_cpu = time.process_time() - cpu
        wall = time.perf_counter() - started
        pipe.send("report")
        server_end, server_report = pipe.recv()
        print(
            f"{name}: {total} handshakes ({resumed} resumed), "
            f"server {(server_end - server_start) / total * 1e3:.2f} ms CPU each, "
            f"client {client_cpu / total * 1e3:.2f} ms CPU each, {total / wall:.0f}/s"
        )
        if server_report:
            print("server profile:\n" + server_report)
        if profiler is not None:
            print("client profile:\n" + _profile_report(profiler))

    await phase("sequential", False, args.profile == "client")
    await phase(f"concurrent x{len(nodes)}", True, False)
    for n in nodes:
        await n.close()


async def _in_memory(args: argparse.Namespace, material_dir: str) -> None:
    """Both endpoints in this process, datagrams handed over without sockets: the CPU of
    each side's handling (TLS, QUIC packets, the endpoint) without the UDP syscalls."""
    material = pki.init_pki(material_dir, domain=DOMAIN, now=_now())
    server = await _open_server(material, args.engine, os.urandom(32) if args.resume else None)
    client = await QuicEndpoint.open(
        host="127.0.0.1", identity=_node(material, 0), trust=material.trust, engine=args.engine
    )
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    server.send_hook = lambda _c, out: to_client.extend(d for d, _ in out) or []
    client.send_hook = lambda _c, out: to_server.extend(d for d, _ in out) or []
    cpu = {"server": 0.0, "client": 0.0}
    profiler = cProfile.Profile() if args.profile else None

    def deliver(endpoint: QuicEndpoint, side: str, queue: list[bytes], source: Any) -> None:
        batch = queue[:]
        queue.clear()
        started = time.thread_time()
        if profiler is not None and side == args.profile:
            profiler.enable()
        endpoint.receive_datagrams(batch, source)
        if profiler is not None:
            profiler.disable()
        cpu[side] += time.thread_time() - started

    async def once() -> bool:
        task = asyncio.ensure_future(
            client.connect(server.local_address, alpn=ALPN, expected_name=SERVICE)
        )
        while not task.done():
            await asyncio.sleep(0)
            if to_server:
                deliver(server, "server", to_server, client.local_address)
            if to_client:
                deliver(client, "client", to_client, server.local_address)
        conn = task.result()
        resumed = getattr(conn, "resumed", False)
        conn.close()
        client.flush()
        to_server.clear()
        return resumed

    await once()  # warm up (and the first ticket)
    cpu = {"server": 0.0, "client": 0.0}
    resumed = sum([await once() for _ in range(args.count)])
    print(
        f"in memory: {args.count} handshakes ({resumed} resumed), server "
        f"{cpu['server'] / args.count * 1e3:.2f} ms CPU each, client (receive side only) "
        f"{cpu['client'] / args.count * 1e3:.2f} ms"
    )
    if profiler is not None:
        print(f"{args.profile} profile:\n" + _profile_report(profiler))
    await client.close()
    await server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--engine", default="qh3", choices=["qh3", "aioquic"])
    parser.add_argument("--resume", action="store_true", help="reconnect with session tickets")
    parser.add_argument("--profile", choices=["server", "client"])
    parser.add_argument(
        "--memory", action="store_true", help="one process, no sockets (per-side CPU only)"
    )
    args = parser.parse_args()
    log.configure(level="warning")
    if args.memory:
        with tempfile.TemporaryDirectory() as material_dir:
            print(f"engine {args.engine}, load {os.getloadavg()[0]:.2f}")
            asyncio.run(_in_memory(args, material_dir))
        return
    with tempfile.TemporaryDirectory() as material_dir:
        pki.init_pki(material_dir, domain=DOMAIN, now=_now())
        ticket_key = os.urandom(32) if args.resume else None

        async def clients(pipe: Pipe, port: Any) -> None:
            print(f"engine {args.engine}, load {os.getloadavg()[0]:.2f}")
            await _clients(args, material_dir, pipe, port)

        with_server(
            _server,
            (material_dir, args.engine, ticket_key, args.profile == "server"),
            clients,
        )


def with_server(
    target: Callable[..., None],
    args: tuple[Any, ...],
    clients: Callable[[Pipe, Any], Awaitable[None]],
) -> None:
    """Run ``target(pipe, *args)`` in a child process (it sends its port first, then
    answers "mark"/"report" with its CPU time until "stop"), and ``clients(pipe, port)``
    here."""
    ours, theirs = mp.Pipe()
    server = mp.get_context("spawn").Process(target=target, args=(theirs, *args))
    server.start()
    try:
        port: Any = ours.recv()
        asyncio.run(clients(ours, port))
    finally:
        ours.send("stop")
        server.join(10)


if __name__ == "__main__":
    main()
