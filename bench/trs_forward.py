#!/usr/bin/env python3
"""TRS forwarding rate: packets per second through the real UDP glue on one core.

Run from the repository root (no root needed; loopback only):

    uv run --frozen python bench/trs_forward.py [--duration 5] [--size 1252] [--json]

Three processes, sockets on 127.0.0.1::

    sender  --valid relayed packets (DCID = a CID of the sink's side)-->  relay  -->  sink
    (CPU 1)     from the sender side's registered address                (CPU 0)    (CPU 1)

The relay process runs the TRS's one UDP glue, as ``cyphonic-trs serve`` runs it: the
project's QUIC endpoint with the relay filter in its drain loop (up to 512 datagrams per
wake-up, one ``RelayCore`` decision and one ``sendto`` each), with a session installed as
allocation would install it. The relay is pinned to one CPU; the
sender and the sink share the other. Figures: what the relay forwarded per second in the
measured window, and the same per second of CPU time the relay process got (user + system,
which includes the loopback delivery to the sink), which on a shared machine is the rate of
one dedicated core. The sender's rate and the sink's count show whether the relay was the
bottleneck (sender faster: the surplus is dropped by the kernel at the relay's socket). Last,
the cost of the core's decision alone (``RelayCore.datagram_received``, no sockets).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from typing import Any

from cyphonic.quic import bind_udp
from cyphonic_trs.cid import issue_cid
from cyphonic_trs.control import native_addr_for
from cyphonic_trs.relay import Forward, RelayCore
from cyphonic_trs.session import RelaySession, RelaySide

WARMUP_S = 1.0


def _pin(cpu: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def _session(sender: tuple[str, int], sink: tuple[str, int]) -> tuple[RelaySession, bytes]:
    cids_sender = tuple(issue_cid(1, os.urandom) for _ in range(16))
    cids_sink = tuple(issue_cid(1, os.urandom) for _ in range(16))
    session = RelaySession(
        route_id="bench",
        replica_id=1,
        pair=("a.bench", "b.bench"),
        created_ms=0,
        version=2,
        sides=(
            RelaySide(fqdn="a.bench", addr=sender, cids=cids_sender, allocated_ms=0),
            RelaySide(fqdn="b.bench", addr=sink, cids=cids_sink, allocated_ms=0),
        ),
    )
    return session, cids_sink[0]


def _material() -> Any:
    """A throwaway PKI for the endpoint's TRS certificate (made before timing starts)."""
    import tempfile
    from pathlib import Path

    from cyphonic import pki

    with tempfile.TemporaryDirectory() as tmp:
        return pki.init_pki(
            Path(tmp), domain="bench.internal", now=datetime.datetime.now(datetime.UTC)
        )


def relay_main(
    sock: socket.socket,
    session: RelaySession,
    window: Any,
    ready: Any,
    go: Any,
    out: Any,
    material: Any,
) -> None:
    from cyphonic_trs.control import open_relaying_endpoint

    _pin(0)
    core = RelayCore(replica_id=1, native_addr=native_addr_for(socket.AF_INET))
    core.install(session, now=time.monotonic())

    async def run() -> dict[str, Any]:
        # The production path: the project's QUIC endpoint with the relay in its drain loop.
        endpoint, relay = open_relaying_endpoint(
            sock=sock, core=core, identity=material.services["trs"], trust=material.trust, accept={}
        )

        def wakeups() -> int:
            return endpoint.stats.wakeups

        ready.set()
        # The parent sets the window once everyone is ready, then ``go``.
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        t0, t1 = window[0], window[1]
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        start, wake0, cpu0, wall0 = (
            core.totals(),
            wakeups(),
            time.process_time(),
            time.monotonic(),
        )
        await asyncio.sleep(max(0.0, t1 - time.monotonic()))
        end, wake1, cpu1, wall1 = (core.totals(), wakeups(), time.process_time(), time.monotonic())
        send_dropped, send_errors = relay.send_dropped, relay.send_errors
        await endpoint.close()
        forwarded = end.forwarded_packets - start.forwarded_packets
        return {
            "forwarded": forwarded,
            "relay_cpu_s": cpu1 - cpu0,
            "relay_cpu_share": (cpu1 - cpu0) / (wall1 - wall0),
            "send_dropped": send_dropped,
            "send_errors": send_errors,
            "packets_per_wakeup": forwarded / max(1, wake1 - wake0),
        }

    out.send(asyncio.run(run()))


def sink_main(sock: socket.socket, t0: float, t1: float, out: Any) -> None:
    _pin(1)
    buf = bytearray(65535)
    sock.settimeout(0.2)
    got = 0
    while True:
        try:
            sock.recv_into(buf)
        except TimeoutError:
            if time.monotonic() > t1:
                break
            continue
        now = time.monotonic()
        if t0 <= now < t1:
            got += 1
        elif now >= t1:
            break
    out.send({"received": got})


