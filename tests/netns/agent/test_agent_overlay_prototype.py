"""The agent's data path between two namespaces, with real processes and nothing mocked.

Each namespace runs bench/overlay_node.py: a TUN device, the packet pump, TunnelCore and
the mutual-TLS QUIC endpoint on UDP 443, with node certificates from a fresh PKI. Not
covered here (no AS/NMS yet): enrolment, registration, DNS-triggered route set-up.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cyphonic import pki

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[3]
NODE = ROOT / "bench" / "overlay_node.py"
OVERLAY_A, OVERLAY_B = "100.64.0.1", "100.64.0.2"
MARKER = b"CYPHONIC-PLAINTEXT-MARKER-7f3a9c"

SERVER = r"""
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000)); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while chunk := c.recv(65536):
    h.update(chunk); n += len(chunk)
    if n >= int(sys.argv[2]): break
c.sendall(h.hexdigest().encode()); c.close()
"""

CLIENT = r"""
import socket, sys
data = sys.stdin.buffer.read()
c = socket.create_connection((sys.argv[1], 9000), timeout=30)
c.sendall(data); print(c.recv(100).decode())
"""


def node_state(base: Path, material: pki.PkiMaterial, fqdn: str) -> Path:
    now = datetime.datetime.now(datetime.UTC)
    state = base / fqdn
    state.mkdir(mode=0o700)
    key = pki.generate_key()
    cert = pki.sign_node_csr(material.node_ca, pki.make_csr(key, fqdn), fqdn=fqdn, now=now)
    pki.write_private_key(state / "node.key", key)
    pki.write_certificates(state / "node.crt", [cert, material.node_ca.cert])
    pki.write_certificates(state / "root-ca.crt", [material.root_cert])
    return state


def start_node(
    veth_pair: Any,
    tmp: Path,
    *,
    side: str,
    state: Path,
    fqdn: str,
    peer_fqdn: str | None,
    engine: str = "aioquic",
    status_socket: Path | None = None,
) -> tuple[subprocess.Popen[bytes], Path]:
    a = side == "a"
    ready = tmp / f"{fqdn}.ready"
    log = (tmp / f"{fqdn}.log").open("wb")
    cmd = [
        sys.executable,
        str(NODE),
        "--state",
        str(state),
        "--fqdn",
        fqdn,
        "--tun-name",
        "cyphonic0",
        "--tun-address",
        f"{OVERLAY_A if a else OVERLAY_B}/24",
        "--peer-address",
        OVERLAY_B if a else OVERLAY_A,
        "--listen",
        veth_pair.A_ADDR if a else veth_pair.B_ADDR,
        "--ready-file",
        str(ready),
        "--engine",
        engine,
    ]
    if peer_fqdn:
        cmd += ["--connect", veth_pair.B_ADDR, "--peer-fqdn", peer_fqdn]
    if status_socket:
        cmd += ["--status-socket", str(status_socket)]
    proc = veth_pair.popen(
        veth_pair.ns_a if a else veth_pair.ns_b, *cmd, stdout=log, stderr=subprocess.STDOUT
    )
    return proc, ready


def wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ready.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"node exited {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"node not ready:\n{log.read_text()}")


@pytest.fixture
def pki_material(tmp_path: Path) -> pki.PkiMaterial:
    return pki.init_pki(tmp_path / "pki", now=datetime.datetime.now(datetime.UTC), services=())


@pytest.mark.parametrize("engine", ["aioquic", "qh3"])
def test_ping_and_tcp_through_the_tunnel_only_udp_443_on_the_wire(
    veth_pair: Any, tmp_path: Path, pki_material: pki.PkiMaterial, engine: str
) -> None:
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        pytest.skip("tcpdump not installed")
    os.chmod(tmp_path, 0o755)
    pcap = tmp_path / "veth-a.pcap"
    capture = veth_pair.popen(
        veth_pair.ns_a,
        tcpdump,
        "-i",
        veth_pair.dev_a,
        "-U",
        "-n",
        "-w",
        str(pcap),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state_a = node_state(tmp_path, pki_material, "a.cyphonic.internal")
    state_b = node_state(tmp_path, pki_material, "b.cyphonic.internal")
    b, ready_b = start_node(
        veth_pair,
        tmp_path,
        side="b",
        state=state_b,
        fqdn="b.cyphonic.internal",
        peer_fqdn=None,
        engine=engine,
    )
    wait_ready(b, ready_b, tmp_path / "b.cyphonic.internal.log")
    status_socket = tmp_path / "run" / "status.sock"
    a, ready_a = start_node(
        veth_pair,
        tmp_path,
        side="a",
        state=state_a,
        fqdn="a.cyphonic.internal",
        peer_fqdn="b.cyphonic.internal",
        engine=engine,
        status_socket=status_socket,
    )
    wait_ready(a, ready_a, tmp_path / "a.cyphonic.internal.log")

    ping = veth_pair.run(veth_pair.ns_a, "ping", "-c", "5", "-i", "0.2", "-W", "3", OVERLAY_B)
    assert " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr

    payload = (MARKER + os.urandom(1000)) * 2000  # ~2 MB, the marker all through it
    server = veth_pair.popen(
        veth_pair.ns_b,
        sys.executable,
        "-c",
        SERVER,
        OVERLAY_B,
        str(len(payload)),
        stdout=subprocess.PIPE,
    )
    assert server.stdout is not None and server.stdout.readline() == b"listening\n"
    client = subprocess.run(
        ["ip", "netns", "exec", veth_pair.ns_a, sys.executable, "-c", CLIENT, OVERLAY_B],
        input=payload,
        capture_output=True,
        timeout=90,
    )
    assert client.returncode == 0, client.stderr
    assert client.stdout.decode().strip() == hashlib.sha256(payload).hexdigest()

    # What the transfer did shows in `cyphonic-agent status` of node A.
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "cyphonic_agent.cli",
            "status",
            "--json",
            "--socket",
            str(status_socket),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr
    snapshot = json.loads(status.stdout)
    assert snapshot["fqdn"] == "a.cyphonic.internal" and snapshot["tun"] == "cyphonic0"
    (peer,) = snapshot["peers"]
    assert (peer["fqdn"], peer["state"], peer["pattern"]) == ("b.cyphonic.internal", "up", "direct")
    assert peer["path"] == f"{veth_pair.B_ADDR}:443" and peer["virtual_ipv4"] == OVERLAY_B
    assert peer["tx_bytes"] > len(payload) and peer["tx_packets"] > len(payload) // 1420
    assert peer["rx_packets"] > 0 and peer["rtt_ms"] > 0 and peer["mtu"] == 1420
    table = subprocess.run(
        [sys.executable, "-m", "cyphonic_agent.cli", "status", "--socket", str(status_socket)],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "b.cyphonic.internal" in table and "direct" in table

    time.sleep(0.5)
    capture.terminate()
    capture.wait(timeout=10)
    wire = pcap.read_bytes()
    assert len(wire) > len(payload)  # the transfer is in the capture...
    assert MARKER not in wire  # ...but never in clear
    listing = subprocess.run(
        [tcpdump, "-nn", "-r", str(pcap), "not", "arp"], capture_output=True, text=True, timeout=60
    ).stdout.splitlines()
    assert listing
    not_quic = [line for line in listing if ".443:" not in line and ".443 >" not in line]
    assert not_quic == [], not_quic[:5]
    assert all(" UDP" in line for line in listing), listing[:5]


@pytest.mark.parametrize("engine", ["aioquic", "qh3"])
def test_wrong_peer_name_is_refused(
    veth_pair: Any, tmp_path: Path, pki_material: pki.PkiMaterial, engine: str
) -> None:
    os.chmod(tmp_path, 0o755)
    state_a = node_state(tmp_path, pki_material, "a.cyphonic.internal")
    state_b = node_state(tmp_path, pki_material, "b.cyphonic.internal")
    b, ready_b = start_node(
        veth_pair,
        tmp_path,
        side="b",
        state=state_b,
        fqdn="b.cyphonic.internal",
        peer_fqdn=None,
        engine=engine,
    )
    wait_ready(b, ready_b, tmp_path / "b.cyphonic.internal.log")
    # A expects c.cyphonic.internal; B presents b's certificate: A must refuse B.
    a, _ = start_node(
        veth_pair,
        tmp_path,
        side="a",
        state=state_a,
        fqdn="a.cyphonic.internal",
        peer_fqdn="c.cyphonic.internal",
        engine=engine,
    )
    assert a.wait(timeout=30) == 1
    log = (tmp_path / "a.cyphonic.internal.log").read_text()
    assert "permission_denied" in log, log
    ping = veth_pair.run(veth_pair.ns_b, "ping", "-c", "1", "-W", "1", OVERLAY_A)
    assert ping.returncode != 0
