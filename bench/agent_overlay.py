"""The overlay proper for the data-path benchmark: real AS, NMS and two ``cyphonic-agent up``.

Used by ``bench/datapath.py`` ("CYPHONIC overlay" path) on its two namespaces joined by a
veth: the AS and the NMS run in B's namespace on B's veth address (QUIC on UDP 4431 and
4432, so they do not take the agents' port), both nodes are enrolled over the AS's REST
API and joined with ``cyphonic-agent up`` (UDP 4443; the prototype paths of the same run
hold 443 on their own addresses). A's agent resolves B's name through its DNS stub, which
sets the route up; what the benchmark measures then is the agent's own tunnel.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cyphonic_testbed.overlay import ADMIN_TOKEN, ISSUE_TOKENS_SCRIPT, RELAY_SECRET

BIN = Path(sys.executable).parent
AS_QUIC_PORT = 4431
NMS_QUIC_PORT = 4432
AS_HTTP_PORT = 8081
AGENT_PORT = 4443
IPV4_POOL = "100.96.0.0/16"
"""Apart from the prototypes' 100.64.0.0/24, which may be up in the same run."""
DOMAIN = "cyphonic.internal"

Start = Callable[..., subprocess.Popen[bytes]]
"""``start(*argv, ns=..., env=...)``: a background process in a namespace (logged)."""


def _run(ns: str, *argv: str, timeout: float = 60, input_text: str | None = None) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} in {ns} failed: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


def _wait_logged(
    log: Path, needle: str, proc: subprocess.Popen[bytes], *, what: str, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if needle in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}: {text[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"{what}: {needle!r} not logged within {timeout:g}s")


def agent_overlay(
    *,
    ns_a: str,
    ns_b: str,
    address_b: str,
    workdir: Path,
    start: Start,
    logs: dict[int, Path],
    tun_name: str,
) -> str:
    """Bring the overlay up between ``ns_a`` and ``ns_b``; B's virtual IPv4 as A resolves it.

    ``start`` and ``logs`` are the benchmark topology's process starter and its log files by
    pid (everything started is stopped with the topology).
    """
    env = {
        "CYPHONIC_ENVIRONMENT": "test",
        "CYPHONIC_LOG_FORMAT": "json",
        "CYPHONIC_RELAY_TOKEN_SECRET": RELAY_SECRET,
        "CYPHONIC_DOMAIN": DOMAIN,
    }
    pki = workdir / "pki"
    subprocess.run(
        [str(BIN / "cyphonic-as"), "init-pki", "--pki-dir", str(pki)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    token_file = workdir / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    token_file.chmod(0o600)
    db = f"sqlite+aiosqlite:///{workdir / 'registry.db'}"
    as_ = start(
        str(BIN / "cyphonic-as"),
        "serve",
        "--migrate",
        "--pki-dir",
        str(pki),
        "--database-url",
        db,
        "--http-host",
        address_b,
        "--http-port",
        str(AS_HTTP_PORT),
        "--quic-host",
        address_b,
        "--quic-port",
        str(AS_QUIC_PORT),
        "--admin-token-file",
        str(token_file),
        "--nms-endpoint",
        f"{address_b}:{NMS_QUIC_PORT}",
        "--as-endpoint",
        f"{address_b}:{AS_QUIC_PORT}",
        ns=ns_b,
        env=env,
    )
    _wait_logged(logs[as_.pid], "database_migrated", as_, what="cyphonic-as")
    nms = start(
        str(BIN / "cyphonic-nms"),
        "serve",
        "--pki-dir",
        str(pki),
        "--database-url",
        db,
        "--quic-host",
        address_b,
        "--quic-port",
        str(NMS_QUIC_PORT),
        "--http-host",
        "127.0.0.1",
        "--admin-token-file",
        str(token_file),
        "--ipv4-pool",
        IPV4_POOL,
        ns=ns_b,
        env=env,
    )
    _wait_logged(logs[as_.pid], "as_serving", as_, what="cyphonic-as")
    _wait_logged(logs[nms.pid], "nms_started", nms, what="cyphonic-nms")

    names = {"a": ns_a, "b": ns_b}
    tokens = json.loads(
        _run(
            ns_b,
            sys.executable,
            "-c",
            ISSUE_TOKENS_SCRIPT,
            f"http://{address_b}:{AS_HTTP_PORT}",
            ADMIN_TOKEN,
            *names,
        )
    )
    fingerprint = _run(
        ns_b,
        sys.executable,
        "-c",
        "import hashlib,ssl,sys; print(hashlib.sha256(ssl.PEM_cert_to_DER_cert("
        "open(sys.argv[1]).read())).hexdigest())",
        str(pki / "root-ca.crt"),
    )
    agents = {}
    for name, ns in names.items():
        base = workdir / f"agent-{name}"
        base.mkdir(mode=0o700)
        (base / "token").write_text(tokens[name] + "\n")
        state = base / "state"
        _run(
            ns,
            str(BIN / "cyphonic-agent"),
            "enroll",
            "--as",
            f"http://{address_b}:{AS_HTTP_PORT}",
            "--token-file",
            str(base / "token"),
            "--state-dir",
            str(state),
            "--root-ca-sha256",
            fingerprint.strip(),
        )
        agents[name] = start(
            str(BIN / "cyphonic-agent"),
            "up",
            "--state-dir",
            str(state),
            "--quic-port",
            str(AGENT_PORT),
            "--tun-name",
            tun_name,
            "--dns-listen",
            "127.0.0.1:53",
            "--status-socket",
            str(base / "run" / "status.sock"),
            "--log-format",
            "json",
            ns=ns,
        )
    for name, proc in agents.items():
        _wait_logged(logs[proc.pid], "overlay_up", proc, what=f"agent {name}")
    answer = _run(
        ns_a, "dig", "+short", "@127.0.0.1", "+time=5", "+tries=1", f"b.{DOMAIN}", "A"
    ).split()
    if not answer:
        raise RuntimeError(f"A's DNS stub did not resolve b.{DOMAIN}")
    _wait_logged(
        logs[agents["a"].pid], '"event": "tunnel_up"', agents["a"], what="agent a", timeout=30
    )
    return answer[0]
