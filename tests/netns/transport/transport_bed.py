"""The TCP 443 transport beds: a node on a network where UDP does not get out.

    cloud  as .10, nms .11, trs .12, redis .13 (192.0.2.0/24, 2001:db8:100::/64)
    lana   alice 192.168.1.10, proxy 192.168.1.11 --- gwa[NAT + firewall: TCP 80/443 out
           only, no UDP at all] --- core --- lanb: bob 203.0.113.10 (global IPv4, UDP fine)

``proxy`` runs Debian's tinyproxy allowing only CONNECT to port 443. ``proxy_only`` adds a
firewall inside alice's namespace so that she reaches nothing but the proxy (and her own
TUN device): the corporate network where the proxy is the only way out.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from cyphonic_testbed import Node
from cyphonic_testbed.patterns import udp_blocked

__all__ = ["SERVICES", "Tinyproxy", "connect_via", "let_udp_out", "proxy_only", "udp_blocked"]

SERVICES = ("as", "nms", "trs", "redis")
PROXY_PORT = 8888
PROXY_ONLY_TABLE = "cytb_proxyonly"


def let_udp_out(gwa: Node) -> None:
    """gwa's firewall lets UDP 443 out again (the hotel fixed its Wi-Fi)."""
    proc = gwa.run(
        ["nft", "insert", "rule", "inet", "cytb_fw", "forward", "udp", "dport", "443", "accept"],
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr


class Tinyproxy:
    """Debian's tinyproxy in ``node``: CONNECT to port 443 only, from ``allow`` only."""

    def __init__(self, node: Node, workdir: Path, *, allow: str) -> None:
        exe = shutil.which("tinyproxy")
        if exe is None:
            raise AssertionError("tinyproxy is missing: run scripts/setup.sh (apt tinyproxy)")
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)
        self.log = workdir / "tinyproxy.log"
        self.log.touch()
        self.log.chmod(0o666)
        self.address = node.address("lana", 4)
        conf = workdir / "tinyproxy.conf"
        conf.write_text(
            f"Port {PROXY_PORT}\n"
            f"Listen {self.address}\n"
            "User nobody\nGroup nogroup\n"
            "Timeout 600\nMaxClients 50\n"
            f"Allow {allow}\n"
            "ConnectPort 443\n"
            "DisableViaHeader Yes\n"
            "LogLevel Connect\n"
        )
        with self.log.open("ab") as out:  # in the foreground (-d) it logs to stderr
            self.proc = node.popen([exe, "-d", "-c", str(conf)], stdout=out, stderr=out)
        deadline = time.monotonic() + 20
        while node.run(["ss", "-Hltn", f"sport = :{PROXY_PORT}"], timeout=10).stdout.strip() == "":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"tinyproxy did not start: {self.log.read_text()}")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{PROXY_PORT}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def proxy_only(node: Node, proxy: str, *, tun: str = "cyphonic0") -> None:
    """``node`` sends nothing but to ``proxy``:PROXY_PORT, its loopback and its TUN device."""
    ruleset = (
        f"table inet {PROXY_ONLY_TABLE} {{\n"
        "  chain output {\n"
        "    type filter hook output priority filter; policy drop;\n"
        '    oifname "lo" accept\n'
        f'    oifname "{tun}" accept\n'
        "    ct state established,related accept\n"
        f"    ip daddr {proxy} tcp dport {PROXY_PORT} accept\n"
        "    counter drop\n"
        "  }\n"
        "}\n"
    )
    proc = node.run(["nft", "-f", "-"], input=ruleset, timeout=30)
    assert proc.returncode == 0, proc.stderr


def connect_via(node: Node, proxy: str, target: str) -> str:
    """The status line tinyproxy answers to ``CONNECT target`` from ``node``."""
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(('{proxy}',{PROXY_PORT}),timeout=10)\n"
        f"s.sendall(b'CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n')\n"
        "print(s.recv(200).split(b'\\r\\n')[0].decode())\n"
    )
    import sys

    proc = node.run([sys.executable, "-c", code], timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()
