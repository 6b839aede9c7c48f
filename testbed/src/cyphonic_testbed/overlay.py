"""The whole overlay in a test bed: AS and NMS processes in cloud hosts, enrolled agents.

    with build(pattern2()) as bed:
        services = start_services(bed, workdir=tmp)          # cyphonic-as, cyphonic-nms
        states = services.enrol_all([bed.host("alice"), bed.host("bob")])
        alice = services.start_agent(bed.host("alice"), states["alice"])
        bob = services.start_agent(bed.host("bob"), states["bob"])
        alice.wait_up(); bob.wait_up()
        address = alice.resolve("bob.cyphonic.internal")[0]  # through alice's DNS stub
        bed.host("alice").ping(address)

Everything is a real process started as a user would start it: ``cyphonic-as serve`` and
``cyphonic-nms serve`` on UDP 443 in their namespaces (registry: one SQLite file shared by
both, the embedded default, or a PostgreSQL URL), nodes created and given a token over the
AS's admin REST API, ``cyphonic-agent enroll`` over its enrolment API on
TCP 80 (an enterprise firewall lets it out) and ``cyphonic-agent up`` on UDP 443. Processes
are started with ``Node.popen``, so they die with the bed. Logs stay in ``workdir``.

``python -m cyphonic_testbed.overlay first-reply --name bob.cyphonic.internal`` (run inside
a node's namespace) measures the time from the DNS stub's answer to the first echo reply
over the fresh route. Standard library only, like the rest of the test bed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cyphonic_testbed.errors import TestbedError, TestbedTimeout
from cyphonic_testbed.wait import wait_for

if TYPE_CHECKING:
    from cyphonic_testbed.bed import NetBed, Node

BIN = Path(sys.executable).parent
DOMAIN = "cyphonic.internal"
QUIC_PORT = 443
AS_HTTP_PORT = 80
"""The AS's enrolment REST API: TCP 80 passes the enterprise firewall (so does 443)."""
NMS_HTTP_PORT = 8082
"""The NMS's admin REST API, on the loopback of its namespace."""
ADMIN_TOKEN = "overlay-testbed-admin-token-0123456789"
RELAY_SECRET = "overlay-testbed-relay-secret-0123456789"
START_TIMEOUT = 90.0
AGENT_UP_TIMEOUT = 60.0


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(path: Path, n: int = 4000) -> str:
    return _read(path)[-n:]


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wait_log(
    path: Path,
    needle: str,
    proc: subprocess.Popen[Any],
    *,
    timeout: float,
    what: str,
    count: int = 1,
    offset: int = 0,
) -> None:
    """Wait until ``needle`` was logged ``count`` times after byte ``offset`` of ``path``."""

    def text() -> str:
        return _read(path)[offset:]

    def seen() -> bool:
        if text().count(needle) >= count:
            return True
        if proc.poll() is not None:
            raise TestbedError(f"{what} exited {proc.returncode}:\n{text()[-4000:]}")
        return False

    try:
        wait_for(seen, timeout, interval=0.1, message=what)
    except TestbedTimeout as exc:
        raise TestbedTimeout(
            f"{what}: {needle!r} not logged within {timeout:g}s:\n{text()[-4000:]}"
        ) from exc


# --------------------------------------------------------------------------- agents


