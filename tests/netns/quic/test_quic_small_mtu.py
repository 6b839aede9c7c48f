"""UDP GSO over a small-MTU link, in namespaces: the refusal pauses GSO to that destination
only, and GSO comes back once the path takes it again.

alice sits on two links: ``wide`` (MTU 1500) to bob and ``thin`` (MTU 1280, an access link
of the smallest IPv6 size) to carol. Her endpoint sends full-size (1,452-byte) QUIC packets:
a GSO send of those segments towards carol exceeds the device MTU (the kernel refuses it
with EINVAL), so they go out one by one (IPv4 fragments them) while sends to bob stay GSO.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cyphonic import pki
from cyphonic.hostport import format_host_port
from cyphonic_testbed import Host, NetBed, Network, Router, Topology

pytestmark = pytest.mark.timeout(120)

PEER = Path(__file__).with_name("mtu_peer.py")
DOMAIN = "cyphonic.internal"
PORT = 4433


def _topology() -> Topology:
    return Topology(
        name="smallmtu",
        networks=[Network("wide", ipv4="10.93.1.0/24"), Network("thin", ipv4="10.93.2.0/24")],
        routers=[Router("r", networks=["wide", "thin"])],
        hosts=[
            Host("alice", networks=["wide", "thin"]),
            Host("bob", networks=["wide"]),
            Host("carol", networks=["thin"]),
        ],
    )


def _pki(directory: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    material = pki.init_pki(directory, domain=DOMAIN, now=now)
    for name in ("alice", "bob", "carol"):
        key = pki.generate_key()
        fqdn = f"{name}.{DOMAIN}"
        cert = pki.sign_node_csr(material.node_ca, pki.make_csr(key, fqdn), fqdn=fqdn, now=now)
        pki.write_identity(
            directory / f"{name}.crt",
            directory / f"{name}.key",
            key=key,
            certs=[cert, material.node_ca.cert],
        )


def _line(proc: subprocess.Popen[str], what: str, first: str) -> str:
    """The next output line starting with ``first`` (the endpoint's logs go there too)."""
    assert proc.stdout is not None
    for _ in range(1000):
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(first):
            return line
    raise AssertionError(f"{what}: no {first!r} line (exit code {proc.poll()})")


def _ready(proc: subprocess.Popen[str], what: str) -> None:
    _line(proc, what, "ready")


def _burst(proc: subprocess.Popen[str], peer: str, count: int) -> dict[str, Any]:
    assert proc.stdin is not None
    proc.stdin.write(f"burst {peer} {count}\n")
    proc.stdin.flush()
    result: dict[str, Any] = json.loads(_line(proc, "alice", "{"))
    return result


def _mtu(bed: NetBed, mtu: int) -> None:
    for name in ("alice", "carol"):
        node = bed.host(name)
        node.run(["ip", "link", "set", node.interface("thin"), "mtu", str(mtu)], check=True)


def test_gso_pauses_per_destination_and_recovers(netbed: Any, tmp_path: Path) -> None:
    _pki(tmp_path)
    bed: NetBed = netbed(_topology())
    _mtu(bed, 1280)
    servers = []
    for name in ("bob", "carol"):
        node = bed.host(name)
        proc = node.popen(
            [sys.executable, str(PEER), "serve", str(tmp_path), name, "0.0.0.0", str(PORT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        _ready(proc, name)
        servers.append(proc)
    bob = bed.host("bob").address("wide")
    carol = bed.host("carol").address("thin")
    alice = bed.host("alice").popen(
        [
            sys.executable,
            str(PEER),
            "client",
            str(tmp_path),
            "alice",
            f"bob={format_host_port(bob, PORT)}",
            f"carol={format_host_port(carol, PORT)}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    _ready(alice, "alice")

    # Towards carol the GSO send is refused: paused for that destination, datagrams still
    # go (one by one, fragmented by IPv4) and come back.
    first = _burst(alice, "carol", 40)
    assert first["payload"] > 1280
    assert first["received"] == 40
    assert first["gso_paused"] >= 1  # one, or more if the burst outlasted a pause
    assert first["gso"] is True  # not off for the whole endpoint

    # Towards bob GSO still works meanwhile.
    to_bob = _burst(alice, "bob", 40)
    assert to_bob["received"] == 40
    assert to_bob["gso_sends"] > first["gso_sends"]
    assert to_bob["gso_paused"] == first["gso_paused"]

    # The link is mended; once the pause is over, GSO towards carol is used again.
    _mtu(bed, 1500)
    time.sleep(2.5)  # past the pause (1 s, or 2 s after a second refusal)
    again = _burst(alice, "carol", 40)
    assert again["received"] == 40
    assert again["gso_paused"] == first["gso_paused"]  # no refusal any more
    assert again["gso_sends"] > to_bob["gso_sends"]

    assert alice.stdin is not None
    alice.stdin.write("quit\n")
    alice.stdin.flush()
    alice.wait(timeout=10)
