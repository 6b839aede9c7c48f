#!/usr/bin/env python3
"""CPU a signalling server spends per QUIC PING of an idle node (the idle cost of a node).

    uv run --frozen python bench/ping_cost.py [--nodes 1000] [--rate 1000] [--seconds 10]
        [--engine qh3] [--no-ack-at-once] [--profile]

The server (as the NMS opens it: ``ack_at_once``, node peers required) runs in a child
process; ``--nodes`` client connections (one endpoint and UDP socket each, like agents)
are opened, then PINGed at ``--rate`` PINGs/s in all, spread evenly, each waiting for its
acknowledgement as the agent does. Printed: µs of server CPU per PING (``process_time``
over the phase, minus the same phase length with no PING), PINGs acknowledged, and with
``--profile`` the server's cProfile of the PING phase.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import tempfile
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any

from cyphonic import log, pki
from cyphonic.quic import QuicEndpoint
from handshake import (
    ALPN,
    DOMAIN,
    SERVICE,
    _node,
    _now,
    _open_server,
    _profile_report,
    with_server,
)


def _server(pipe: Pipe, material_dir: str, engine: str, ack_at_once: bool, prof: bool) -> None:
    log.configure(level="warning")

    async def run() -> None:
        material = pki.init_pki(material_dir, domain=DOMAIN, now=_now())
        endpoint = await _open_server(material, engine, None, ack_at_once=ack_at_once)
        pipe.send(endpoint.local_address[1])
        loop = asyncio.get_running_loop()
        profiler: cProfile.Profile | None = None
        while (command := await loop.run_in_executor(None, pipe.recv)) != "stop":
            if command == "mark":
                if prof:
                    profiler = cProfile.Profile()
                    profiler.enable()
                pipe.send(time.process_time())
            elif command == "report":
                if profiler is not None:
                    profiler.disable()
                report = _profile_report(profiler) if profiler is not None else ""
                pipe.send((time.process_time(), report))
                profiler = None
        await endpoint.close()

    asyncio.run(run())


async def _clients(args: argparse.Namespace, material_dir: str, pipe: Pipe, port: int) -> None:
    material = pki.init_pki(material_dir, domain=DOMAIN, now=_now())
    identities = [_node(material, i) for i in range(args.nodes)]
    endpoints = [
        await QuicEndpoint.open(
            host="127.0.0.1", identity=i, trust=material.trust, engine=args.engine
        )
        for i in identities
    ]
    address = ("127.0.0.1", port)
    conns = []
    for start in range(0, len(endpoints), 64):
        conns += await asyncio.gather(
            *(
                e.connect(address, alpn=ALPN, expect="service", expected_name=SERVICE)
                for e in endpoints[start : start + 64]
            )
        )
    await asyncio.sleep(1.0)  # the handshakes' last acknowledgements
    loop = asyncio.get_running_loop()

    async def measure(name: str, ping: bool) -> float:
        pipe.send("mark")
        server_start = pipe.recv()
        sent = acked = 0
        began = loop.time()
        gap = 1.0 / args.rate
        next_at = began
        while loop.time() - began < args.seconds:
            if ping:
                conn = conns[sent % len(conns)]
                conn.quic.send_ping(sent)
                conn.transmit()
                sent += 1
            next_at += gap
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        await asyncio.sleep(0.5)  # the last acknowledgements
        pipe.send("report")
        server_end, report = pipe.recv()
        acked = sum(1 for c in conns if c.ping_acked_at is not None) if ping else 0
        cpu = server_end - server_start
        print(
            f"{name}: {sent} PINGs over {args.seconds:.0f} s, server CPU {cpu:.3f} s "
            f"({cpu / (loop.time() - began) * 100:.1f}% of a core), connections acked {acked}"
        )
        if report:
            print("server profile:\n" + report)
        return cpu

    quiet = await measure("no PINGs", False)
    busy = await measure("PINGs", True)
    pings = int(args.rate * args.seconds)
    print(
        f"RESULT server_us_per_ping={(busy - quiet) / pings * 1e6:.1f} nodes={args.nodes} "
        f"rate={args.rate} load={os.getloadavg()[0]:.2f}"
    )
    for c in conns:
        c.close()
    for e in endpoints:
        await e.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000.0, help="PINGs/s over all nodes")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--engine", default="qh3", choices=["qh3", "aioquic"])
    parser.add_argument("--no-ack-at-once", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile of the server")
    args = parser.parse_args()
    log.configure(level="warning")
    with tempfile.TemporaryDirectory() as material_dir:
        pki.init_pki(material_dir, domain=DOMAIN, now=_now())

        async def clients(pipe: Pipe, port: Any) -> None:
            await _clients(args, material_dir, pipe, port)

        with_server(
            _server, (material_dir, args.engine, not args.no_ack_at_once, args.profile), clients
        )


if __name__ == "__main__":
    main()
