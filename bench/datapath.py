#!/usr/bin/env python3
"""Data-path yardstick: raw veth vs wireguard-go vs the CYPHONIC overlay, in one run.

Run as root from the repository root:

    uv run --frozen python bench/datapath.py [--duration 10] [--pings 200] [--hops] [--json]
        [--wireguard-go PATH ...] [--no-udp]

Topology (made and removed by this script; nothing else on the host is touched)::

    netns A  veth 10.201.0.1/24 ======= veth 10.201.0.2/24  netns B
                  10.201.1.1/24                  10.201.1.2/24  (second overlay's UDP 443)
             wg   10.202.0.1/24  (wireguard-go, MTU 1420)    10.202.0.2/24
             TUN  100.64.0.1/24  (overlay, aioquic engine)   100.64.0.2/24
             TUN  100.65.0.1/24  (overlay, qh3 engine)       100.65.0.2/24
             TUN  100.66.0.1/24  (overlay, qh3, TUN offloads) 100.66.0.2/24

For each path: iperf3 TCP throughput A -> B (one stream, first second omitted), iperf3 UDP
throughput at a saturating offered rate (datagrams sized to the path's MTU, what B
received; ``--no-udp`` skips it), ping RTT (``--pings`` echo requests 5 ms apart), and the
CPU seconds per GB the path's own processes (wireguard-go, the overlay nodes or agents; not
iperf3, not the kernel's softirq work, which /proc does not attribute) spent during the TCP
run. The table gives each path's ratio to raw veth and to every wireguard-go build, and
checks the overlay against issue 12's targets relative to the fastest wireguard-go of the
run (the offload-capable build when given): throughput at least 0.5x and average RTT at
most 0.15 ms above it.

``--wireguard-go PATH`` (repeatable) measures that wireguard-go binary, each build in its own
row, instead of the one on PATH; e.g. the Debian 12 package's /usr/bin/wireguard-go and the
offload-capable Debian 13 build extracted with ``dpkg-deb -x`` into a temporary directory.

``--hops`` also splits each path's echoes per hop (tcpdump on both tunnel devices and both
veth ends: A's tunnel sending, B's receiving, B's kernel answering, B's sending, A's
receiving) and prints the median of each hop: where the RTT difference to wireguard-go is.

The overlay prototype runs once per QUIC engine (aioquic, qh3; qh3 also with TUN offloads,
with and without partial inner checksums), each on UDP 443 of its own veth address. The
"CYPHONIC overlay" row runs the agents' own ``up`` path (``overlay_path``) on the default
engine (qh3; ``CYPHONIC_QUIC_ENGINE=aioquic`` for the other) with TUN offloads.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

VETH_A = "10.201.0.1"
VETH_B = "10.201.0.2"
WG_PORT = 51820
WG_MTU = 1420
WG_OVERHEAD_V4 = 20 + 8 + 32  # IPv4 + UDP + WireGuard header (16) and tag (16)
OVERLAY_A = "100.64.0.1"
OVERLAY_B = "100.64.0.2"
QH3_VETH_A = "10.201.1.1"
QH3_VETH_B = "10.201.1.2"
QH3_OVERLAY_A = "100.65.0.1"
QH3_OVERLAY_B = "100.65.0.2"
QH3F_VETH_A = "10.201.3.1"
QH3F_VETH_B = "10.201.3.2"
QH3F_OVERLAY_A = "100.67.0.1"
QH3F_OVERLAY_B = "100.67.0.2"
QH3O_VETH_A = "10.201.2.1"
QH3O_VETH_B = "10.201.2.2"
QH3O_OVERLAY_A = "100.66.0.1"
QH3O_OVERLAY_B = "100.66.0.2"
OVERLAY_MTU = 1420
OVERLAY_OVERHEAD_V4 = 20 + 8 + 30  # IPv4 + UDP + QUIC short header, PN, tag, DATAGRAM frame
OVERLAY_NODE_ARGS: list[str] = []
"""Extra arguments for bench/overlay_node.py (--overlay-arg, for experiments)."""
KEEP_LOGS: Path | None = None
"""Set by --keep-logs: where the started processes' logs are copied at the end."""
PROFILE_DIR: Path | None = None
"""Set by --profile: where the overlay nodes write their cProfile statistics."""
TARGET_THROUGHPUT_RATIO = 0.5
TARGET_RTT_EXTRA_MS = 0.15
IPERF_PORT = 5201
UDP_OFFERED = "20G"
"""iperf3 -u offered rate: more than any path here carries, so the figure is what got
through."""
WIREGUARD_GO: list[str] = []
"""Set by --wireguard-go: the binaries to measure (default: the one on PATH)."""
MEASURE_UDP = True
WG_INDEX: dict[str, int] = {}
"""Row name -> index of each wireguard-go build (its interfaces, subnet and port)."""


class PathUnavailable(Exception):
    """A path that cannot be measured in this run (with the reason)."""


