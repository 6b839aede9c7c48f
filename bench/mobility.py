#!/usr/bin/env python3
"""Mobility: how long a node's move interrupts its overlay flows, with the real AS, NMS, TRS
and two ``cyphonic-agent up`` in a namespace test bed.

Run as root from the repository root, under the benchmark lock:

    flock /tmp/cyphonic-bench.lock uv run --frozen python bench/mobility.py [--case NAME]
        [--rounds 1] [--json]

Cases (``cyphonic_testbed.mobility``): ``nat-to-nat`` (alice between two IPv4 NAT
networks and back, bob global IPv4: pattern 2 throughout), ``v6-to-nat`` (alice from a
global IPv6 network to an IPv4 NAT one and back, bob IPv6 only: pattern 1, 3 through the
TRS, 1), ``server-move`` (bob, who accepted alice's tunnel, between two global IPv4
networks and back). The move is ``NetBed.move``: the uplink loses its addresses and goes
down, the other comes up with its addresses and default route (``--gap S``: S seconds with
no uplink at all in between, as a radio handover; the interruption then includes them).

For each move, from alice to bob's virtual IPv4 address: a 10 ms ping stream (``ping -i
0.01``; the figure is the longest gap between two successive echo replies) and a paced TCP
stream of 12 MB at 2 MB/s (the longest time the receiver got no byte; its SHA-256 checked
against the sender's). The move happens 1 s into them. Before the moves, the same two flows
run once without a move in the same bed: the control row, and the ratio column divides each
gap by the control's. Targets (mobility issue): at most 300 ms when the new path is direct,
1 s when it goes through the relay.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from cyphonic_testbed import build
from cyphonic_testbed.errors import TestbedError
from cyphonic_testbed.interruption import Interruption, measure_move
from cyphonic_testbed.mobility import CASES, MoveCase, open_route, peer_row, start_overlay
from cyphonic_testbed.wait import wait_for


def _row(
    case: str,
    move: str,
    result: Interruption | None,
    *,
    target_ms: float | None,
    pattern: str,
    error: str = "",
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "case": case,
        "move": move,
        "pattern": pattern,
        "target_ms": target_ms,
        "load": os.getloadavg()[0],
        "error": error,
    }
    if result is not None:
        row.update(
            ping_gap_ms=result.ping_gap_ms,
            ping_sent=result.ping.sent,
            ping_received=result.ping.received,
            tcp_stall_ms=result.tcp_stall_ms,
            tcp_intact=result.tcp_intact,
        )
    return row


def run_case(
    case: MoveCase,
    rounds: int,
    workdir: Path,
    *,
    gap: float = 0.0,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with build(case.topology()) as bed:
        overlay = start_overlay(bed, workdir=workdir)
        address = open_route(overlay)
        alice, bob = bed.host("alice"), bed.host("bob")
        control = measure_move(src=alice, dst=bob, address=address, move=None)
        rows.append(
            _row(case.name, "no move (control)", control, target_ms=None, pattern=case.pattern)
        )
        print(f"{case.name}: control gap {control.ping_gap_ms} ms", file=sys.stderr, flush=True)
        for _ in range(rounds):
            for step in case.steps:
                label = f"{case.mover} -> {step.to}"
                try:
                    result = measure_move(
                        src=alice,
                        dst=bob,
                        address=address,
                        move=lambda to=step.to: bed.move(case.mover, to, gap=gap),
                    )
                except TestbedError as exc:
                    rows.append(
                        _row(
                            case.name,
                            label,
                            None,
                            target_ms=step.target_ms,
                            pattern="-",
                            error=str(exc).splitlines()[0][:80],
                        )
                    )
                    break
                pattern = "-"
                try:  # the pattern the route settled on (shown, not required here)
                    settled = wait_for(
                        lambda p=step.pattern: (
                            (r := peer_row(overlay.alice, overlay.bob))
                            and r.get("state") == "up"
                            and r.get("pattern") == p
                            and r
                        ),
                        15,
                        interval=0.5,
                    )
                    pattern = str(settled["pattern"])
                except TimeoutError:
                    row = peer_row(overlay.alice, overlay.bob) or {}
                    pattern = f"{row.get('pattern', '-')}?"
                rows.append(
                    _row(case.name, label, result, target_ms=step.target_ms, pattern=pattern)
                )
                print(
                    f"{case.name} {label}: gap {result.ping_gap_ms} ms, stall "
                    f"{result.tcp_stall_ms:.0f} ms, intact {result.tcp_intact}",
                    file=sys.stderr,
                    flush=True,
                )
        overlay.services.stop()
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "case",
        "move",
        "pattern",
        "ping gap ms",
        "x control",
        "replies",
        "TCP stall ms",
        "bytes ok",
        "target ms",
        "verdict",
    )
    lines = [header]
    control: dict[str, float] = {}
    for r in rows:
        gap = r.get("ping_gap_ms")
        if r["target_ms"] is None and gap:
            control[r["case"]] = gap
        ratio = (
            "-" if gap is None or r["case"] not in control else f"{gap / control[r['case']]:.1f}"
        )
        if r["error"]:
            verdict = f"FAIL ({r['error']})"
        elif r["target_ms"] is None:
            verdict = ""
        else:
            worst = max(gap or float("inf"), r["tcp_stall_ms"])
            ok = r["tcp_intact"] and (gap or float("inf")) <= r["target_ms"]
            verdict = ("PASS" if ok else "FAIL") + (
                "" if worst <= r["target_ms"] else " (stall over target)"
            )
        replies = f"{r['ping_received']}/{r['ping_sent']}" if "ping_sent" in r else "-"
        lines.append(
            (
                r["case"],
                r["move"],
                r["pattern"],
                _fmt(gap),
                ratio,
                replies,
                _fmt(r.get("tcp_stall_ms")),
                "-" if "tcp_intact" not in r else ("yes" if r["tcp_intact"] else "NO"),
                _fmt(r["target_ms"]),
                verdict,
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--case",
        choices=sorted(CASES),
        action="append",
        help="run only this case (repeatable); default: all",
    )
    parser.add_argument("--rounds", type=int, default=1, help="times each case's moves run")
    parser.add_argument(
        "--gap",
        type=float,
        default=0.0,
        help="seconds the mover has no uplink at all during each move",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("mobility.py: needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    with open("/proc/loadavg") as f:
        print(f"load average before: {f.read().strip()}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for name in args.case or list(CASES):
        with tempfile.TemporaryDirectory(prefix="cyphonic-mobility-") as tmp:
            os.chmod(tmp, 0o755)
            rows += run_case(CASES[name], args.rounds, Path(tmp), gap=args.gap)
    with open("/proc/loadavg") as f:
        print(f"load average after: {f.read().strip()}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    failed = any(
        r["error"] or (r["target_ms"] is not None and not r.get("tcp_intact")) for r in rows
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
