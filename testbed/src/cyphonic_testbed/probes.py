"""Tiny traffic probes run inside namespaces: ping, UDP/TCP listeners and senders.

The listeners are small Python programs started with ``Node.popen`` (so they die with the
bed); each writes one JSON line per datagram or connection to a log file that
``received()`` reads back. Senders are one-shot ``Node.run`` calls that print JSON.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cyphonic_testbed.errors import TestbedError
from cyphonic_testbed.host import Host
from cyphonic_testbed.wait import wait_for

#: Seconds a listener gets to bind and report ready.
LISTEN_TIMEOUT = 5.0

_counter = itertools.count()

_LISTENER = r"""
import json, socket, sys
cfg = json.loads(sys.argv[1])
proto, bind, port, echo = cfg["protocol"], cfg["bind"], cfg["port"], cfg["echo"]
family = socket.AF_INET6 if ":" in bind else socket.AF_INET
kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
s = socket.socket(family, kind)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((bind, port))
if proto == "tcp":
    s.listen(16)

def host(addr):
    return addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]

def peer(h, p):
    if family == socket.AF_INET6 and ":" not in h:
        h = "::ffff:" + h
    return (h, p)

for h, p in cfg["hello"]:  # open NAT mappings / pinholes from the listening socket itself
    s.sendto(bytes.fromhex(cfg["hello_payload"]), peer(h, p))
print(json.dumps({"ready": True}), flush=True)

while True:
    if proto == "udp":
        data, addr = s.recvfrom(65535)
        print(json.dumps({"src": host(addr), "sport": addr[1], "payload": data.hex()}), flush=True)
        if echo:
            s.sendto(data, addr)
    else:
        conn, addr = s.accept()
        conn.settimeout(2.0)
        try:
            data = conn.recv(65535)
        except OSError:
            data = b""
        print(json.dumps({"src": host(addr), "sport": addr[1], "payload": data.hex()}), flush=True)
        if echo and data:
            conn.sendall(data)
        conn.close()
"""

_UDP_SENDER = r"""
import json, select, socket, sys, time
cfg = json.loads(sys.argv[1])
targets = [(h, int(p)) for h, p in cfg["targets"]]
payload = bytes.fromhex(cfg["payload"])
v6 = [":" in h for h, _ in targets]
if all(v6):
    family, bind = socket.AF_INET6, "::"
elif not any(v6):
    family, bind = socket.AF_INET, "0.0.0.0"
else:
    family, bind = socket.AF_INET6, "::"
    targets = [(h if ":" in h else "::ffff:" + h, p) for h, p in targets]
s = socket.socket(family, socket.SOCK_DGRAM)
if family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((bind, cfg["sport"] or 0))
errors, replies = [], []
sent = 0
for target in targets:
    try:
        s.sendto(payload, target)
        sent += 1
    except OSError as exc:
        errors.append(f"{target[0]} {target[1]}: {exc.strerror or exc}")
deadline = time.monotonic() + cfg["wait"]
while sent and len(replies) < sent:
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([s], [], [], left)[0]:
        break
    try:
        data, addr = s.recvfrom(65535)
    except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
        errors.append(str(exc.strerror or exc))
        continue
    src = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    replies.append({"src": src, "sport": addr[1], "payload": data.hex()})
print(json.dumps({"local_port": s.getsockname()[1], "errors": errors, "replies": replies}))
"""

_TCP_CONNECT = r"""
import json, socket, sys
host, port, timeout, payload = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
try:
    with socket.create_connection((host, port), timeout=timeout) as c:
        c.sendall(bytes.fromhex(payload))
        c.settimeout(timeout)
        try:
            reply = c.recv(65535)
        except OSError:
            reply = b""
    print(json.dumps({"connected": True, "reply": reply.hex()}))
except OSError as exc:
    print(json.dumps({"connected": False, "error": str(exc.strerror or exc)}))
