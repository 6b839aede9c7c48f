"""A TRS process killed and restarted in the middle of a relayed transfer, nothing mocked.

Two ``cyphonic-trs`` replicas (0 and 1, each in its own cloud host) share the bed's Redis;
the NMS picks one of them for the route between alice and bob, each behind a symmetric
NAT and the enterprise firewall (``double_nat``), joined with ``cyphonic-agent up``. While
a paced TCP transfer runs from alice to bob's virtual address through the relay (and a
ping every 10 ms beside it), the replica carrying the route is killed with SIGKILL (no
chance to save anything) and started again, same host, same replica number.

The restarted replica reloads the session from Redis; the nodes do nothing special: QUIC
and the inner TCP retransmit what was lost while nothing listened, and the transfer
completes with every byte correct (SHA-256 checked at the receiver). The other replica is
not involved. Printed (``-s``): how long the TRS was down, the longest gap in the ping
stream and the longest TCP stall at the receiver.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from cyphonic_testbed import double_nat
from relay_bed import TrsProcess, marked_payload, sha256, start_trs

pytestmark = [pytest.mark.netns, pytest.mark.timeout(480)]

SERVICES = ("as", "nms", "trs", "trs2", "redis")
PORT = 9100
SIZE = 12_000_000
RATE = 1_500_000
"""Bytes per second the sender paces itself to: the transfer lasts about 8 s unhindered."""

# Receives ``size`` bytes; prints its SHA-256, and the longest wait between two reads.
RECEIVER = r"""
import hashlib, json, socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(1); print("listening", flush=True)
s.settimeout(60); c, _ = s.accept(); c.settimeout(120)
h, n, gap, last = hashlib.sha256(), 0, 0.0, time.monotonic()
while n < size:
    chunk = c.recv(65536)
    if not chunk:
        break
    now = time.monotonic(); gap = max(gap, now - last); last = now
    h.update(chunk); n += len(chunk)
c.close()
print(json.dumps({"sha256": h.hexdigest(), "bytes": n, "max_gap_s": gap}), flush=True)
"""

# Sends stdin to host:port paced to ``rate`` bytes/s; prints "sending" once connected.
SENDER = r"""
import socket, sys, time
data = sys.stdin.buffer.read()
host, port, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port), timeout=30); c.settimeout(120)
print("sending", flush=True)
start = time.monotonic()
for at in range(0, len(data), 65536):
    c.sendall(data[at:at + 65536])
    ahead = (at + 65536) / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""


def _longest_ping_gap(output: str) -> tuple[float, int, int]:
    """From ``ping -D`` output: the longest time between two replies, replies, last seq."""
    stamps = [float(m.group(1)) for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from", output,
                                                      re.MULTILINE)]
    seqs = [int(m.group(1)) for m in re.finditer(r"icmp_seq=(\d+) ", output)]
    gap = max((b - a for a, b in itertools.pairwise(stamps)), default=0.0)
    return gap, len(stamps), max(seqs, default=0)


def _sessions(trs: TrsProcess) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = trs.get("/v1/sessions")["items"]
    return items


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s")
        time.sleep(0.2)