@dataclass
class AgentProcess:
    """One ``cyphonic-agent up`` in a node's namespace."""

    name: str
    node: Node
    proc: subprocess.Popen[Any]
    log: Path
    state_dir: Path
    status_socket: Path
    dns: tuple[str, int] = ("127.0.0.1", 53)
    domain: str = DOMAIN
    log_offset: int = 0
    """Where this process's output starts in ``log`` (a restarted agent appends to it)."""

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.domain}"

    def log_text(self) -> str:
        """Everything this agent process logged so far (stdout and stderr)."""
        return _read(self.log)[self.log_offset :]

    def wait_up(self, timeout: float = AGENT_UP_TIMEOUT) -> None:
        """Wait until registered with its TUN device and DNS stub up."""
        self.wait_logged("overlay_up", timeout)

    def wait_logged(self, needle: str, timeout: float = 30.0, *, count: int = 1) -> None:
        """Wait until ``needle`` appears (``count`` times) in this process's log."""
        _wait_log(
            self.log,
            needle,
            self.proc,
            timeout=timeout,
            what=f"agent {self.name}",
            count=count,
            offset=self.log_offset,
        )

    def wait_exit(self, timeout: float) -> int:
        """Wait for the agent to exit by itself; its status."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise TestbedTimeout(
                f"agent {self.name} still running after {timeout:g}s:\n{_tail(self.log)}"
            ) from exc

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait; the exit status (the agent removes its TUN device first)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def status(self) -> dict[str, Any]:
        """``cyphonic-agent status --json`` as a dict."""
        proc = subprocess.run(
            [str(BIN / "cyphonic-agent"), "status", "--json", "--socket", str(self.status_socket)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise TestbedError(f"cyphonic-agent status failed: {proc.stderr}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def status_table(self) -> str:
        """``cyphonic-agent status`` as people see it."""
        return subprocess.run(
            [str(BIN / "cyphonic-agent"), "status", "--socket", str(self.status_socket)],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout

    def dig(
        self,
        fqdn: str,
        rdtype: str = "A",
        *,
        timeout: float = 10.0,
    ) -> subprocess.CompletedProcess[str]:
        """``dig`` against the agent's DNS stub, inside its namespace."""
        host, port = self.dns
        return self.node.run(
            ["dig", f"@{host}", "-p", str(port), "+time=5", "+tries=1", fqdn, rdtype],
            timeout=timeout,
        )

    def resolve(self, fqdn: str, rdtype: str = "A") -> list[str]:
        """Addresses the DNS stub answers for ``fqdn`` (empty for NXDOMAIN/NODATA)."""
        host, port = self.dns
        out = self.node.run(
            ["dig", "+short", f"@{host}", "-p", str(port), "+time=5", "+tries=1", fqdn, rdtype],
            timeout=15,
            check=True,
        ).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]


# --------------------------------------------------------------------------- services