"""


@dataclass(frozen=True)
class Datagram:
    """A datagram (or TCP connection) seen by a probe: who sent it and what."""

    src: str
    sport: int
    payload: bytes


@dataclass(frozen=True)
class UdpExchange:
    """What ``udp_send`` saw: its local port, replies, and send/receive errors."""

    local_port: int
    replies: list[Datagram] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _datagram(obj: dict[str, Any]) -> Datagram:
    return Datagram(src=obj["src"], sport=int(obj["sport"]), payload=bytes.fromhex(obj["payload"]))


class Listener:
    """A UDP or TCP listener running inside a namespace (see ``start_udp_echo``)."""

    def __init__(
        self, *, node: Host, protocol: str, port: int, log: Path, proc: subprocess.Popen[Any]
    ) -> None:
        self.node = node
        self.protocol = protocol
        self.port = port
        self.log = log
        self.process = proc

    def __repr__(self) -> str:
        return f"<Listener {self.protocol}/{self.port} on {self.node.name}>"

    def _lines(self) -> list[dict[str, Any]]:
        try:
            text = self.log.read_text()
        except OSError:
            return []
        # The last line may be half written.
        out = []
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def received(self) -> list[Datagram]:
        """Everything received so far, in order."""
        return [_datagram(obj) for obj in self._lines() if "src" in obj]

    def wait_received(self, count: int = 1, timeout: float = 3.0) -> list[Datagram]:
        """Wait until at least ``count`` datagrams/connections arrived; return them all."""
        return wait_for(
            lambda: got if len(got := self.received()) >= count else [],
            timeout,
            message=f"{count} {self.protocol} arrivals on {self.node.name}:{self.port}",
        )

    def stop(self) -> None:
        """Stop the listener now (it is stopped at teardown anyway)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=2.0)


UdpEcho = Listener


