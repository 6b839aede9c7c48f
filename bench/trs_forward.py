#!/usr/bin/env python3
"""TRS forwarding rate: packets per second through the real UDP glue on one core.

Run from the repository root (no root needed; loopback only):

    uv run --frozen python bench/trs_forward.py [--duration 5] [--size 1252] [--json]

Three processes, sockets on 127.0.0.1::

    sender  --valid relayed packets (DCID = a CID of the sink's side)-->  relay  -->  sink
    (CPU 1)     from the sender side's registered address                (CPU 0)    (CPU 1)

The relay process runs ``RelayServer`` (add_reader, drain up to 512 datagrams per wake-up,
one ``RelayCore`` decision and one ``sendto`` each) with a session installed as allocation
would install it. It is pinned to one CPU; the sender and the sink share the other. The
figure is what the relay forwarded per second during the measured window, and the same
divided by the CPU time the relay process got (user + system, which includes the loopback
delivery to the sink): on a shared machine the second is the rate of one dedicated core.
The sender's rate
and the sink's count say whether the relay was the bottleneck (sender faster than the relay:
the surplus is dropped by the kernel at the relay's socket). A second figure is the core's
decision alone (``RelayCore.datagram_received`` in a loop, no sockets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from typing import Any

from cyphonic_trs.cid import issue_cid
from cyphonic_trs.relay import Forward, RelayCore
from cyphonic_trs.server import RelayServer, native_addr_for, open_udp_socket
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
        route_id="bench", replica_id=1, pair=("a.bench", "b.bench"), created_ms=0, version=2,
        sides=(RelaySide(fqdn="a.bench", addr=sender, cids=cids_sender, allocated_ms=0),
               RelaySide(fqdn="b.bench", addr=sink, cids=cids_sink, allocated_ms=0)),
    )
    return session, cids_sink[0]


def relay_main(sock: socket.socket, session: RelaySession, t0: float, t1: float,
               out: Any) -> None:
    _pin(0)
    core = RelayCore(replica_id=1, native_addr=native_addr_for(socket.AF_INET))
    core.install(session, now=time.monotonic())

    async def run() -> dict[str, Any]:
        server = RelayServer(core=core, sock=sock)
        server.start()
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        start, wake0, cpu0, wall0 = (core.totals(), server.wakeups, time.process_time(),
                                     time.monotonic())
        await asyncio.sleep(max(0.0, t1 - time.monotonic()))
        end, wake1, cpu1, wall1 = (core.totals(), server.wakeups, time.process_time(),
                                   time.monotonic())
        server.stop()
        forwarded = end.forwarded_packets - start.forwarded_packets
        return {
            "forwarded": forwarded,
            "relay_cpu_s": cpu1 - cpu0,
            "relay_cpu_share": (cpu1 - cpu0) / (wall1 - wall0),
            "send_dropped": server.send_dropped,
            "send_errors": server.send_errors,
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--size", type=int, default=1252, help="UDP payload bytes per packet")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    relay_sock = open_udp_socket("127.0.0.1", 0)
    relay_sock.setblocking(True)  # the relay process makes it non-blocking again
    sink_sock = open_udp_socket("127.0.0.1", 0)
    sink_sock.setblocking(True)
    sender_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender_sock.bind(("127.0.0.1", 0))
    sender_sock.connect(relay_sock.getsockname())
    session, cid = _session(sender_sock.getsockname(), sink_sock.getsockname())
    packet = b"\x40" + cid + os.urandom(args.size - 1 - len(cid))

    ctx = mp.get_context("fork")
    t0 = time.monotonic() + WARMUP_S + 0.5
    t1 = t0 + args.duration
    pipes = [ctx.Pipe(duplex=False) for _ in range(3)]
    relay_sock.setblocking(False)
    procs = [
        ctx.Process(target=relay_main, args=(relay_sock, session, t0, t1, pipes[0][1])),
        ctx.Process(target=sink_main, args=(sink_sock, t0, t1 + 0.2, pipes[1][1])),
        ctx.Process(target=sender_main, args=(sender_sock, packet, t0, t1, pipes[2][1])),
    ]
    for p in procs:
        p.start()
    results: dict[str, Any] = {}
    for reader, _ in pipes:
        results.update(reader.recv())
    for p in procs:
        p.join(timeout=10)
    ns = core_only(args.size)
    pps = results["forwarded"] / args.duration
    figures = {
        "duration_s": args.duration,
        "packet_bytes": args.size,
        "relay_pps": round(pps),
        "relay_gbit_s": round(pps * args.size * 8 / 1e9, 3),
        "sender_pps": round(results["sent"] / args.duration),
        "sink_pps": round(results["received"] / args.duration),
        "relay_saturated": results["sent"] > results["forwarded"] * 1.02,
        "relay_cpu_share": round(results["relay_cpu_share"], 2),
        "relay_pps_per_cpu_s": round(results["forwarded"] / max(1e-9, results["relay_cpu_s"])),
        "packets_per_wakeup": round(results["packets_per_wakeup"], 1),
        "send_dropped": results["send_dropped"],
        "core_decision_ns": round(ns),
        "cpus": len(os.sched_getaffinity(0)),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"TRS forwarding, {args.size}-byte packets, relay pinned to one CPU, "
              f"{args.duration:g}s:")
        print(f"  relay forwarded  {figures['relay_pps']:>10,} pps "
              f"({figures['relay_gbit_s']} Gbit/s of UDP payload)")
        print(f"  per CPU-second   {figures['relay_pps_per_cpu_s']:>10,} pps "
              f"(the relay had {figures['relay_cpu_share']:.0%} of its CPU; the rest went "
              f"to other processes)")
        print(f"  sender offered   {figures['sender_pps']:>10,} pps"
              f"{'  (relay saturated)' if figures['relay_saturated'] else ''}")
        print(f"  sink received    {figures['sink_pps']:>10,} pps")
        print(f"  per wake-up      {figures['packets_per_wakeup']:>10} packets drained")
        print(f"  core decision    {figures['core_decision_ns']:>10} ns/packet (no sockets)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