def test_trs_process_killed_mid_transfer_comes_back_by_itself(relay_overlay: Any) -> None:
    o = relay_overlay(double_nat(services=SERVICES))
    replicas = {"trs": o.trs, "trs2": start_trs(o.services, host="trs2",
                                                redis_url=o.redis_url, replica=1)}
    _wait(lambda: len(o.trs.get("/v1/replicas")) == 2, 30,
          "both replicas registered in Redis")
    alice, bob = o.start("alice"), o.start("bob")
    alice.wait_up()
    bob.wait_up()
    a_node, b_node = o.bed.host("alice"), o.bed.host("bob")
    vip = bob.status()["virtual_ipv4"]
    # The first packet to bob's virtual address asks the NMS for the route (pattern 3).
    _wait(lambda: a_node.run(["ping", "-n", "-c", "1", "-W", "1", vip],
                             timeout=10).returncode == 0, 60, "no relayed route to bob")
    (row,) = [p for p in alice.status()["peers"] if p["fqdn"] == bob.fqdn]
    assert row["pattern"] == "relay", row
    holding = {host: _sessions(t) for host, t in replicas.items()}
    (host,) = [h for h, items in holding.items() if items]  # exactly one replica carries it
    (other,) = set(replicas) - {host}
    (session,) = holding[host]
    victim = replicas[host]
    tunnels_before = alice.log_text().count('"tunnel_up"')

    payload = marked_payload(SIZE)
    receiver = b_node.popen([sys.executable, "-c", RECEIVER, vip, str(PORT), str(SIZE)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pinger = sender = None
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline() == b"listening\n"
        pinger = a_node.popen(["ping", "-n", "-D", "-i", "0.01", "-W", "1", vip],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sender = a_node.popen([sys.executable, "-c", SENDER, vip, str(PORT), str(RATE)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        assert sender.stdin is not None and sender.stdout is not None
        sender.stdin.write(payload)
        sender.stdin.close()
        assert sender.stdout.readline() == b"sending\n"
        time.sleep(2.0)  # a quarter of the transfer is through when the relay dies
        assert sender.poll() is None, "the transfer ended before the relay was killed"

        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(timeout=10)
        killed_at = time.monotonic()
        # Started again the same way; a fresh log so that its start is what is waited for.
        os.replace(victim.log, victim.log.with_suffix(".killed.log"))
        restarted = start_trs(o.services, host=host, redis_url=o.redis_url,
                              replica=0 if host == "trs" else 1)
        serving_after = time.monotonic() - killed_at
        if host == "trs":
            o.trs = restarted
        replicas[host] = restarted

        assert sender.wait(timeout=180) == 0, sender.stderr.read() if sender.stderr else ""
        out, _ = receiver.communicate(timeout=60)
        result = json.loads(out.decode().strip().splitlines()[-1])
        time.sleep(1.0)  # some pings after the transfer
    finally:
        for proc in (pinger, sender, receiver):
            if proc is not None and proc.poll() is None:
                if proc is pinger:
                    proc.send_signal(signal.SIGINT)  # ping prints what it got, then exits
                else:
                    proc.kill()
    assert pinger is not None
    ping_out, _ = pinger.communicate(timeout=10)

    assert result["bytes"] == SIZE and result["sha256"] == sha256(payload), result
    gap, replies, last_seq = _longest_ping_gap(ping_out)
    assert replies > 0.5 * last_seq, ping_out[-2000:]  # pings flow before and after
    # The restarted replica reloaded the route from Redis and carried the rest of it.
    replica = restarted.get("/v1/replica")
    assert replica["restored_at_start"] >= 1, replica
    (after,) = _sessions(restarted)
    assert after["route_id"] == session["route_id"]
    assert {s["fqdn"]: s["address"] for s in after["sides"]} == \
        {s["fqdn"]: s["address"] for s in session["sides"]}
    assert after["bytes"] > 0 and replica["forwarded_packets"] > 0
    assert _sessions(replicas[other]) == []  # the other replica was never involved
    same_tunnel = alice.log_text().count('"tunnel_up"') == tunnels_before
    sys.stderr.write(
        f"\nTRS {host} (replica {replica['replica']}) SIGKILLed mid-transfer: serving again "
        f"{serving_after:.1f} s later, {replica['restored_at_start']} session(s) reloaded "
        f"from Redis; {SIZE / 1e6:g} MB transfer complete and correct; longest gap in the "
        f"10 ms ping stream {gap:.2f} s ({replies} replies to {last_seq} pings); longest TCP "
        f"stall at the receiver {result['max_gap_s']:.2f} s; "
        f"{'same' if same_tunnel else 'a new'} tunnel afterwards\n")