@dataclass
class PathResult:
    """Figures measured over one path."""

    name: str
    mtu: int | None = None
    overhead: int | None = None
    gbit_s: float | None = None
    retransmits: int | None = None
    rtt_avg_ms: float | None = None
    rtt_min_ms: float | None = None
    rtt_max_ms: float | None = None
    rtt_mdev_ms: float | None = None
    gbit_s_samples: list[float] = field(default_factory=list)
    """Throughput of each round (the table shows their median)."""
    rtt_avg_samples: list[float] = field(default_factory=list)
    udp_gbit_s: float | None = None
    udp_loss_pct: float | None = None
    rcvbuf_drops: int | None = None
    """UDP datagrams B's kernel dropped for a full socket receive buffer in the TCP run."""
    cpu_s_per_gb: float | None = None
    """CPU seconds (user + system) of the path's own processes per GB received (TCP run)."""
    udp_samples: list[float] = field(default_factory=list)
    cpu_samples: list[float] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    """The path's own processes (whose CPU time counts)."""
    hop_samples: dict[str, list[float]] = field(default_factory=dict)
    """Per-hop delays of echoes in microseconds (``--hops``), all rounds together."""
    note: str = ""

    def add(self, sample: PathResult) -> None:
        """Fold one round's figures in: medians of throughput and RTT, extremes of RTT."""
        if sample.gbit_s is not None:
            self.gbit_s_samples.append(sample.gbit_s)
            self.gbit_s = statistics.median(self.gbit_s_samples)
            self.retransmits = (self.retransmits or 0) + (sample.retransmits or 0)
        if sample.rtt_avg_ms is not None:
            self.rtt_avg_samples.append(sample.rtt_avg_ms)
            self.rtt_avg_ms = statistics.median(self.rtt_avg_samples)
            self.rtt_min_ms = _pick(min, self.rtt_min_ms, sample.rtt_min_ms)
            self.rtt_max_ms = _pick(max, self.rtt_max_ms, sample.rtt_max_ms)
            self.rtt_mdev_ms = _pick(max, self.rtt_mdev_ms, sample.rtt_mdev_ms)
        if sample.udp_gbit_s is not None:
            self.udp_samples.append(sample.udp_gbit_s)
            self.udp_gbit_s = statistics.median(self.udp_samples)
            self.udp_loss_pct = sample.udp_loss_pct
        if sample.rcvbuf_drops is not None:
            self.rcvbuf_drops = (self.rcvbuf_drops or 0) + sample.rcvbuf_drops
        if sample.cpu_s_per_gb is not None:
            self.cpu_samples.append(sample.cpu_s_per_gb)
            self.cpu_s_per_gb = statistics.median(self.cpu_samples)
        for hop, values in sample.hop_samples.items():
            self.hop_samples.setdefault(hop, []).extend(values)
        self.note += sample.note


def _pick(fn: Callable[[list[float]], float], *values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return fn(present) if present else None


@dataclass
class Run:
    """Everything one run produced."""

    started: str
    duration_s: float
    pings: int
    loadavg_before: tuple[float, float, float]
    cpus: int
    rounds: int = 1
    paths: list[PathResult] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)


# --- plumbing ------------------------------------------------------------------------------


def sh(*args: str, ns: str | None = None, timeout: float = 30, check: bool = True) -> str:
    """Run a command (inside ``ns`` if given); return stdout."""
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


