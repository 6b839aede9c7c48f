"""An HTTPS proxy in a namespace: Debian's tinyproxy allowing only CONNECT to port 443, and
a firewall making it a host's only way out (the corporate network where the proxy is the
only exit). Used by the TCP 443 transport tests and the reachability matrix.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from cyphonic_testbed.bed import Node

__all__ = ["PROXY_ONLY_TABLE", "PROXY_PORT", "Tinyproxy", "connect_via", "proxy_only"]

PROXY_PORT = 8888
PROXY_ONLY_TABLE = "cytb_proxyonly"


class Tinyproxy:
    """Debian's tinyproxy in ``node`` on its ``network`` address: CONNECT to port 443 only,
    from ``allow`` only."""

    def __init__(self, node: Node, workdir: Path, *, allow: str, network: str = "lana") -> None:
        exe = shutil.which("tinyproxy")
        if exe is None:
            raise AssertionError("tinyproxy is missing: run scripts/setup.sh (apt tinyproxy)")
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)
        self.log = workdir / "tinyproxy.log"
        self.log.touch()
        self.log.chmod(0o666)
        self.address = node.address(network, 4)
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
                self.stop()
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
    proc = node.run([sys.executable, "-c", code], timeout=30)
    assert proc.returncode == 0, proc.stderr
    return str(proc.stdout).strip()