@dataclass
class OverlayServices:
    """The AS and NMS of a bed, and what agents need to join."""

    bed: NetBed
    workdir: Path
    pki: Path
    database_url: str
    domain: str
    as_node: Node
    nms_node: Node
    processes: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    agents: list[AgentProcess] = field(default_factory=list)
    commands: dict[str, list[str]] = field(default_factory=dict)
    """How each service was started (``restart`` runs it again)."""

    def _start(self, name: str, node: Node, argv: list[str]) -> None:
        self.commands[name] = argv
        with self.log(name).open("ab") as out:
            self.processes[name] = node.popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=_service_env(self.domain)
            )

    def stop_service(self, name: str, timeout: float = 20.0) -> int:
        """SIGTERM ``as`` or ``nms`` and wait; its exit status."""
        proc = self.processes[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)

    def restart_service(self, name: str, timeout: float = START_TIMEOUT) -> None:
        """Start a stopped ``as`` or ``nms`` again, the same way; returns once it serves."""
        needle = {"as": "as_serving", "nms": "nms_started"}[name]
        before = _read(self.log(name)).count(needle)
        node = self.as_node if name == "as" else self.nms_node
        self._start(name, node, self.commands[name])
        _wait_log(
            self.log(name),
            needle,
            self.processes[name],
            timeout=timeout,
            what=f"{name} restart",
            count=before + 1,
        )

    def nms_get(self, path: str) -> Any:
        """GET a path of the NMS's admin REST API (from inside its namespace); the JSON."""
        url = f"http://127.0.0.1:{NMS_HTTP_PORT}{path}"
        proc = self.nms_node.run([sys.executable, "-c", _REST_GET, url, ADMIN_TOKEN], timeout=60)
        if proc.returncode != 0:
            raise TestbedError(f"GET {path} at the NMS failed: {proc.stderr}")
        return json.loads(proc.stdout)

    def log(self, service: str) -> Path:
        """Log file of ``as`` or ``nms``."""
        return self.workdir / f"{service}.log"

    def wait_probed(self, fqdns: Sequence[str], timeout: float = 30.0) -> None:
        """Wait until the NMS's reachability probes decided each node (``reach_probed``,
        within ~1 s of registering): whether a firewalled node connects out. Routes asked
        for before that are decided without it (docs/nms.md, "Reachability probes")."""
        log = self.log("nms")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            probed = [ln for ln in lines if '"reach_probed"' in ln]
            if all(any(fqdn in ln for ln in probed) for fqdn in fqdns):
                return
            time.sleep(0.2)
        raise TestbedTimeout(f"the NMS did not probe {', '.join(fqdns)} within {timeout:.0f} s")

    def issue_tokens(self, names: Sequence[str]) -> dict[str, str]:
        """Create the nodes at the AS and issue one enrolment token each, over the admin
        REST API (one small process in the AS's namespace; the CLI's imports cost seconds
        each on a busy machine)."""
        proc = self.as_node.run(
            [
                sys.executable,
                "-c",
                ISSUE_TOKENS_SCRIPT,
                f"http://127.0.0.1:{AS_HTTP_PORT}",
                ADMIN_TOKEN,
                *names,
            ],
            timeout=60,
        )
        if proc.returncode != 0:
            raise TestbedError(
                f"creating nodes {list(names)} at the AS failed: {proc.stderr}{proc.stdout}"
            )
        tokens: dict[str, str] = json.loads(proc.stdout)
        return tokens

    def root_fingerprint(self) -> str:
        """SHA-256 of the root CA certificate (DER), as ``enroll --root-ca-sha256`` takes."""
        import hashlib
        import ssl

        pem = (self.pki / "root-ca.crt").read_text()
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()

    def as_url(self, node: Node) -> str:
        """The AS's REST URL in a family ``node`` has."""
        host = self.as_node.address("cloud", 4 if node.has_family(4) else 6)
        return f"http://{_hostport(host, AS_HTTP_PORT)}"

    def enrol(self, node: Node, name: str | None = None, *, token: str | None = None) -> Path:
        """Create node ``name`` (default: the bed host's name) at the AS with a token (unless
        given) and run ``cyphonic-agent enroll`` inside ``node``; the state directory."""
        name = name or node.name
        token = token or self.issue_tokens([name])[name]
        base = self.workdir / "agents" / name
        base.mkdir(parents=True, exist_ok=True)
        token_file = base / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        state = base / "state"
        proc = node.run(
            [
                str(BIN / "cyphonic-agent"),
                "enroll",
                "--as",
                self.as_url(node),
                "--token-file",
                str(token_file),
                "--state-dir",
                str(state),
                "--root-ca-sha256",
                self.root_fingerprint(),
                "--timeout",
                "20",
            ],
            timeout=60,
        )
        if proc.returncode != 0:
            raise TestbedError(
                f"enroll of {name} failed ({proc.returncode}): {proc.stderr}{proc.stdout}"
            )
        return state

    def enrol_all(self, nodes: Sequence[Node]) -> dict[str, Path]:
        """``enrol`` each node (named after its host); state directories by name."""
        tokens = self.issue_tokens([n.name for n in nodes])
        return {n.name: self.enrol(n, token=tokens[n.name]) for n in nodes}

    def start_agent(
        self,
        node: Node,
        state_dir: Path,
        *args: str,
        name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> AgentProcess:
        """``cyphonic-agent up`` inside ``node`` (UDP 443, DNS stub 127.0.0.1:53)."""
        name = name or node.name
        base = state_dir.parent
        log = base / "agent.log"
        status_socket = base / "run" / "status.sock"
        argv = [
            str(BIN / "cyphonic-agent"),
            "up",
            "--state-dir",
            str(state_dir),
            "--status-socket",
            str(status_socket),
            "--quic-port",
            str(QUIC_PORT),
            "--dns-listen",
            "127.0.0.1:53",
            "--log-format",
            "json",
            *args,
        ]
        offset = len(_read(log))
        with log.open("ab") as out:
            proc = node.popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        agent = AgentProcess(
            name=name,
            node=node,
            proc=proc,
            log=log,
            state_dir=state_dir,
            status_socket=status_socket,
            domain=self.domain,
            log_offset=offset,
        )
        self.agents.append(agent)
        return agent

    def stop(self) -> dict[str, int]:
        """SIGTERM every agent and service; their exit statuses by name."""
        codes: dict[str, int] = {}
        for agent in self.agents:
            with contextlib.suppress(TestbedTimeout):
                codes[f"agent {agent.name}"] = agent.stop()
        for name, proc in self.processes.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                codes[name] = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait(timeout=10)
        return codes


#: ``python -c ISSUE_TOKENS_SCRIPT <AS REST URL> <admin token> <name>...``: creates the
#: nodes at the AS and prints {name: enrolment token} as JSON (standard library only).
ISSUE_TOKENS_SCRIPT = r"""
import json, sys, urllib.request
base, admin, names = sys.argv[1], sys.argv[2], sys.argv[3:]
def post(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": "Bearer " + admin,
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)
tokens = {}
for name in names:
    post("/v1/nodes", {"name": name})
    tokens[name] = post(f"/v1/nodes/{name}/enrolment-tokens", {"ttl_seconds": 3600})["token"]
print(json.dumps(tokens))
"""


def _service_env(domain: str) -> dict[str, str]:
    return {
        **os.environ,
        "CYPHONIC_ENVIRONMENT": "test",
        "CYPHONIC_DOMAIN": domain,
        "CYPHONIC_LOG_FORMAT": "json",
        "CYPHONIC_RELAY_TOKEN_SECRET": RELAY_SECRET,
    }


def start_services(
    bed: NetBed,
    *,
    workdir: Path,
    domain: str = DOMAIN,
    database_url: str | None = None,
    as_host: str = "as",
    nms_host: str = "nms",
    nms_args: Sequence[str] = (),
    timeout: float = START_TIMEOUT,
) -> OverlayServices:
    """Make a PKI, then run ``cyphonic-as serve`` and ``cyphonic-nms serve`` (UDP 443) in
    the bed's cloud hosts; returns once both serve. Registry: ``database_url`` or a SQLite
    file in ``workdir`` (shared by both processes, as on one host)."""
    workdir.mkdir(parents=True, exist_ok=True)
    pki = workdir / "pki"
    database_url = database_url or f"sqlite+aiosqlite:///{workdir / 'registry.db'}"
    env = _service_env(domain)
    init = subprocess.run(
        [str(BIN / "cyphonic-as"), "init-pki", "--pki-dir", str(pki), "--domain", domain],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    if init.returncode != 0:
        raise TestbedError(f"cyphonic-as init-pki failed: {init.stderr}")
    token_file = workdir / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    token_file.chmod(0o600)
    as_node, nms_node = bed.host(as_host), bed.host(nms_host)
    services = OverlayServices(
        bed=bed,
        workdir=workdir,
        pki=pki,
        database_url=database_url,
        domain=domain,
        as_node=as_node,
        nms_node=nms_node,
    )

    def endpoints(node: Node) -> list[str]:
        found = []
        if node.has_family(4):
            found.append(_hostport(node.address("cloud", 4), QUIC_PORT))
        if node.has_family(6):
            found.append(_hostport(node.address("cloud", 6), QUIC_PORT))
        return found

    as_argv = [
        str(BIN / "cyphonic-as"),
        "serve",
        "--migrate",
        "--pki-dir",
        str(pki),
        "--database-url",
        database_url,
        "--http-host",
        "::",
        "--http-port",
        str(AS_HTTP_PORT),
        "--quic-host",
        "::",
        "--quic-port",
        str(QUIC_PORT),
        "--admin-token-file",
        str(token_file),
    ]
    for ep in endpoints(nms_node):
        as_argv += ["--nms-endpoint", ep]
    for ep in endpoints(as_node):
        as_argv += ["--as-endpoint", ep]
    services._start("as", as_node, as_argv)
    # The NMS shares the registry the AS has just migrated: start it as soon as that is
    # done (both processes import for seconds on a busy machine).
    _wait_log(
        services.log("as"),
        "database_migrated",
        services.processes["as"],
        timeout=timeout,
        what="cyphonic-as",
    )
    nms_argv = [
        str(BIN / "cyphonic-nms"),
        "serve",
        "--pki-dir",
        str(pki),
        "--database-url",
        database_url,
        "--quic-host",
        "::",
        "--quic-port",
        str(QUIC_PORT),
        "--http-host",
        "127.0.0.1",
        "--http-port",
        str(NMS_HTTP_PORT),
        "--admin-token-file",
        str(token_file),
        "--replica-id",
        "nms-testbed",
        *nms_args,
    ]
    services._start("nms", nms_node, nms_argv)
    _wait_log(
        services.log("as"),
        "as_serving",
        services.processes["as"],
        timeout=timeout,
        what="cyphonic-as",
    )
    _wait_log(
        services.log("nms"),
        "nms_started",
        services.processes["nms"],
        timeout=timeout,
        what="cyphonic-nms",
    )
    return services


# --------------------------------------------------------------------------- the relay

TRS_HTTP_PORT = 8083

_REST_GET = r"""
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + sys.argv[2]})
with urllib.request.urlopen(req, timeout=20) as resp:
    print(resp.read().decode())
"""


@dataclass
class TrsProcess:
    """``cyphonic-trs serve`` in a cloud host (UDP 443, admin REST on its loopback)."""

    node: Node
    proc: subprocess.Popen[Any]
    log: Path
    endpoints: list[str]

    def get(self, path: str) -> Any:
        """GET an admin REST path (from inside the TRS's namespace); the JSON answer."""
        url = f"http://127.0.0.1:{TRS_HTTP_PORT}{path}"
        proc = self.node.run([sys.executable, "-c", _REST_GET, url, ADMIN_TOKEN], timeout=60)
        if proc.returncode != 0:
            raise TestbedError(f"GET {path} at the TRS failed: {proc.stderr}")
        return json.loads(proc.stdout)

    def log_events(self) -> list[dict[str, Any]]:
        """The TRS's JSON log lines (other lines skipped)."""
        events = []
        for line in _read(self.log).splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        return events

    def stop(self) -> int:
        """SIGTERM and wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=20)


def trs_endpoints(node: Node) -> list[str]:
    """The QUIC endpoints (IPv4 and IPv6 on the cloud) a TRS in ``node`` announces."""
    return [
        _hostport(node.address("cloud", family), QUIC_PORT)
        for family in (4, 6)
        if node.has_family(family)
    ]


def start_trs(
    services: OverlayServices,
    *,
    host: str = "trs",
    redis_url: str | None = None,
    replica: int = 0,
    timeout: float = START_TIMEOUT,
) -> TrsProcess:
    """Run ``cyphonic-trs serve`` in ``host`` with the overlay's PKI; returns once it serves.

    With ``redis_url`` the CID table is shared there and the TRS registers its cloud
    addresses for the NMS; without, the table is in process (the embedded default) and the
    NMS must be told the TRS with ``CYPHONIC_TRS_ENDPOINTS``."""
    node = services.bed.host(host)
    endpoints = trs_endpoints(node)
    log = services.workdir / f"trs-{host}.log"
    argv = [
        str(BIN / "cyphonic-trs"),
        "serve",
        "--pki-dir",
        str(services.pki),
        "--replica-id",
        str(replica),
        "--quic-host",
        "::",
        "--quic-port",
        str(QUIC_PORT),
        "--http-host",
        "127.0.0.1",
        "--http-port",
        str(TRS_HTTP_PORT),
        "--domain",
        services.domain,
        "--log-format",
        "json",
    ]
    if redis_url is not None:
        argv += ["--redis-url", redis_url]
    for endpoint in endpoints:
        argv += ["--public-endpoint", endpoint]
    env = {**_service_env(services.domain), "CYPHONIC_ADMIN_TOKEN": ADMIN_TOKEN}
    with log.open("ab") as out:
        proc = node.popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    services.processes[f"trs {host}"] = proc  # stopped with the other services
    _wait_log(log, "trs_serving", proc, timeout=timeout, what="cyphonic-trs")
    return TrsProcess(node=node, proc=proc, log=log, endpoints=endpoints)


# --------------------------------------------------------------------------- the probe


def _dns_query(name: str, rdtype: int) -> tuple[int, bytes]:
    qid = random.randrange(1 << 16)
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD, one question
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    return qid, header + qname + struct.pack("!HH", rdtype, 1)


def _skip_name(data: bytes, offset: int) -> int:
    while True:
        length = data[offset]
        if length & 0xC0 == 0xC0:
            return offset + 2
        offset += 1 + length
        if length == 0:
            return offset


def _dns_answers(data: bytes, qid: int, rdtype: int) -> list[str]:
    rid, flags, qd, an = struct.unpack_from("!HHHH", data)
    if rid != qid or not flags & 0x8000:
        raise TestbedError("not the answer to our query")
    if flags & 0xF:
        raise TestbedError(f"DNS rcode {flags & 0xF}")
    offset = 12
    for _ in range(qd):
        offset = _skip_name(data, offset) + 4
    found: list[str] = []
    for _ in range(an):
        offset = _skip_name(data, offset)
        rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", data, offset)
        offset += 10
        rdata = data[offset : offset + rdlen]
        offset += rdlen
        if rtype == rdtype:
            family = socket.AF_INET if rtype == 1 else socket.AF_INET6
            found.append(socket.inet_ntop(family, rdata))
    return found


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def first_reply(
    *,
    name: str,
    dns: tuple[str, int],
    family: int = 4,
    interval: float = 0.002,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Resolve ``name`` at the DNS stub, then ping the answer every ``interval`` until the
    first echo reply: how long after the DNS answer the fresh route carried one (root)."""
    rdtype = 1 if family == 4 else 28
    qid, query = _dns_query(name, rdtype)
    with socket.socket(
        socket.AF_INET6 if ":" in dns[0] else socket.AF_INET, socket.SOCK_DGRAM
    ) as resolver:
        resolver.settimeout(timeout)
        asked = time.monotonic()
        resolver.sendto(query, dns)
        data, _ = resolver.recvfrom(4096)
        answered = time.monotonic()
    addresses = _dns_answers(data, qid, rdtype)
    if not addresses:
        raise TestbedError(f"{name}: no address in the DNS answer")
    target = addresses[0]
    if family == 4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        echo_type, reply_type = 8, 0
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        echo_type, reply_type = 128, 129
    ident = os.getpid() & 0xFFFF
    sent = 0
    with sock:
        sock.setblocking(False)
        deadline = answered + timeout
        next_send = answered
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise TestbedError(
                    f"no echo reply from {target} within {timeout:g}s ({sent} requests)"
                )
            if now >= next_send:
                sent += 1
                body = struct.pack("!HH", ident, sent) + b"cyphonic-first-reply"
                head = struct.pack("!BBH", echo_type, 0, 0)
                csum = _checksum(head + body) if family == 4 else 0  # the kernel does ICMPv6
                packet = struct.pack("!BBH", echo_type, 0, csum) + body
                with contextlib.suppress(BlockingIOError):
                    sock.sendto(packet, (target, 0))
                next_send = now + interval
            try:
                data, _ = sock.recvfrom(2048)
            except BlockingIOError:
                time.sleep(min(interval, 0.0005))
                continue
            replied = time.monotonic()
            icmp = data[(data[0] & 0xF) * 4 :] if family == 4 else data
            if (
                len(icmp) >= 8
                and icmp[0] == reply_type
                and struct.unpack_from("!H", icmp, 4)[0] == ident
            ):
                seq = struct.unpack_from("!H", icmp, 6)[0]
                return {
                    "name": name,
                    "address": target,
                    "dns_ms": (answered - asked) * 1000,
                    "first_reply_ms": (replied - answered) * 1000,
                    "requests_sent": sent,
                    "answered_seq": seq,
                }


def first_reply_in(
    node: Node, name: str, *, family: int = 4, timeout: float = 20.0
) -> dict[str, Any]:
    """``first_reply`` run inside ``node`` against its DNS stub (``python -m
    cyphonic_testbed.overlay first-reply``): the fresh route's first reply, its address."""
    proc = node.run(
        [
            sys.executable,
            "-m",
            "cyphonic_testbed.overlay",
            "first-reply",
            "--name",
            name,
            "--family",
            str(family),
            "--timeout",
            f"{timeout:g}",
        ],
        timeout=timeout + 40,
    )
    if proc.returncode != 0:
        raise TestbedError(f"no first reply from {name} in {node.name}: {proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cyphonic_testbed.overlay first-reply --name N [--dns 127.0.0.1:53]``."""
    parser = argparse.ArgumentParser(prog="python -m cyphonic_testbed.overlay")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("first-reply", help="time from the DNS answer to the first echo reply")
    p.add_argument("--name", required=True)
    p.add_argument("--dns", default="127.0.0.1:53")
    p.add_argument("--family", type=int, choices=(4, 6), default=4)
    p.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    host, _, port = args.dns.rpartition(":")
    result = first_reply(
        name=args.name, dns=(host.strip("[]"), int(port)), family=args.family, timeout=args.timeout
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