def _start_listener(
    node: Host,
    *,
    protocol: str,
    port: int,
    echo: bool,
    bind: str,
    hello: Sequence[tuple[str, int]] = (),
    hello_payload: bytes = b"cytb-hello",
) -> Listener:
    log = node.bed.workdir / f"{protocol}-{next(_counter)}-{node.name}-{port}.jsonl"
    cfg = {
        "protocol": protocol,
        "bind": bind,
        "port": port,
        "echo": echo,
        "hello": [[h, p] for h, p in hello],
        "hello_payload": hello_payload.hex(),
    }
    with log.open("w") as out:
        proc = node.popen(
            [sys.executable, "-c", _LISTENER, json.dumps(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    listener = Listener(node=node, protocol=protocol, port=port, log=log, proc=proc)

    def ready() -> bool:
        if proc.poll() is not None:
            raise TestbedError(
                f"{protocol} listener on {node.name}:{port} exited: {log.read_text()[-1000:]}"
            )
        return any(obj.get("ready") for obj in listener._lines())

    wait_for(ready, LISTEN_TIMEOUT, message=f"{protocol} listener on {node.name}:{port}")
    return listener


def start_udp_echo(
    node: Host,
    port: int,
    *,
    echo: bool = True,
    bind: str = "::",
    hello: Sequence[tuple[str, int]] = (),
    hello_payload: bytes = b"cytb-hello",
) -> Listener:
    """Listen on UDP ``port`` (dual-stack on ``::`` by default), logging every datagram and
    sending it back when ``echo``. Returns once the socket is bound.

    ``hello``: (address, port) targets sent ``hello_payload`` from the listening socket right
    after binding, which opens a NAT mapping/firewall pinhole for that socket (hole punching).
    """
    return _start_listener(
        node,
        protocol="udp",
        port=port,
        echo=echo,
        bind=bind,
        hello=hello,
        hello_payload=hello_payload,
    )


def start_tcp_listener(node: Host, port: int, *, echo: bool = True, bind: str = "::") -> Listener:
    """Accept TCP connections on ``port``; log each, echo the first read when ``echo``."""
    return _start_listener(node, protocol="tcp", port=port, echo=echo, bind=bind)


def udp_send(
    node: Host,
    targets: Sequence[tuple[str, int]],
    payload: bytes = b"cytb-probe",
    *,
    sport: int | None = None,
    wait: float = 1.0,
) -> UdpExchange:
    """From ``node``, send ``payload`` to every (address, port) in ``targets`` from ONE socket
    (bound to ``sport`` if given), then collect replies for up to ``wait`` seconds."""
    for host, _ in targets:
        ipaddress.ip_address(host)  # addresses only: no DNS inside the bed
    cfg = {
        "targets": [[h, p] for h, p in targets],
        "payload": payload.hex(),
        "sport": sport,
        "wait": wait,
    }
    proc = node.run(
        [sys.executable, "-c", _UDP_SENDER, json.dumps(cfg)], timeout=wait + 10.0, check=True
    )
    result = json.loads(proc.stdout)
    return UdpExchange(
        local_port=int(result["local_port"]),
        replies=[_datagram(r) for r in result["replies"]],
        errors=list(result["errors"]),
    )


def tcp_connect(
    node: Host, host: str, port: int, payload: bytes = b"cytb-probe", *, timeout: float = 2.0
) -> bytes | None:
    """Connect from ``node`` to ``host``:``port`` and send ``payload``; return the reply bytes
    (possibly empty), or None when the connection failed within ``timeout``."""
    proc = node.run(
        [sys.executable, "-c", _TCP_CONNECT, host, str(port), str(timeout), payload.hex()],
        timeout=2 * timeout + 10.0,
        check=True,
    )
    result = json.loads(proc.stdout)
    if not result["connected"]:
        return None
    return bytes.fromhex(result["reply"])


def ping(node: Host, destination: str, *, count: int = 1, timeout: float = 2.0) -> bool:
    """True when ``destination`` answered at least one of ``count`` ICMP echo requests."""
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", f"{timeout:g}", destination]
    proc = node.run(argv, timeout=count * (timeout + 0.2) + 10.0)
    return proc.returncode == 0


@dataclass(frozen=True)
class PingStats:
    """What ``ping -q`` summed up: RTT min/avg/max in ms and the loss in percent."""

    min_ms: float
    avg_ms: float
    max_ms: float
    loss_pct: float


def ping_stats(
    node: Host, destination: str, *, count: int, interval: float = 0.01, wait_s: float = 2.0
) -> PingStats:
    """``count`` echo requests ``interval`` s apart from ``node``; raises when none answered."""
    out = node.run(
        [
            "ping",
            "-n",
            "-q",
            "-c",
            str(count),
            "-i",
            f"{interval:g}",
            "-W",
            f"{wait_s:g}",
            destination,
        ],
        timeout=count * (interval + 0.05) + 30,
    ).stdout
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    loss = re.search(r"([\d.]+)% packet loss", out)
    if not rtt:
        raise TestbedError(f"no echo reply from {destination} in {node.name}: {out}")
    low, avg, high = (float(x) for x in rtt.groups()[:3])
    return PingStats(low, avg, high, float(loss.group(1)) if loss else 0.0)


def iperf_tcp(
    client: Host, server: Host, address: str, *, seconds: float, port: int = 5201
) -> tuple[float, int | None]:
    """iperf3 TCP from ``client`` to ``server`` listening on ``address``: (Gbit/s received,
    sender retransmits)."""
    daemon = server.popen(
        ["iperf3", "-s", "-1", "-B", address, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: f":{port}" in server.run(["ss", "-Hltn"]).stdout,
            timeout=10,
            message=f"iperf3 did not listen in {server.name}",
        )
        out = client.run(
            ["iperf3", "-c", address, "-p", str(port), "-t", f"{seconds:g}", "-O", "1", "-J"],
            timeout=seconds + 60,
        )
        if out.returncode != 0:
            raise TestbedError(f"iperf3 failed: {out.stdout[-2000:]}{out.stderr}")
        end = json.loads(out.stdout)["end"]
        return end["sum_received"]["bits_per_second"] / 1e9, end["sum_sent"].get("retransmits")
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.wait(timeout=15)


# Receives until the announced length, answers with its SHA-256 (hex).
_TCP_SINK = r"""
import hashlib, socket, sys
host, size = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(sys.argv[3]))); s.listen(1); print("listening", flush=True)
s.settimeout(120); c, _ = s.accept(); c.settimeout(60)
h = hashlib.sha256(); n = 0
while n < size:
    chunk = c.recv(65536)
    if not chunk:
        break
    h.update(chunk); n += len(chunk)
c.sendall(h.hexdigest().encode()); c.close()
"""

# Connects (a name goes through the system resolver), sends stdin, prints the answer.
_TCP_SOURCE = r"""
import socket, sys
data = sys.stdin.buffer.read()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
c.sendall(data); print(c.recv(100).decode())
"""


def tcp_transfer(
    src: Host, dst: Host, *, listen: str, connect: str, payload: bytes, port: int = 9000
) -> str:
    """Send ``payload`` over one TCP connection from ``src`` to ``connect`` (a name or an
    address) served in ``dst`` on ``listen``; the SHA-256 (hex) the receiver computed."""
    server = dst.popen(
        [sys.executable, "-c", _TCP_SINK, listen, str(len(payload)), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    if line != b"listening\n":
        err = server.stderr.read() if server.stderr else b""
        raise TestbedError(f"TCP sink in {dst.name} did not listen: {line!r} {err!r}")
    client = src.run(
        [sys.executable, "-c", _TCP_SOURCE, connect, str(port)],
        input=payload,
        text=False,
        timeout=150,
    )
    if client.returncode != 0:
        raise TestbedError(
            f"TCP transfer from {src.name} failed: {client.stderr.decode(errors='replace')}"
        )
    server.wait(timeout=30)
    return str(client.stdout.decode().strip())


def marked_payload(marker: bytes, size: int) -> bytes:
    """``size`` random bytes with ``marker`` all through them (to look for in captures)."""
    chunk = marker + os.urandom(1000)
    return (chunk * (size // len(chunk) + 1))[:size]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
