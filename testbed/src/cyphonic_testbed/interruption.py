"""How long a move interrupts traffic over the overlay, measured the way applications feel it.

While a host moves (``NetBed.move``), two flows run between two overlay nodes:

- a 10 ms ping stream (``ping -i 0.01 -D``) to the peer's virtual address: the interruption
  is the longest gap between two successive echo replies (10 ms when nothing is lost);
- a paced TCP byte stream to the peer's virtual address: the receiver hashes every byte and
  notes the longest time without receiving any (the TCP stall; retransmission back-off makes
  it longer than the path's own outage). The sender's content comes from a seed and its hash
  is compared with the receiver's: the stream survived only if every byte arrived intact.

The two ends of the stream run inside the nodes' namespaces as
``python -m cyphonic_testbed.interruption recv|send ...`` (standard library only) and print
one JSON line each. ``measure_move`` runs the whole thing around one move.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cyphonic_testbed.errors import TestbedError, TestbedTimeout

if TYPE_CHECKING:
    from cyphonic_testbed.bed import Move, Node

#: Interval of the ping stream (seconds): ``ping -i 0.01``.
PING_INTERVAL = 0.01
STREAM_PORT = 9100
CHUNK = 16384


# --------------------------------------------------------------------------- pure readings

_PING_LINE = re.compile(r"^\[(?P<ts>\d+\.\d+)\].*icmp_seq=(?P<seq>\d+)")


@dataclass(frozen=True)
class PingReading:
    """A ping stream read back: replies, and the longest silence between two of them."""

    sent: int
    received: int
    #: Longest time between two successive echo replies (ms); None with under two replies.
    longest_gap_ms: float | None
    #: Wall-clock time of the reply that opened the longest gap.
    gap_started_at: float | None


def read_ping(output: str, *, sent: int | None = None) -> PingReading:
    """Read ``ping -D`` output: reply timestamps (duplicates ignored) and the longest gap.

    ``sent``: requests sent, when known (ping's summary says it; a killed ping may not)."""
    replies: dict[int, float] = {}
    for line in output.splitlines():
        match = _PING_LINE.match(line.strip())
        if match and "bytes from" in line:
            replies.setdefault(int(match.group("seq")), float(match.group("ts")))
    summary = re.search(r"(\d+) packets transmitted", output)
    if sent is None:
        sent = int(summary.group(1)) if summary else (max(replies) if replies else 0)
    times = sorted(replies.values())
    gap, started = None, None
    for before, after in itertools.pairwise(times):
        if gap is None or after - before > gap:
            gap, started = after - before, before
    return PingReading(
        sent=sent,
        received=len(replies),
        longest_gap_ms=None if gap is None else gap * 1000,
        gap_started_at=started,
    )


# --------------------------------------------------------------------------- the stream ends


def stream_payload(seed: int, size: int) -> bytes:
    """The stream's content: ``size`` pseudo-random bytes from ``seed`` (both ends agree)."""
    return random.Random(seed).randbytes(size)


def receive(*, bind: str, port: int, size: int, timeout: float) -> dict[str, Any]:
    """Accept one connection, read ``size`` bytes; hash, count and the longest stall."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((bind, port))
        server.listen(1)
        print(json.dumps({"listening": True}), flush=True)
        server.settimeout(timeout)
        conn, _ = server.accept()
    digest = hashlib.sha256()
    got = 0
    first = last = stall_from = 0.0
    stall = 0.0
    with conn:
        conn.settimeout(timeout)
        while got < size:
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            now = time.time()
            if got == 0:
                first = now
            elif now - last > stall:
                stall, stall_from = now - last, last
            last = now
            digest.update(chunk)
            got += len(chunk)
        if got >= size:
            conn.sendall(b"ok")
    return {
        "bytes": got,
        "sha256": digest.hexdigest(),
        "longest_stall_ms": stall * 1000,
        "stall_started_at": stall_from or None,
        "first_at": first,
        "last_at": last,
    }


def send(
    *, host: str, port: int, size: int, seed: int, rate: float, timeout: float
) -> dict[str, Any]:
    """Send the seeded stream at ``rate`` bytes/s (paced), wait for the receiver's ok."""
    data = stream_payload(seed, size)
    started = time.time()
    with socket.create_connection((host, port), timeout=timeout) as conn:
        # The caller disrupts the path only after this line: a move that starts before the
        # connection exists measures nothing and fails the connect instead.
        print(json.dumps({"connected": True}), flush=True)
        t0 = time.monotonic()
        for offset in range(0, size, CHUNK):
            due = t0 + offset / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            conn.sendall(data[offset : offset + CHUNK])
        ok = conn.recv(2)
    return {
        "sent": size,
        "sha256": hashlib.sha256(data).hexdigest(),
        "acknowledged": ok == b"ok",
        "started_at": started,
        "seconds": time.time() - started,
    }


# --------------------------------------------------------------------------- around a move


@dataclass(frozen=True)
class Interruption:
    """What one move (or other disruption: ``move`` None) did to the two flows."""

    move: Move | None
    ping: PingReading
    #: Longest time the TCP receiver got no byte (ms).
    tcp_stall_ms: float
    tcp_bytes: int
    #: Every byte arrived, in order, unchanged (the receiver's SHA-256 is the sender's).
    tcp_intact: bool
    sender: dict[str, Any]
    receiver: dict[str, Any]

    @property
    def ping_gap_ms(self) -> float | None:
        return self.ping.longest_gap_ms


def _json_line(proc: subprocess.Popen[str], what: str, timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        raise TestbedTimeout(f"{what} still running after {timeout:g}s: {out}{err}") from exc
    for line in reversed(out.splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict) and not value.keys() & {"listening", "connected"}:
                return value
    raise TestbedError(f"{what} exited {proc.returncode} without a result: {out}{err}")


def measure_move(
    *,
    src: Node,
    dst: Node,
    address: str,
    move: Callable[[], Move | None] | None,
    size: int = 12_000_000,
    rate: float = 2_000_000.0,
    settle: float = 1.0,
    timeout: float = 120.0,
    seed: int = 1,
) -> Interruption:
    """Run the ping stream and the TCP stream from ``src`` to ``address`` (a virtual address
    of ``dst``), call ``move()`` ``settle`` seconds into them, and read both once the stream
    is complete (bounded by ``timeout``). ``move`` is the disruption: a host move returning
    its ``Move``, or any other (a relay killed and restarted) returning None. ``move=None``:
    the same flows without a disruption (the control figures of the path as it is)."""
    module = [sys.executable, "-m", "cyphonic_testbed.interruption"]
    receiver = dst.popen(
        [
            *module,
            "recv",
            "--bind",
            address,
            "--port",
            str(STREAM_PORT),
            "--size",
            str(size),
            "--timeout",
            str(timeout),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    ready = receiver.stdout.readline()
    if "listening" not in ready:
        receiver.kill()
        raise TestbedError(
            f"stream receiver in {dst.name} did not start: {ready}"
            f"{receiver.communicate(timeout=10)[1]}"
        )
    ping_argv = ["ping", "-n", "-D", "-i", str(PING_INTERVAL), "-W", "1", address]
    if ":" in address:
        ping_argv.insert(1, "-6")
    pinger = src.popen(ping_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sender = src.popen(
        [
            *module,
            "send",
            "--host",
            address,
            "--port",
            str(STREAM_PORT),
            "--size",
            str(size),
            "--rate",
            str(rate),
            "--seed",
            str(seed),
            "--timeout",
            str(timeout),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sender.stdout is not None
        if "connected" not in sender.stdout.readline():  # EOF: it failed; _json_line says why
            _json_line(sender, f"stream sender in {src.name}", timeout)
        time.sleep(settle)  # the flows run in their steady state before the move
        done = move() if move is not None else None
        sent = _json_line(sender, f"stream sender in {src.name}", timeout)
        got = _json_line(receiver, f"stream receiver in {dst.name}", 30)
        time.sleep(0.2)  # a few more replies after the stream closes the last gap
    finally:
        for proc in (sender, receiver):
            if proc.poll() is None:
                proc.kill()
        if pinger.poll() is None:
            pinger.send_signal(signal.SIGINT)  # ping prints its summary on SIGINT
    try:
        ping_out, _ = pinger.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        pinger.kill()
        ping_out, _ = pinger.communicate(timeout=10)
    return Interruption(
        move=done,
        ping=read_ping(ping_out),
        tcp_stall_ms=float(got["longest_stall_ms"]),
        tcp_bytes=int(got["bytes"]),
        tcp_intact=got["bytes"] == size and got["sha256"] == sent["sha256"],
        sender=sent,
        receiver=got,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cyphonic_testbed.interruption recv|send ...`` (inside a namespace)."""
    parser = argparse.ArgumentParser(prog="python -m cyphonic_testbed.interruption")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("recv", help="receive the stream, print hash, bytes, longest stall")
    r.add_argument("--bind", required=True)
    s = sub.add_parser("send", help="send the seeded stream, paced")
    s.add_argument("--host", required=True)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--rate", type=float, default=2_000_000.0, help="bytes per second")
    for p in (r, s):
        p.add_argument("--port", type=int, default=STREAM_PORT)
        p.add_argument("--size", type=int, required=True)
        p.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.command == "recv":
        result = receive(bind=args.bind, port=args.port, size=args.size, timeout=args.timeout)
    else:
        result = send(
            host=args.host,
            port=args.port,
            size=args.size,
            seed=args.seed,
            rate=args.rate,
            timeout=args.timeout,
        )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