def sender_main(sock: socket.socket, packet: bytes, t0: float, t1: float, out: Any) -> None:
    _pin(1)
    send = sock.send
    sent = 0
    clock = time.monotonic
    while clock() < t0:
        for _ in range(64):
            send(packet)
    while True:
        for _ in range(64):
            send(packet)
        sent += 64
        if clock() >= t1:
            break
    out.send({"sent": sent})


def core_only(size: int, n: int = 500_000) -> float:
    """ns per decision of the forwarding core alone."""
    sender, sink = ("127.0.0.1", 1), ("127.0.0.1", 2)
    session, cid = _session(sender, sink)
    core = RelayCore(replica_id=1)
    core.install(session, now=0.0)
    packet = b"\x40" + cid + os.urandom(size - 1 - len(cid))
    decide = core.datagram_received
    assert decide(packet, sender, 0.0) == Forward(sink)
    start = time.perf_counter()
    for _ in range(n):
        decide(packet, sender, 1.0)
    return (time.perf_counter() - start) / n * 1e9


def measure(*, duration: float, size: int) -> dict[str, Any]:
    """One run: sender -> relay -> sink."""
    relay_sock = bind_udp("127.0.0.1", 0, buffer_bytes=4 * 1024 * 1024)
    sink_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sink_sock.bind(("127.0.0.1", 0))
    sender_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender_sock.bind(("127.0.0.1", 0))
    sender_sock.connect(relay_sock.getsockname())
    session, cid = _session(sender_sock.getsockname(), sink_sock.getsockname())
    packet = b"\x40" + cid + os.urandom(size - 1 - len(cid))

    ctx = mp.get_context("fork")
    window = ctx.Array("d", 2)  # t0, t1 on the shared monotonic clock; 0 = not yet
    ready, go = ctx.Event(), ctx.Event()
    pipes = [ctx.Pipe(duplex=False) for _ in range(3)]
    material = _material()
    relay = ctx.Process(
        target=relay_main, args=(relay_sock, session, window, ready, go, pipes[0][1], material)
    )
    relay.start()
    if not ready.wait(60):
        relay.kill()
        raise SystemExit("relay process did not start")
    t0 = time.monotonic() + WARMUP_S + 0.3
    t1 = t0 + duration
    procs = [
        relay,
        ctx.Process(target=sink_main, args=(sink_sock, t0, t1 + 0.2, pipes[1][1])),
        ctx.Process(target=sender_main, args=(sender_sock, packet, t0, t1, pipes[2][1])),
    ]
    for p in procs[1:]:
        p.start()
    window[0], window[1] = t0, t1
    go.set()
    results: dict[str, Any] = {}
    for reader, _ in pipes:
        results.update(reader.recv())
    for p in procs:
        p.join(timeout=10)
    for s in (relay_sock, sink_sock, sender_sock):
        s.close()
    pps = results["forwarded"] / duration
    return {
        "via": "endpoint",
        "relay_pps": round(pps),
        "relay_gbit_s": round(pps * size * 8 / 1e9, 3),
        "relay_pps_per_cpu_s": round(results["forwarded"] / max(1e-9, results["relay_cpu_s"])),
        "relay_cpu_share": round(results["relay_cpu_share"], 2),
        "sender_pps": round(results["sent"] / duration),
        "sink_pps": round(results["received"] / duration),
        "relay_saturated": results["sent"] > results["forwarded"] * 1.02,
        "packets_per_wakeup": round(results["packets_per_wakeup"], 1),
        "send_dropped": results["send_dropped"],
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--size", type=int, default=1252, help="UDP payload bytes per packet")
    parser.add_argument("--repeat", type=int, default=1, help="measured runs (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    runs = [measure(duration=args.duration, size=args.size) for _ in range(args.repeat)]
    figures = {
        "duration_s": args.duration,
        "packet_bytes": args.size,
        "core_decision_ns": round(core_only(args.size)),
        "cpus": len(os.sched_getaffinity(0)),
        "runs": runs,
    }
    if args.json:
        print(json.dumps(figures))
        return 0
    print(
        f"TRS forwarding, {args.size}-byte packets, relay pinned to one CPU, "
        f"{args.duration:g}s each:"
    )
    for r in runs:
        print(
            f"  {r['via']:<13} forwarded {r['relay_pps']:>8,} pps "
            f"({r['relay_gbit_s']} Gbit/s); per relay CPU-second {r['relay_pps_per_cpu_s']:>8,}"
            f" pps (relay got {r['relay_cpu_share']:.0%} of its CPU); sender "
            f"{r['sender_pps']:,} pps{' (relay saturated)' if r['relay_saturated'] else ''};"
            f" sink {r['sink_pps']:,} pps; {r['packets_per_wakeup']} per wake-up"
        )
    print(f"  core decision alone: {figures['core_decision_ns']} ns/packet (no sockets)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