class Topology:
    """Two namespaces joined by a veth pair; everything it starts is stopped by ``close``."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns_a = f"cydp-a-{tag}"
        self.ns_b = f"cydp-b-{tag}"
        self.tag = tag
        self.processes: list[subprocess.Popen[bytes]] = []
        self.cleanups: list[Callable[[], None]] = []
        self.logs: dict[int, Path] = {}
        """Output file of each started process, by pid."""
        self.tmp = Path(tempfile.mkdtemp(prefix="cyphonic-bench-"))
        os.chmod(self.tmp, 0o700)

    def create(self) -> None:
        sh("ip", "netns", "add", self.ns_a)
        sh("ip", "netns", "add", self.ns_b)
        veth_a, veth_b = f"cyv{self.tag}a", f"cyv{self.tag}b"
        sh(
            "ip",
            "link",
            "add",
            veth_a,
            "netns",
            self.ns_a,
            "type",
            "veth",
            "peer",
            "name",
            veth_b,
            "netns",
            self.ns_b,
        )
        for ns, dev, addr, second, third, fourth in (
            (self.ns_a, veth_a, VETH_A, QH3_VETH_A, QH3O_VETH_A, QH3F_VETH_A),
            (self.ns_b, veth_b, VETH_B, QH3_VETH_B, QH3O_VETH_B, QH3F_VETH_B),
        ):
            sh("ip", "link", "set", "lo", "up", ns=ns)
            sh("ip", "addr", "add", f"{addr}/24", "dev", dev, ns=ns)
            sh("ip", "addr", "add", f"{second}/24", "dev", dev, ns=ns)
            sh("ip", "addr", "add", f"{third}/24", "dev", dev, ns=ns)
            sh("ip", "addr", "add", f"{fourth}/24", "dev", dev, ns=ns)
            sh("ip", "link", "set", dev, "up", ns=ns)

    def start(
        self, *args: str, ns: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a background process in ``ns``; its output goes to a log file in tmp."""
        log = self.tmp / f"{len(self.processes)}-{Path(args[0]).name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # so a Ctrl-C of the bench does not hit it first
            )
        self.processes.append(proc)
        self.logs[proc.pid] = log
        return proc

    def close(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        for ns in (self.ns_a, self.ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        if KEEP_LOGS is not None:
            KEEP_LOGS.mkdir(parents=True, exist_ok=True)
            for log in self.tmp.glob("*.log"):
                shutil.copy(log, KEEP_LOGS / log.name)
        shutil.rmtree(self.tmp, ignore_errors=True)


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


# --- measurements --------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (and their threads) so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def udp_rcvbuf_errors(ns: str) -> int:
    """The namespace's UDP RcvbufErrors counter (/proc/net/snmp, read inside it)."""
    lines = [line.split() for line in sh("cat", "/proc/net/snmp", ns=ns).splitlines()]
    rows = [row for row in lines if row and row[0] == "Udp:"]
    if len(rows) < 2 or "RcvbufErrors" not in rows[0]:
        return 0
    return int(rows[1][rows[0].index("RcvbufErrors")])


def measure(
    topo: Topology,
    result: PathResult,
    *,
    dst: str,
    duration: float,
    pings: int,
    pids: list[int],
    mtu: int,
) -> None:
    """Fill ``result`` with ping RTT, iperf3 TCP throughput (and the CPU the path's processes
    spent on it), then UDP throughput from A to ``dst`` in B."""
    # Warm up (ARP, WireGuard handshake, tunnel set-up) before timing anything.
    sh("ping", "-c", "3", "-i", "0.2", "-W", "2", dst, ns=topo.ns_a, timeout=20)
    out = sh(
        "ping",
        "-q",
        "-c",
        str(pings),
        "-i",
        "0.005",
        "-W",
        "2",
        dst,
        ns=topo.ns_a,
        timeout=pings * 0.05 + 30,
    )
    m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    loss = re.search(r"([\d.]+)% packet loss", out)
    if not m:
        raise RuntimeError(f"ping output not understood: {out}")
    result.rtt_min_ms, result.rtt_avg_ms, result.rtt_max_ms, result.rtt_mdev_ms = (
        float(x) for x in m.groups()
    )
    if loss and float(loss.group(1)) > 0:
        result.note += f"ping loss {loss.group(1)}% "

    server = topo.start("iperf3", "-s", "-1", "-B", dst, "-p", str(IPERF_PORT), ns=topo.ns_b)
    wait_until(
        lambda: f":{IPERF_PORT}" in sh("ss", "-Hltn", ns=topo.ns_b),
        timeout=10,
        what="iperf3 server",
    )
    cpu_before = cpu_seconds(pids)
    drops_before = udp_rcvbuf_errors(topo.ns_b)
    out = sh(
        "iperf3",
        "-c",
        dst,
        "-p",
        str(IPERF_PORT),
        "-t",
        str(duration),
        "-O",
        "1",
        "-J",
        ns=topo.ns_a,
        timeout=duration + 60,
    )
    cpu = cpu_seconds(pids) - cpu_before
    result.rcvbuf_drops = udp_rcvbuf_errors(topo.ns_b) - drops_before
    server.wait(timeout=10)
    report = json.loads(out)
    end = report["end"]
    result.gbit_s = end["sum_received"]["bits_per_second"] / 1e9
    result.retransmits = end["sum_sent"].get("retransmits")
    received = end["sum_received"]["bytes"]
    # The omitted first second is in the CPU time but not in "bytes": scale by the rate.
    moved_gb = result.gbit_s / 8 * (duration + 1) if result.gbit_s else received / 1e9
    if pids and moved_gb > 0:
        result.cpu_s_per_gb = cpu / moved_gb
    if MEASURE_UDP:
        measure_udp(topo, result, dst=dst, duration=duration, mtu=mtu)


def measure_udp(topo: Topology, result: PathResult, *, dst: str, duration: float, mtu: int) -> None:
    """iperf3 UDP A -> B at ``UDP_OFFERED``, datagrams of the path MTU; B's received rate."""
    server = topo.start("iperf3", "-s", "-1", "-B", dst, "-p", str(IPERF_PORT), ns=topo.ns_b)
    wait_until(
        lambda: f":{IPERF_PORT}" in sh("ss", "-Hltn", ns=topo.ns_b),
        timeout=10,
        what="iperf3 server",
    )
    out = sh(
        "iperf3",
        "-c",
        dst,
        "-p",
        str(IPERF_PORT),
        "-u",
        "-b",
        UDP_OFFERED,
        "-l",
        str(mtu - 28),
        "-t",
        str(duration),
        "-J",
        ns=topo.ns_a,
        timeout=duration + 60,
    )
    server.wait(timeout=10)
    end = json.loads(out)["end"]
    summary = end.get("sum_received") or end["sum"]
    result.udp_gbit_s = summary["bits_per_second"] / 1e9
    result.udp_loss_pct = end["sum"].get("lost_percent")


# --- per-hop split ---------------------------------------------------------------------------

HOPS = ("A tun->udp", "B udp->tun", "B echo", "B tun->udp", "A udp->tun")
"""Where an echo's round trip goes: A's tunnel sends the request (TUN read to UDP send), B's
receives it (UDP to TUN write), B's kernel answers, B's tunnel sends the reply, A's
receives it. The wire between the veth ends takes about 1 us and is left out."""
A_ADDRESSES = (VETH_A, QH3_VETH_A)
HOP_PINGS_INTERVAL = "0.005"
_TCPDUMP_LINE = re.compile(
    r"^(\d+\.\d+) IP (\S+?)\.(\d+) > (\S+?)\.(\d+): UDP, length (\d+)"
    r"|^(\d+\.\d+) IP \S+ > \S+: ICMP echo (request|reply), id \d+, seq (\d+)"
)


def hop_taps(topo: Topology, name: str) -> tuple[str, str, int] | None:
    """(A's tunnel device, B's, UDP port) of a path, None for the raw veth."""
    tag = topo.tag
    if is_wireguard(name):
        index = WG_INDEX.get(name, 0)
        return f"cyw{tag}{index}a", f"cyw{tag}{index}b", WG_PORT + index
    if name == "overlay prototype qh3 offload":
        return f"cyx{tag}", f"cyx{tag}", 443
    if name == "overlay prototype qh3 offload, full checksums":
        return f"cyf{tag}", f"cyf{tag}", 443
    if name == "overlay prototype":
        return f"cyo{tag}", f"cyo{tag}", 443
    if name == "overlay prototype qh3":
        return f"cyq{tag}", f"cyq{tag}", 443
    if name == "CYPHONIC overlay":
        sys.path.insert(0, str(Path(__file__).parent))
        from agent_overlay import AGENT_PORT

        return f"cya{tag}", f"cya{tag}", AGENT_PORT
    return None


def split_hops(topo: Topology, result: PathResult, *, dst: str, pings: int) -> None:
    """Echoes timed on both tunnel devices and both veth ends (tcpdump, one clock), split
    into ``HOPS``; adds each echo's delays to ``result.hop_samples``."""
    taps = hop_taps(topo, result.name)
    if taps is None:
        return
    if shutil.which("tcpdump") is None:
        result.note += "hops: tcpdump not installed "
        return
    tun_a, tun_b, port = taps
    captures = {
        "a_tun": (topo.ns_a, tun_a, "icmp"),
        "b_tun": (topo.ns_b, tun_b, "icmp"),
        "a_veth": (topo.ns_a, f"cyv{topo.tag}a", f"udp port {port}"),
        "b_veth": (topo.ns_b, f"cyv{topo.tag}b", f"udp port {port}"),
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    files = {key: topo.tmp / f"hops-{key}.pcap" for key in captures}
    errors = {key: topo.tmp / f"hops-{key}.err" for key in captures}
    try:
        for key, (ns, dev, expression) in captures.items():
            with errors[key].open("wb") as err:
                procs[key] = subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "tcpdump",
                        "-i",
                        dev,
                        "-n",
                        "-U",
                        "-s",
                        "128",
                        "-w",
                        str(files[key]),
                        expression,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
        wait_until(
            lambda: all(b"listening on" in errors[k].read_bytes() for k in captures),
            timeout=10,
            what="tcpdump",
        )
        sh(
            "ping",
            "-q",
            "-c",
            str(pings),
            "-i",
            HOP_PINGS_INTERVAL,
            "-W",
            "2",
            dst,
            ns=topo.ns_a,
            timeout=pings * 0.05 + 30,
        )
        time.sleep(0.2)  # the last packets reach the capture files
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
    events = {key: _read_capture(path) for key, path in files.items()}
    for echo in _echo_hops(events):
        for hop, value in zip(HOPS, echo, strict=True):
            result.hop_samples.setdefault(hop, []).append(value)


def _read_capture(path: Path) -> list[tuple[float, str, str, int]]:
    """(time, kind, direction, size or seq): ICMP ``request``/``reply`` by sequence number;
    UDP ``a>b``/``b>a`` by payload size."""
    out = sh("tcpdump", "-r", str(path), "-tt", "-n", timeout=60)
    events = []
    for line in out.splitlines():
        m = _TCPDUMP_LINE.match(line)
        if m is None:
            continue
        if m.group(1):
            direction = "a>b" if m.group(2) in A_ADDRESSES else "b>a"
            events.append((float(m.group(1)), "udp", direction, int(m.group(6))))
        else:
            events.append((float(m.group(7)), m.group(8), "", int(m.group(9))))
    return events


def _echo_hops(events: dict[str, list[tuple[float, str, str, int]]]) -> list[list[float]]:
    """Each echo's delays (us) along ``HOPS``: ICMP matched by sequence number, the tunnel's
    datagram as the first UDP datagram of 100 bytes or more (an echo, not an ACK) that left
    after the packet entered the tunnel."""

    def icmp(key: str, kind: str) -> dict[int, float]:
        return {n: t for t, k, _, n in events[key] if k == kind}

    def carriers(key: str, direction: str) -> list[float]:
        return sorted(
            t for t, k, d, size in events[key] if k == "udp" and d == direction and size >= 100
        )

    req_a, rep_a = icmp("a_tun", "request"), icmp("a_tun", "reply")
    req_b, rep_b = icmp("b_tun", "request"), icmp("b_tun", "reply")
    a_out, b_out = carriers("a_veth", "a>b"), carriers("b_veth", "b>a")

    def first_after(times: list[float], t: float) -> float | None:
        i = bisect.bisect_left(times, t)
        return times[i] if i < len(times) else None

    echoes = []
    for seq, t0 in req_a.items():
        if seq not in req_b or seq not in rep_b or seq not in rep_a:
            continue
        t1 = first_after(a_out, t0)
        t4 = first_after(b_out, rep_b[seq])
        if t1 is None or t4 is None or t1 > req_b[seq] or t4 > rep_a[seq]:
            continue
        t2, t3, t5 = req_b[seq], rep_b[seq], rep_a[seq]
        echoes.append(
            [(b - a) * 1e6 for a, b in ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))]
        )
    return echoes


# --- the paths -----------------------------------------------------------------------------


def raw_veth_path(topo: Topology) -> tuple[str, int, int]:
    """The veth itself: the ceiling."""
    return VETH_B, 1500, 0


def wireguard_go_version(binary: str) -> str:
    """What ``binary --version`` reports (e.g. v0.0.20230223)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    m = re.search(r"v?\d+\.\d+\.\d+\S*", out.stdout + out.stderr)
    return m.group(0) if m else "?"


def wireguard_go_path(
    topo: Topology, *, binary: str = "wireguard-go", index: int = 0
) -> tuple[str, int, int]:
    """wireguard-go ``binary`` in both namespaces (userspace WireGuard); the ``index``-th
    build of the run gets its own interfaces, subnet 10.202.<index>.0/24 and port."""
    for tool in (binary, "wg"):
        if shutil.which(tool) is None:
            raise PathUnavailable(f"{tool} not installed (Debian: wireguard-go, wireguard-tools)")
    keys = {}
    for side in ("a", "b"):
        private = sh("wg", "genkey").strip()
        public = subprocess.run(
            ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
        ).stdout.strip()
        key_file = topo.tmp / f"wg{index}-{side}.key"
        key_file.touch(mode=0o600)
        key_file.write_text(private + "\n")
        keys[side] = (key_file, public)
    # Distinct names: the UAPI socket /var/run/wireguard/<ifname>.sock is not per namespace.
    names = {"a": f"cyw{topo.tag}{index}a", "b": f"cyw{topo.tag}{index}b"}
    wg_a, wg_b = f"10.202.{index}.1", f"10.202.{index}.2"
    port = WG_PORT + index
    env = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    plan = (("a", topo.ns_a, wg_a, VETH_B, "b", wg_b), ("b", topo.ns_b, wg_b, VETH_A, "a", wg_a))
    for side, ns, _addr, _peer_real, _peer, _peer_addr in plan:
        name = names[side]
        topo.start(binary, "-f", name, ns=ns, env=env)
        sock = Path(f"/var/run/wireguard/{name}.sock")
        topo.cleanups.append(lambda sock=sock: sock.unlink(missing_ok=True))  # type: ignore[misc]
        wait_until(sock.exists, timeout=10, what=f"wireguard-go {name}")
    for side, ns, addr, peer_real, peer, peer_addr in plan:
        name = names[side]
        sh(
            "wg",
            "set",
            name,
            "private-key",
            str(keys[side][0]),
            "listen-port",
            str(port),
            "peer",
            keys[peer][1],
            "endpoint",
            f"{peer_real}:{port}",
            "allowed-ips",
            f"{peer_addr}/32",
            ns=ns,
        )
        sh("ip", "addr", "add", f"{addr}/24", "dev", name, ns=ns)
        sh("ip", "link", "set", name, "mtu", str(WG_MTU), "up", ns=ns)
    return wg_b, WG_MTU, WG_OVERHEAD_V4


def make_node_state(topo: Topology, name: str, *, fqdn: str | None = None) -> Path:
    """A state directory like ``cyphonic-agent enroll`` writes, signed by a fresh test PKI."""
    import datetime

    from cyphonic import pki

    fqdn = fqdn or name
    now = datetime.datetime.now(datetime.UTC)
    material = pki.init_pki(topo.tmp / "pki", now=now, services=())
    state = topo.tmp / name
    state.mkdir(mode=0o700)
    key = pki.generate_key()
    cert = pki.sign_node_csr(material.node_ca, pki.make_csr(key, fqdn), fqdn=fqdn, now=now)
    pki.write_private_key(state / "node.key", key)
    pki.write_certificates(state / "node.crt", [cert, material.node_ca.cert])
    pki.write_certificates(state / "root-ca.crt", [material.root_cert])
    return state


def overlay_prototype_path(topo: Topology) -> tuple[str, int, int]:
    """The overlay's data path without AS/NMS on the aioquic engine (see ``_prototype``)."""
    return _prototype(
        topo,
        engine="aioquic",
        veth=(VETH_A, VETH_B),
        overlay=(OVERLAY_A, OVERLAY_B),
        tun=f"cyo{topo.tag}",
    )


def overlay_qh3_path(topo: Topology) -> tuple[str, int, int]:
    """The same prototype on the qh3 engine, on the second veth addresses."""
    try:
        import qh3  # noqa: F401
    except ImportError as exc:
        raise PathUnavailable("qh3 not installed (the shared library's qh3 extra)") from exc
    return _prototype(
        topo,
        engine="qh3",
        veth=(QH3_VETH_A, QH3_VETH_B),
        overlay=(QH3_OVERLAY_A, QH3_OVERLAY_B),
        tun=f"cyq{topo.tag}",
    )


def overlay_qh3_offload_path(topo: Topology) -> tuple[str, int, int]:
    """The qh3 prototype with TUN offloads (IFF_VNET_HDR, TSO/CSUM), on the third addresses."""
    try:
        import qh3  # noqa: F401
    except ImportError as exc:
        raise PathUnavailable("qh3 not installed (the shared library's qh3 extra)") from exc
    return _prototype(
        topo,
        engine="qh3",
        veth=(QH3O_VETH_A, QH3O_VETH_B),
        overlay=(QH3O_OVERLAY_A, QH3O_OVERLAY_B),
        tun=f"cyx{topo.tag}",
        extra=["--offload"],
        label="qh3-offload",
    )


def overlay_qh3_offload_full_path(topo: Topology) -> tuple[str, int, int]:
    """The same with TUN offloads, but inner checksums computed (not left partial)."""
    try:
        import qh3  # noqa: F401
    except ImportError as exc:
        raise PathUnavailable("qh3 not installed (the shared library's qh3 extra)") from exc
    return _prototype(
        topo,
        engine="qh3",
        veth=(QH3F_VETH_A, QH3F_VETH_B),
        overlay=(QH3F_OVERLAY_A, QH3F_OVERLAY_B),
        tun=f"cyf{topo.tag}",
        extra=["--offload", "--no-partial-checksums"],
        label="qh3-offload-full",
    )


def _prototype(
    topo: Topology,
    *,
    engine: str,
    veth: tuple[str, str],
    overlay: tuple[str, str],
    tun: str,
    extra: list[str] | None = None,
    label: str | None = None,
) -> tuple[str, int, int]:
    """Two ``bench/overlay_node.py`` processes: the overlay's data path without AS/NMS.

    Real TUN devices, the agent's packet pump and TunnelCore, the project's mutual-TLS QUIC
    endpoint on UDP 443; the route is configured by hand instead of by the NMS.
    """
    node = Path(__file__).with_name("overlay_node.py")
    (veth_a, veth_b), (overlay_a, overlay_b) = veth, overlay
    plan = (
        (topo.ns_b, "b.cyphonic.internal", overlay_b, overlay_a, veth_b, None, None),
        (
            topo.ns_a,
            "a.cyphonic.internal",
            overlay_a,
            overlay_b,
            veth_a,
            veth_b,
            "b.cyphonic.internal",
        ),
    )
    label = label or engine
    for ns, fqdn, addr, peer_addr, listen, connect, peer_fqdn in plan:
        state = make_node_state(topo, f"{label}-{fqdn}", fqdn=fqdn)
        ready = topo.tmp / f"{label}-{fqdn}.ready"
        cmd = [
            sys.executable,
            str(node),
            "--state",
            str(state),
            "--fqdn",
            fqdn,
            "--tun-name",
            tun,
            "--tun-address",
            f"{addr}/24",
            "--peer-address",
            peer_addr,
            "--listen",
            listen,
            "--mtu",
            str(OVERLAY_MTU),
            "--ready-file",
            str(ready),
            "--engine",
            engine,
        ]
        if connect:
            cmd += ["--connect", connect, "--peer-fqdn", str(peer_fqdn)]
        cmd += extra or []
        cmd += OVERLAY_NODE_ARGS
        if PROFILE_DIR is not None:
            cmd += ["--profile", str(PROFILE_DIR / f"{label}-{fqdn}.prof")]
        proc = topo.start(*cmd, ns=ns)
        try:
            wait_until(
                lambda r=ready, p=proc: r.exists() or p.poll() is not None,  # type: ignore[misc]
                timeout=20,
                what=f"overlay node {fqdn}",
            )
        finally:
            if proc.poll() is not None:
                log = topo.logs[proc.pid].read_text()[-3000:]
                raise PathUnavailable(f"overlay node {fqdn} exited:\n{log}")
    return overlay_b, OVERLAY_MTU, OVERLAY_OVERHEAD_V4


def overlay_path(topo: Topology) -> tuple[str, int, int]:
    """The CYPHONIC overlay with the agent: AS and NMS in B, two ``cyphonic-agent up``.

    See bench/agent_overlay.py: enrolment over the AS's REST API, the route set up by a
    lookup of B's name at A's DNS stub, the agents' own tunnel (UDP 4443) measured.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    from agent_overlay import agent_overlay

    workdir = topo.tmp / "agent-overlay"
    workdir.mkdir(mode=0o700)
    dst = agent_overlay(
        ns_a=topo.ns_a,
        ns_b=topo.ns_b,
        address_b=VETH_B,
        workdir=workdir,
        start=topo.start,
        logs=topo.logs,
        tun_name=f"cya{topo.tag}",
    )
    return dst, OVERLAY_MTU, OVERLAY_OVERHEAD_V4


PATHS: list[tuple[str, Callable[[Topology], tuple[str, int, int]]]] = [
    ("raw veth", raw_veth_path),
    ("wireguard-go", wireguard_go_path),
    ("overlay prototype", overlay_prototype_path),
    ("overlay prototype qh3", overlay_qh3_path),
    ("overlay prototype qh3 offload", overlay_qh3_offload_path),
    ("overlay prototype qh3 offload, full checksums", overlay_qh3_offload_full_path),
    ("CYPHONIC overlay", overlay_path),
]


def paths() -> list[tuple[str, Callable[[Topology], tuple[str, int, int]]]]:
    """``PATHS`` with the wireguard-go row replaced by one row per ``--wireguard-go`` build."""
    out: list[tuple[str, Callable[[Topology], tuple[str, int, int]]]] = []
    for name, setup in PATHS:
        if name != "wireguard-go" or not WIREGUARD_GO:
            out.append((name, setup))
            continue
        for i, binary in enumerate(WIREGUARD_GO):
            label = f"wireguard-go {wireguard_go_version(binary)}"
            WG_INDEX[label] = i

            def build(topo: Topology, binary: str = binary, i: int = i) -> tuple[str, int, int]:
                return wireguard_go_path(topo, binary=binary, index=i)

            out.append((label, build))
    return out


# --- report --------------------------------------------------------------------------------


OVERLAY_PATHS = (
    "overlay prototype",
    "overlay prototype qh3",
    "overlay prototype qh3 offload",
    "overlay prototype qh3 offload, full checksums",
    "CYPHONIC overlay",
)


def is_wireguard(name: str) -> bool:
    return name.startswith("wireguard-go")


def yardstick(run: Run) -> PathResult | None:
    """The fastest wireguard-go row of the run (TCP), the one targets are judged against."""
    rows = [p for p in run.paths if is_wireguard(p.name) and p.gbit_s is not None]
    return max(rows, key=lambda p: p.gbit_s or 0.0) if rows else None


def check_targets(run: Run) -> None:
    """Judge every measured overlay path against the fastest wireguard-go of the same run."""
    by_name = {p.name: p for p in run.paths}
    wg = yardstick(run)
    for name in OVERLAY_PATHS:
        overlay = by_name.get(name)
        if overlay is None:
            continue
        if wg is None or wg.gbit_s is None or overlay.gbit_s is None:
            run.checks[f"{name}: throughput >= {TARGET_THROUGHPUT_RATIO}x wg"] = "not measured"
            run.checks[f"{name}: RTT <= wg + {TARGET_RTT_EXTRA_MS} ms"] = "not measured"
            continue
        ratio = overlay.gbit_s / wg.gbit_s
        verdict = "PASS" if ratio >= TARGET_THROUGHPUT_RATIO else "FAIL"
        run.checks[f"{name}: throughput >= {TARGET_THROUGHPUT_RATIO}x {wg.name}"] = (
            f"{verdict} ({ratio:.2f}x)"
        )
        if overlay.rtt_avg_ms is not None and wg.rtt_avg_ms is not None:
            extra = overlay.rtt_avg_ms - wg.rtt_avg_ms
            verdict = "PASS" if extra <= TARGET_RTT_EXTRA_MS else "FAIL"
            rounds = ""
            if len(overlay.rtt_avg_samples) > 1 and len(wg.rtt_avg_samples) == len(
                overlay.rtt_avg_samples
            ):  # the spread: each round's difference (the paths take turns in a round)
                rounds = "; rounds " + " ".join(
                    f"{o - w:+.3f}"
                    for o, w in zip(overlay.rtt_avg_samples, wg.rtt_avg_samples, strict=True)
                )
            run.checks[f"{name}: RTT <= {wg.name} + {TARGET_RTT_EXTRA_MS} ms"] = (
                f"{verdict} ({extra:+.3f} ms{rounds})"
            )


def format_table(run: Run) -> str:
    by_name = {p.name: p for p in run.paths}
    raw = by_name.get("raw veth")
    wgs = [p for p in run.paths if is_wireguard(p.name)]
    wg = yardstick(run)

    def ratio(p: PathResult, base: PathResult | None) -> str:
        if p.gbit_s is None or base is None or not base.gbit_s:
            return "-"
        return f"{p.gbit_s / base.gbit_s:.2f}x"

    def rtt_delta(p: PathResult) -> str:
        if p.rtt_avg_ms is None or wg is None or wg.rtt_avg_ms is None:
            return "-"
        return f"{p.rtt_avg_ms - wg.rtt_avg_ms:+.3f}"

    def udp(p: PathResult) -> str:
        if p.udp_gbit_s is None:
            return "-"
        loss = f" ({p.udp_loss_pct:.0f}%)" if p.udp_loss_pct is not None else ""
        return f"{p.udp_gbit_s:.3f}{loss}"

    header = (
        "path",
        "MTU",
        "overhead B/pkt",
        "TCP Gbit/s",
        "retr",
        "B rcvbuf drops",
        "CPU s/GB",
        "UDP Gbit/s (loss)",
        "RTT avg ms",
        "RTT mdev",
        "vs raw",
        *(f"vs wg#{i + 1}" for i in range(len(wgs))),
        "RTT vs wg ms",
    )
    rows = [header]
    for p in run.paths:
        rows.append(
            (
                p.name,
                str(p.mtu) if p.mtu else "-",
                str(p.overhead) if p.overhead is not None else "-",
                f"{p.gbit_s:.3f}" if p.gbit_s is not None else "-",
                str(p.retransmits) if p.retransmits is not None else "-",
                str(p.rcvbuf_drops) if p.rcvbuf_drops is not None else "-",
                f"{p.cpu_s_per_gb:.1f}" if p.cpu_s_per_gb is not None else "-",
                udp(p),
                f"{p.rtt_avg_ms:.3f}" if p.rtt_avg_ms is not None else "-",
                f"{p.rtt_mdev_ms:.3f}" if p.rtt_mdev_ms is not None else "-",
                ratio(p, raw),
                *(ratio(p, w) for w in wgs),
                rtt_delta(p),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        f"data path, {run.started}, {run.cpus} CPUs, load before {run.loadavg_before}, "
        f"iperf3 TCP {run.duration_s:g} s, {run.pings} pings, {run.rounds} round(s) "
        "(medians)",
        "",
    ]
    for row in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    lines.append("")
    lines += [f"  wg#{i + 1}: {w.name}" for i, w in enumerate(wgs)]
    if wg is not None:
        lines.append(f"  RTT vs wg and targets: against {wg.name} (the fastest wireguard-go here)")
    lines.append(
        "  CPU s/GB: user+system CPU of the path's own processes during the TCP run, both "
        "sides (not iperf3, not softirq)"
    )
    lines.append(
        "  B rcvbuf drops: UDP datagrams B's kernel dropped for a full receive buffer during "
        "the TCP runs (the tunnel's own UDP socket; summed over rounds)"
    )
    split = [p for p in run.paths if p.hop_samples]
    if split:
        lines += [
            "",
            f"where an echo's time goes, median us per hop ({HOP_PINGS_INTERVAL} s "
            "apart; the veth wire, ~1 us, left out):",
            "",
        ]
        hop_rows: list[list[str]] = [["path", "echoes", *HOPS, "sum"]]
        for p in split:
            medians = [statistics.median(p.hop_samples[h]) for h in HOPS]
            hop_rows.append(
                [
                    p.name,
                    str(len(p.hop_samples[HOPS[0]])),
                    *(f"{m:.0f}" for m in medians),
                    f"{sum(medians):.0f}",
                ]
            )
        hop_widths = [max(len(r[i]) for r in hop_rows) for i in range(len(hop_rows[0]))]
        for hop_row in hop_rows:
            lines.append(
                "  ".join(
                    c.rjust(w) if i else c.ljust(w)
                    for i, (c, w) in enumerate(zip(hop_row, hop_widths, strict=True))
                )
            )
    notes = [f"  {p.name}: {p.note.strip()}" for p in run.paths if p.note.strip()]
    if notes:
        lines += ["", "notes:", *notes]
    lines += ["", "targets (overlay vs wireguard-go, same run):"]
    lines += [f"  {k}: {v}" for k, v in run.checks.items()]
    return "\n".join(lines)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP end the run through the same cleanup as Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="iperf3 seconds per path")
    parser.add_argument("--pings", type=int, default=200, help="echo requests per path")
    parser.add_argument(
        "--only",
        action="append",
        choices=[n for n, _ in PATHS],
        help="measure only these paths (repeatable)",
    )
    parser.add_argument(
        "--wireguard-go",
        action="append",
        metavar="PATH",
        help="wireguard-go binary to measure (repeatable: one row per build; default: the "
        "one on PATH)",
    )
    parser.add_argument("--no-udp", action="store_true", help="skip the iperf3 UDP runs")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds; each path is measured once per round, medians shown",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--overlay-arg",
        action="append",
        metavar="ARG",
        help="pass ARG to bench/overlay_node.py (repeatable), e.g. --overlay-arg=--ack-immediately",
    )
    parser.add_argument(
        "--hops",
        action="store_true",
        help="also split each echo's time per hop (tcpdump on the tunnel "
        "devices and the veth ends)",
    )
    parser.add_argument(
        "--profile", type=Path, help="directory for cProfile statistics of the overlay nodes"
    )
    parser.add_argument("--keep-logs", type=Path, help="copy the processes' logs here at the end")
    args = parser.parse_args(argv)
    global PROFILE_DIR, KEEP_LOGS
    KEEP_LOGS = args.keep_logs
    global MEASURE_UDP
    MEASURE_UDP = not args.no_udp
    WIREGUARD_GO.extend(str(Path(b).resolve()) if "/" in b else b for b in args.wireguard_go or [])
    OVERLAY_NODE_ARGS.extend(args.overlay_arg or [])
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        PROFILE_DIR = args.profile.resolve()
    if os.geteuid() != 0:
        print("bench/datapath.py: needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    for tool in ("ip", "iperf3", "ping", "ss"):
        if shutil.which(tool) is None:
            print(f"bench/datapath.py: {tool} is not installed", file=sys.stderr)
            return 2
    run = Run(
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
        duration_s=args.duration,
        pings=args.pings,
        loadavg_before=tuple(round(x, 2) for x in os.getloadavg()),  # type: ignore[arg-type]
        cpus=os.cpu_count() or 0,
    )
    topo = Topology()
    with signals_raise():
        try:
            topo.create()
            ready: list[tuple[PathResult, str]] = []
            for name, setup in paths():
                family = "wireguard-go" if is_wireguard(name) else name
                if args.only and family not in args.only:
                    continue
                result = PathResult(name=name)
                run.paths.append(result)
                first = len(topo.processes)
                try:
                    dst, result.mtu, result.overhead = setup(topo)
                    result.pids = [p.pid for p in topo.processes[first:]]
                    ready.append((result, dst))
                except PathUnavailable as exc:
                    result.note = f"not measured: {exc}"
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    result.note = f"failed: {exc}"
            # Paths take turns round by round, so a burst of load elsewhere on the machine
            # hits them all alike.
            for round_no in range(args.repeat):
                for result, dst in ready:
                    sample = PathResult(name=result.name)
                    try:
                        measure(
                            topo,
                            sample,
                            dst=dst,
                            duration=args.duration,
                            pings=args.pings,
                            pids=result.pids,
                            mtu=result.mtu or 1500,
                        )
                        if args.hops:
                            split_hops(topo, sample, dst=dst, pings=args.pings)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        sample.note = f"round {round_no + 1} failed: {exc} "
                    result.add(sample)
                    print(f"round {round_no + 1}: measured {result.name}", file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted; cleaning up", file=sys.stderr)
            return 130
        finally:
            topo.close()
    run.rounds = args.repeat
    check_targets(run)
    print(json.dumps(asdict(run), indent=2) if args.json else format_table(run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
