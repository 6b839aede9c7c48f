"""`helm install` played without a cluster: every workload process started exactly as the
chart renders it, in Helm's order, as a cluster would run it.

What stands for what:

- **Images**: one virtual environment per image, made as deploy/images/Dockerfile makes it
  (`uv sync --frozen --no-dev --no-editable --package cyphonic-<x>`, nothing else), with the
  image's ENTRYPOINT, CMD and ENV read from that Dockerfile. The interpreter is the system
  python3 (the one uid 10001 can run). Third-party images: Redis runs the host's
  redis-server with the rendered command; the in-chart PostgreSQL is this machine's server
  behind a TCP relay in the pod's namespace (a role and database of the run's own, named by
  the chart's postgresql.username/database values).
- **Pods**: a network namespace each (cyphonic_testbed), on one pod network with a router
  that plays the node: it DNATs every Service's ClusterIP and port to the pods it selects
  (kube-proxy), masquerades pod-to-Service-to-pod traffic (hairpin) and lets the agent nodes
  reach pods only through those Service ports. Agents of the DaemonSet (hostNetwork) run in
  node namespaces on their own network. Cluster DNS is the hosts file every container gets:
  each Service's name (short, with namespace, `.svc`, `.svc.cluster.local`) at its ClusterIP,
  and each StatefulSet pod's `<pod>.<headless governing Service>` names at the pod's address.
- **Containers**: `ip netns exec <pod> unshare --mount`, then volumes mounted at the rendered
  paths (Secrets and ConfigMaps written as files with their defaultMode and the pod's
  fsGroup, emptyDirs, hostPaths; /etc is an overlay holding the cluster's /etc/hosts), the
  rendered sysctls set in the pod's namespace, and the process started by `setpriv` as the
  rendered uid/gid with the rendered capabilities (no_new_privs), with exactly the rendered
  command, args and env (secretKeyRef, fieldRef and $(VAR) resolved as the kubelet does).
  Mount paths whose top directory does not exist on this host (a third-party image's /data)
  are remapped to a directory of the pod, and the remapping is recorded in ``remapped``.
- **Kubernetes API**: the PKI hook talks to a stand-in API server (HTTPS, a token per
  ServiceAccount, Secrets get/create, RBAC from the rendered Role and RoleBinding) at the
  `kubernetes` Service's address, as in-cluster clients do.
- **Helm's order**: pre-install hooks by weight (Jobs run to completion, Pods too), the
  release's objects, every readiness probe answering (the `--wait` rule) before any
  post-install hook, then `helm test`'s pods; an upgrade renders again with `is_upgrade`
  (the live Secrets' values kept, as the chart's `lookup` does), runs pre-upgrade hooks and
  rolls every workload.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import http.client
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .conftest import CHART_DIR, kubelet_env

REPO = CHART_DIR.parents[1]
DOCKERFILE = REPO / "deploy" / "images" / "Dockerfile"
PACKAGES = {
    "as": "cyphonic-auth",
    "nms": "cyphonic-nms",
    "trs": "cyphonic-trs",
    "agent": "cyphonic-agent",
}
MODULES = {
    "as": ["cyphonic", "cyphonic_auth"],
    "nms": ["cyphonic", "cyphonic_nms"],
    "trs": ["cyphonic", "cyphonic_trs"],
    "agent": ["cyphonic", "cyphonic_agent"],
}
# Modules the image does not import on its own, and why.
NOT_IMPORTED = {
    "cyphonic.registry.migrations.env": "Alembic's env script, run by alembic, not imported",
}
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLONE_NEWNET = 0x40000000


class PlayError(AssertionError):
    """The install failed the way a cluster would have failed it."""


# --------------------------------------------------------------------------- images


@dataclass
class Image:
    target: str
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]


def read_images(dockerfile: Path = DOCKERFILE) -> dict[str, Image]:
    """ENTRYPOINT, CMD and ENV of each final stage of the Dockerfile (runtime's ENV inherited)."""
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    text = dockerfile.read_text().replace("\\\n", " ")
    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
        if m:
            base, name = m.groups()
            parent = stages.get(base, {"env": {}, "entrypoint": [], "cmd": []})
            current = stages[name] = {
                "env": dict(parent["env"]),
                "entrypoint": list(parent["entrypoint"]),
                "cmd": list(parent["cmd"]),
            }
            continue
        if current is None:
            continue
        if line.startswith("ENV "):
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', line[4:]):
                current["env"][key] = value.strip('"')
        elif line.startswith("ENTRYPOINT "):
            current["entrypoint"] = json.loads(line[len("ENTRYPOINT ") :])
        elif line.startswith("CMD "):
            current["cmd"] = json.loads(line[len("CMD ") :])
    return {
        t: Image(t, stages[t]["entrypoint"], stages[t]["cmd"], stages[t]["env"]) for t in PACKAGES
    }


def _interpreter() -> str:
    """A python3 that uid 10001 can run (the project's .venv may live under /root)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if candidate and os.path.exists(candidate):
            real = Path(candidate).resolve()
            if all(os.stat(p).st_mode & 0o005 for p in [real, *real.parents]):
                return str(real)
    raise PlayError("no python3 that an unprivileged user can run (install python3)")


class Venvs:
    """One environment per image, made once per test session, world-readable."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cyphonic-install-play-", dir="/var/tmp"))
        self.root.chmod(0o755)
        self.python = _interpreter()
        self._made: dict[str, Path] = {}
        self._lock = threading.Lock()

    def get(self, target: str) -> Path:
        with self._lock:
            if target not in self._made:
                env_dir = self.root / target
                uv = (
                    os.environ.get("UV")
                    or shutil.which("uv")
                    or str(REPO / ".tools" / "bin" / "uv")
                )
                done = subprocess.run(
                    [uv, "sync", "--frozen", "--no-dev", "--no-editable", "--package",
                     PACKAGES[target], "--python", self.python, "--quiet"],
                    cwd=REPO,
                    env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(env_dir),
                         "UV_PYTHON_DOWNLOADS": "never", "UV_COMPILE_BYTECODE": "1"},
                    capture_output=True, text=True, timeout=600, check=False,
                )  # fmt: skip
                if done.returncode != 0:
                    raise PlayError(f"installing {PACKAGES[target]} alone failed:\n{done.stderr}")
                self._made[target] = env_dir
            return self._made[target]

    def import_everything(self, target: str) -> list[str]:
        """Import every module of the image's packages as uid 10001; the failures."""
        env_dir = self.get(target)
        code = (
            "import importlib, pkgutil, sys, json\n"
            f"skip = {sorted(NOT_IMPORTED)!r}\n"
            "bad = []\n"
            f"for top in {MODULES[target]!r}:\n"
            "    pkg = importlib.import_module(top)\n"
            "    for info in pkgutil.walk_packages(pkg.__path__, top + '.'):\n"
            "        if info.name in skip:\n"
            "            continue\n"
            "        try:\n"
            "            importlib.import_module(info.name)\n"
            "        except Exception as exc:\n"
            "            bad.append(f'{info.name}: {type(exc).__name__}: {exc}')\n"
            "print(json.dumps(bad))\n"
        )
        done = subprocess.run(
            ["setpriv", "--reuid=10001", "--regid=10001", "--clear-groups", "--",
             str(env_dir / "bin" / "python"), "-c", code],
            capture_output=True, text=True, timeout=300, check=False, cwd="/",
            env={"PATH": f"{env_dir / 'bin'}:{STANDARD_PATH}", "HOME": "/nonexistent"},
        )  # fmt: skip
        if done.returncode != 0:
            return [f"interpreter failed: {done.stderr[-2000:]}"]
        result: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- netns sockets

_libc = ctypes.CDLL(None, use_errno=True)


def netns_socket(netns: str, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket that lives in network namespace ``netns`` (made by a thread that joined it)."""
    made: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            finally:
                os.close(fd)
            made.append(socket.socket(family, kind))
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join()
    result = made[0]
    if isinstance(result, BaseException):
        raise result
    return result


def family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def http_get(
    netns: str, host: str, port: int, path: str, *, timeout: float = 3.0, headers: Any = None
) -> tuple[int, bytes]:
    """GET http://host:port/path from inside ``netns`` (a kubelet probe, a client)."""
    sock = netns_socket(netns, family_of(host))
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = sock
        conn.request("GET", path, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        sock.close()


def http_post(
    netns: str, host: str, port: int, path: str, body: Any, *, token: str, timeout: float = 10.0
) -> tuple[int, Any]:
    sock = netns_socket(netns, family_of(host))
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = sock
        conn.request(
            "POST",
            path,
            body=json.dumps(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        answer = conn.getresponse()
        data = answer.read()
        return answer.status, json.loads(data or b"null")
    finally:
        sock.close()


class Relay:
    """TCP relay: listens on ``port`` inside ``netns`` and forwards to (host, port) of the
    test's own namespace (this machine's PostgreSQL and Redis on the loopback)."""

    def __init__(self, netns: str, port: int, target: tuple[str, int], *, ipv6: bool) -> None:
        self.target = target
        self.server = netns_socket(netns, socket.AF_INET6 if ipv6 else socket.AF_INET)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ipv6:
            self.server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.server.bind(("::" if ipv6 else "0.0.0.0", port))
        self.server.listen(64)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()


# --------------------------------------------------------------------------- the API server


class FakeKubeApi:
    """Just enough of the Kubernetes API for in-cluster clients of Secrets: bearer tokens of
    ServiceAccounts, `get` limited by the Role's resourceNames, `create`, 404 and 409."""

    def __init__(self, cluster: Cluster, netns: str, address: str, port: int) -> None:
        self.cluster = cluster
        self.tokens: dict[str, str] = {}  # token -> service account name
        self.ca_pem, cert_pem, key_pem = _self_signed(
            "kubernetes.default.svc", [address, cluster.api_address]
        )
        work = cluster.workdir / "api"
        work.mkdir()
        (work / "tls.crt").write_bytes(cert_pem)
        (work / "tls.key").write_bytes(key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(work / "tls.crt", work / "tls.key")
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                scheme, _, token = self.headers.get("Authorization", "").partition(" ")
                token = token.strip() if scheme.lower() == "bearer" else ""
                account = api.tokens.get(token)
                if account is None:
                    return self._answer(401, {"kind": "Status", "code": 401})
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/secrets(?:/([^/?]+))?", self.path)
                if not m or m.group(1) != cluster.namespace:
                    return self._answer(404, {"kind": "Status", "code": 404})
                name = m.group(2)
                if method == "GET" and name:
                    if not api.allowed(account, "get", name):
                        return self._answer(403, {"kind": "Status", "code": 403})
                    found = cluster.objects.get(("Secret", name))
                    if found is None:
                        return self._answer(404, {"kind": "Status", "code": 404})
                    return self._answer(200, found)
                if method == "POST" and not name:
                    length = int(self.headers.get("Content-Length", "0"))
                    body = json.loads(self.rfile.read(length))
                    name = body["metadata"]["name"]
                    if not api.allowed(account, "create", name):
                        return self._answer(403, {"kind": "Status", "code": 403})
                    if ("Secret", name) in cluster.objects:
                        return self._answer(409, {"kind": "Status", "code": 409})
                    cluster.objects[("Secret", name)] = body
                    return self._answer(201, body)
                return self._answer(405, {"kind": "Status", "code": 405})

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

        family = family_of(address)
        sock = netns_socket(netns, family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(16)

        class Server(ThreadingHTTPServer):
            address_family = family

            def server_bind(self) -> None:  # the socket is bound already, in the netns
                self.server_address = sock.getsockname()[:2]  # type: ignore[assignment]

        self.server = Server((address, port), Handler, bind_and_activate=False)
        self.server.socket = context.wrap_socket(sock, server_side=True)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def token_for(self, account: str) -> str:
        token = secrets.token_urlsafe(24)
        self.tokens[token] = account
        return token

    def allowed(self, account: str, verb: str, name: str) -> bool:
        """RBAC as rendered: a RoleBinding of ``account`` to a Role with a matching rule."""
        for (kind, _), binding in self.cluster.objects.items():
            if kind != "RoleBinding":
                continue
            if not any(s.get("name") == account for s in binding.get("subjects", [])):
                continue
            role = self.cluster.objects.get(("Role", binding["roleRef"]["name"]))
            for rule in (role or {}).get("rules", []):
                if "secrets" not in rule.get("resources", []) or verb not in rule["verbs"]:
                    continue
                names = rule.get("resourceNames")
                if not names or name in names:
                    return True
        return False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _self_signed(name: str, addresses: list[str]) -> tuple[bytes, bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(name),
                    x509.DNSName("kubernetes.default"),
                    *[x509.IPAddress(ipaddress.ip_address(a)) for a in addresses],
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, cert_pem, key_pem


# --------------------------------------------------------------------------- the cluster


@dataclass
class Process:
    pod: Pod
    container: str
    proc: subprocess.Popen[Any]
    log: Path
    described: str

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class Pod:
    name: str
    workload: dict[str, Any]
    netns: str
    addresses: list[str]
    node: str
    ordinal: int | None = None
    host_network: bool = False
    processes: list[Process] = field(default_factory=list)

    @property
    def spec(self) -> dict[str, Any]:
        spec = self.workload["spec"]
        return spec["template"]["spec"] if "template" in spec else spec

    @property
    def labels(self) -> dict[str, str]:
        spec = self.workload["spec"]
        meta = spec["template"]["metadata"] if "template" in spec else self.workload["metadata"]
        return dict(meta.get("labels") or {})


class Cluster:
    """The namespaces, the Service network, the API and the objects of one release."""

    def __init__(
        self,
        *,
        bed: Any,
        namespace: str,
        workdir: Path,
        venvs: Venvs,
        ipv6: bool,
        service_ips: dict[str, str],
        api_address: str,
        pod_hosts: list[str],
        node_hosts: list[str],
    ) -> None:
        self.bed = bed
        self.namespace = namespace
        self.workdir = workdir
        self.venvs = venvs
        self.ipv6 = ipv6
        self.family = 6 if ipv6 else 4
        self.images = read_images()
        self.service_ips = service_ips
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[str, Pod] = {}
        self.free_hosts = list(pod_hosts)
        self.node_hosts = list(node_hosts)
        self.remapped: dict[str, str] = {}
        self.relays: list[Relay] = []
        self.router = bed.router("kube").netns
        api_host = self.free_hosts.pop(0)
        self.api_netns = bed.host(api_host).netns
        api_pod_ip = bed.host(api_host).address(family=self.family)
        self.api_address = api_address
        self.api = FakeKubeApi(self, self.api_netns, api_pod_ip, 6443)
        self.api_endpoint = (api_pod_ip, 6443)
        self.extra_hosts: dict[str, str] = {}
        # The node's own clients (probes, the operator's calls) reach ClusterIPs too.
        service_net = "fd00:96::/112" if ipv6 else "10.96.0.0/24"
        subprocess.run(
            ["ip", "netns", "exec", self.router, "ip", "route", "add", service_net, "dev", "pods"],
            check=True, capture_output=True, timeout=10,
        )  # fmt: skip
        self.service_endpoints: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ objects

    def apply(self, doc: dict[str, Any], *, keep_live_secrets: bool = False) -> None:
        key = (doc["kind"], doc["metadata"]["name"])
        if doc["kind"] == "Secret" and keep_live_secrets and key in self.objects:
            return  # the chart's `lookup` finds the live value and renders it again
        self.objects[key] = doc

    def secret_values(self) -> dict[tuple[str, str], str]:
        out: dict[tuple[str, str], str] = {}
        for (kind, name), doc in self.objects.items():
            if kind != "Secret":
                continue
            for k, v in (doc.get("data") or {}).items():
                out[(name, k)] = base64.b64decode(v).decode()
            for k, v in (doc.get("stringData") or {}).items():
                out[(name, k)] = str(v)
        return out

    def create_secret(self, name: str, data: dict[str, str]) -> None:
        """What the operator does with kubectl before installing."""
        self.objects[("Secret", name)] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }

    # ------------------------------------------------------------------ network

    def hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines.append(f"{self.api_address} kubernetes kubernetes.default kubernetes.default.svc")
        for name, ip in sorted(self.service_ips.items()):
            ns = self.namespace
            lines.append(f"{ip} {name} {name}.{ns} {name}.{ns}.svc {name}.{ns}.svc.cluster.local")
        lines.extend(self._pod_dns())
        for name, ip in sorted(self.extra_hosts.items()):
            lines.append(f"{ip} {name}")
        return "\n".join(lines) + "\n"

    def _pod_dns(self) -> list[str]:
        """Cluster DNS for StatefulSet pods: ``<pod>.<serviceName>.<ns>.svc`` (and its
        shorter forms, found through the search path) for each pod of a StatefulSet whose
        governing Service is headless and selects it, as CoreDNS answers."""
        ns = self.namespace
        lines = []
        for pod in sorted(self.pods.values(), key=lambda p: p.name):
            if pod.workload["kind"] != "StatefulSet" or pod.host_network:
                continue
            governing = pod.workload["spec"].get("serviceName")
            service = self.objects.get(("Service", governing or ""))
            if service is None or service["spec"].get("clusterIP") != "None":
                continue
            selector = service["spec"].get("selector") or {}
            if not selector or not selector.items() <= pod.labels.items():
                continue
            name = f"{pod.name}.{governing}"
            lines.append(
                f"{pod.addresses[0]} {name} {name}.{ns} {name}.{ns}.svc "
                f"{name}.{ns}.svc.cluster.local"
            )
        return lines

    def program_services(self) -> None:
        """kube-proxy: DNAT each ClusterIP:port to the pods its selector picks."""
        fam = "ip6" if self.ipv6 else "ip"
        chains: list[str] = []
        rules: list[str] = []
        backends: list[tuple[str, int, str, list[tuple[str, int]]]] = []
        backends.append(("kubernetes", 443, "tcp", [self.api_endpoint]))
        for (kind, name), doc in sorted(self.objects.items()):
            if kind != "Service" or doc["spec"].get("clusterIP") == "None":
                continue
            selector = doc["spec"].get("selector") or {}
            pods = [
                p
                for p in self.pods.values()
                if selector and selector.items() <= p.labels.items() and not p.host_network
            ]
            for port in doc["spec"]["ports"]:
                target = self._target_port(pods, port)
                backends.append(
                    (name, int(port["port"]), port.get("protocol", "TCP").lower(), target)
                )
        self.service_endpoints = {}
        for i, (name, port, proto, targets) in enumerate(backends):
            ip = self.api_address if name == "kubernetes" else self.service_ips[name]
            self.service_endpoints[f"{name}:{port}/{proto}"] = [f"{a}:{p}" for a, p in targets]
            if not targets:
                rules.append(f"{fam} daddr {ip} {proto} dport {port} reject")
                continue
            verdicts = []
            for j, (addr, tport) in enumerate(targets):
                chain = f"s{i}e{j}"
                dst = f"[{addr}]:{tport}" if self.ipv6 else f"{addr}:{tport}"
                chains.append(
                    f"chain {chain} {{\n    meta l4proto {proto} dnat {fam} to {dst}\n  }}"
                )
                verdicts.append(f"{j} : jump {chain}")
            rules.append(
                f"{fam} daddr {ip} {proto} dport {port} numgen random mod {len(targets)} "
                f"vmap {{ {', '.join(verdicts)} }}"
            )
        pod_net = "pods"
        ruleset = "\n".join(
            [
                "table inet cyplay",
                "delete table inet cyplay",
                "table inet cyplay {",
                *[f"  {c}" for c in chains],
                "  chain services {",
                *[f"    {r}" for r in rules],
                "  }",
                "  chain pre {",
                "    type nat hook prerouting priority -100; policy accept;",
                "    jump services",
                "  }",
                "  chain out {",
                "    type nat hook output priority -100; policy accept;",
                "    jump services",
                "  }",
                "  chain post {",
                "    type nat hook postrouting priority 100; policy accept;",
                f'    iifname "{pod_net}" oifname "{pod_net}" ct status dnat masquerade',
                "  }",
                "  chain filter_forward {",
                "    type filter hook forward priority 0; policy accept;",
                "    ct state established,related accept",
                f'    iifname "nodes" oifname "{pod_net}" ct status dnat accept',
                f'    iifname "nodes" oifname "{pod_net}" drop',
                "  }",
                "}",
            ]
        )
        done = subprocess.run(
            ["ip", "netns", "exec", self.router, "nft", "-f", "-"],
            input=ruleset, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise PlayError(f"nft failed: {done.stderr}\n{ruleset}")

    def _target_port(self, pods: list[Pod], port: dict[str, Any]) -> list[tuple[str, int]]:
        out = []
        for pod in pods:
            number = None
            for ctr in pod.spec["containers"]:
                for p in ctr.get("ports", []):
                    if port["targetPort"] in (p.get("name"), p["containerPort"]):
                        number = int(p["containerPort"])
            if number is None:
                raise PlayError(
                    f"Service port {port} targets {port['targetPort']!r}, which pod {pod.name} "
                    "does not declare"
                )
            out.append((pod.addresses[0], number))
        return out

    # ------------------------------------------------------------------ pods

    def new_pod(self, name: str, workload: dict[str, Any], ordinal: int | None = None) -> Pod:
        spec = workload["spec"]
        pod_spec = spec["template"]["spec"] if "template" in spec else spec
        if pod_spec.get("hostNetwork"):
            node = self.node_hosts.pop(0)
            host = self.bed.host(node)
            pod = Pod(
                name, workload, host.netns, [host.address(family=self.family)], node, ordinal, True
            )
        else:
            if not self.free_hosts:
                raise PlayError("the play ran out of pod namespaces")
            host = self.bed.host(self.free_hosts.pop(0))
            pod = Pod(
                name, workload, host.netns, [host.address(family=self.family)], "kube", ordinal
            )
        self.pods[name] = pod
        return pod

    def fields(self, pod: Pod) -> dict[str, str]:
        out = {
            "metadata.name": pod.name,
            "metadata.namespace": self.namespace,
            "spec.nodeName": pod.node,
            "status.podIP": pod.addresses[0],
            "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
        }
        if pod.ordinal is not None:
            out["metadata.labels['apps.kubernetes.io/pod-index']"] = str(pod.ordinal)
        return out

    def _volume_dir(self, pod: Pod, volume: dict[str, Any]) -> Path:
        """Materialise one volume of a pod as a directory or file on this host."""
        base = self.workdir / "pods" / pod.name / "volumes" / volume["name"]
        if base.exists():
            return base
        base.mkdir(parents=True)
        ctx = pod.spec.get("securityContext") or {}
        group = ctx.get("fsGroup")
        values = self.secret_values()
        if "secret" in volume or "configMap" in volume:
            src = volume.get("secret") or volume.get("configMap") or {}
            kind = "Secret" if "secret" in volume else "ConfigMap"
            name = src.get("secretName") or src.get("name")
            doc = self.objects.get((kind, name))
            if doc is None:
                if src.get("optional"):
                    base.chmod(0o755)
                    return base
                raise PlayError(f"pod {pod.name}: volume {volume['name']}: no {kind} {name}")
            if kind == "Secret":
                data = {k: v for (n, k), v in values.items() if n == name}
            else:
                data = dict(doc.get("data") or {})
            items = src.get("items")
            files = {i["path"]: data[i["key"]] for i in items} if items else data
            mode = int(src.get("defaultMode", 0o644))
            for path, content in files.items():
                target = base / path
                target.write_text(content)
                target.chmod(mode)
                if group is not None:
                    os.chown(target, 0, int(group))
            base.chmod(0o755)
            if group is not None:
                os.chown(base, 0, int(group))
            return base
        if "emptyDir" in volume:
            base.chmod(0o1777 if group is None else 0o2775)
            if group is not None:
                os.chown(base, 0, int(group))
            return base
        if "hostPath" in volume:
            path = volume["hostPath"]["path"]
            if path == "/dev/net/tun":
                base.rmdir()
                return Path(path)
            node_dir = self.workdir / "nodes" / pod.node / path.strip("/").replace("/", "_")
            node_dir.mkdir(parents=True, exist_ok=True)
            base.rmdir()
            return node_dir
        if "persistentVolumeClaim" in volume:
            base.chmod(0o2775)
            if group is not None:
                os.chown(base, 0, int(group))
            return base
        raise PlayError(f"pod {pod.name}: volume kind not played: {volume}")

    def _volumes(self, pod: Pod) -> dict[str, Path]:
        vols = {v["name"]: v for v in pod.spec.get("volumes", [])}
        for claim in pod.workload["spec"].get("volumeClaimTemplates", []):
            vols[claim["metadata"]["name"]] = {
                "name": claim["metadata"]["name"],
                "persistentVolumeClaim": {},
            }
        return {name: self._volume_dir(pod, v) for name, v in vols.items()}

    def launch(self, pod: Pod, ctr: dict[str, Any], *, tag: str = "") -> Process:
        """Start one container of ``pod`` exactly as rendered (see the module docstring)."""
        pod_ctx = pod.spec.get("securityContext") or {}
        ctx = {**pod_ctx, **(ctr.get("securityContext") or {})}
        image_ref = str(ctr["image"])
        repository = image_ref.rsplit("/", 1)[-1].split(":")[0]
        target = (
            repository.removeprefix("cyphonic-") if repository.startswith("cyphonic-") else None
        )
        image = self.images.get(target) if target else None
        image_env: dict[str, str] = {}
        path = STANDARD_PATH
        if image is not None:
            env_dir = self.venvs.get(image.target)
            image_env = {k: v for k, v in image.env.items() if k != "PATH"}
            path = f"{env_dir / 'bin'}:{STANDARD_PATH}"
            entrypoint = list(image.entrypoint)
            cmd = list(image.cmd)
        else:
            entrypoint, cmd = [], []
        if "command" in ctr:
            argv = [*ctr["command"], *ctr.get("args", [])]
        else:
            argv = [*entrypoint, *ctr.get("args", cmd)]
        env = {"PATH": path, "HOSTNAME": pod.name, "HOME": "/nonexistent", **image_env}
        # The kubelet gives every container the API's address.
        env["KUBERNETES_SERVICE_HOST"] = self.api_address
        env["KUBERNETES_SERVICE_PORT"] = "443"
        rendered_env = kubelet_env(
            ctr.get("env", []), secrets=self.secret_values(), fields=self.fields(pod)
        )
        env.update(rendered_env)
        # $(VAR) in command and args, as the kubelet expands them.
        argv = [
            re.sub(r"\$\(([A-Za-z_]\w*)\)", lambda m: env.get(m.group(1), m.group(0)), a)
            for a in argv
        ]
        volumes = self._volumes(pod)
        mounts: list[tuple[Path, str, bool]] = []
        for m in ctr.get("volumeMounts", []):
            mounts.append((volumes[m["name"]], m["mountPath"], bool(m.get("readOnly"))))
        # Service account token (automountServiceAccountToken defaults to true).
        account = pod.spec.get("serviceAccountName")
        if account and pod.spec.get("automountServiceAccountToken", True):
            sa = self.workdir / "pods" / pod.name / "serviceaccount"
            sa.mkdir(parents=True, exist_ok=True)
            (sa / "token").write_text(self.api.token_for(account))
            (sa / "ca.crt").write_bytes(self.api.ca_pem)
            (sa / "namespace").write_text(self.namespace)
            for f in sa.iterdir():
                f.chmod(0o644)
            sa.chmod(0o755)
            mounts.append((sa, "/var/run/secrets/kubernetes.io/serviceaccount", True))
        # Top directories this host lacks: remap (recorded), rewriting the text that names them.
        mapped_mounts: list[tuple[Path, str, bool]] = []
        for src, dst, ro in mounts:
            top = "/" + _resolve(dst).strip("/").split("/")[0]
            if not os.path.exists(top):
                new = str(self.workdir / "pods" / pod.name / "remapped" / dst.strip("/"))
                self.remapped[f"{pod.name}:{dst}"] = new
                argv = [a.replace(dst, new) for a in argv]
                env = {k: v.replace(dst, new) for k, v in env.items()}
                Path(new).mkdir(parents=True, exist_ok=True)
                mapped_mounts.append((src, new, ro))  # bound there: a mount, not the root fs
                continue
            mapped_mounts.append((src, dst, ro))
        uid = int(ctx.get("runAsUser", 0))
        gid = int(ctx.get("runAsGroup", uid))
        groups = sorted({gid, *([int(pod_ctx["fsGroup"])] if "fsGroup" in pod_ctx else [])})
        caps = ctx.get("capabilities") or {}
        dropped_all = "ALL" in (caps.get("drop") or [])
        added = [c.lower() for c in caps.get("add") or []]
        if uid != 0 and ctx.get("runAsNonRoot") is False:
            pass
        if ctx.get("runAsNonRoot") and uid == 0:
            raise PlayError(f"pod {pod.name}: runAsNonRoot with uid 0 would not start")
        for s in pod_ctx.get("sysctls", []):
            if not pod.host_network:
                subprocess.run(
                    ["ip", "netns", "exec", pod.netns, "sysctl", "-qw",
                     f"{s['name']}={s['value']}"],
                    check=True, capture_output=True, timeout=10,
                )  # fmt: skip
        hosts = self.workdir / "pods" / pod.name / "hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(self.hosts_file())
        hosts.chmod(0o644)
        script = self._mount_script(
            pod, mapped_mounts, hosts, bool(ctx.get("readOnlyRootFilesystem"))
        )
        setpriv = [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            f"--groups={','.join(map(str, groups))}",
        ]
        if ctx.get("allowPrivilegeEscalation") is False:
            setpriv.append("--no-new-privs")
        if dropped_all or uid != 0:
            bounding = ",".join(["-all", *[f"+{c}" for c in added]])
            setpriv += [f"--bounding-set={bounding}", f"--inh-caps={bounding}"]
            if uid != 0 and added:
                setpriv += [f"--ambient-caps={bounding}"]
        full = [*setpriv, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()], *argv]
        script += "cd /\nexec " + " ".join(shlex.quote(a) for a in full) + "\n"
        logdir = self.workdir / "logs"
        logdir.mkdir(exist_ok=True)
        log = logdir / f"{pod.name}.{ctr['name']}{tag}.log"
        fh = log.open("ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, "unshare", "--mount", "--propagation", "private",
             "--", "sh", "-c", script],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        fh.close()
        self.bed._track(proc)
        shown = {k: ("<secret>" if any(w in k for w in ("PASSWORD", "SECRET", "TOKEN")) else v)
                 for k, v in rendered_env.items()}  # fmt: skip
        described = (
            f"pod {pod.name} container {ctr['name']} (image {image_ref}, uid {uid})\n"
            f"  argv: {argv}\n  env (rendered): {json.dumps(shown, indent=None)}"
        )
        process = Process(pod, ctr["name"], proc, log, described)
        pod.processes.append(process)
        return process

    def _mount_script(
        self, pod: Pod, mounts: list[tuple[Path, str, bool]], hosts: Path, read_only: bool
    ) -> str:
        """Shell lines (run as root in the pod's own mount namespace) that put each volume at
        its rendered path: a tmpfs for /run, an overlay over a top directory where a mount
        point is missing (its upper layer on a scratch tmpfs, /etc's beside the workdir so it
        can hold the cluster's hosts file), bind mounts, then read-only remounts."""
        upper = self.workdir / "pods" / pod.name / f"overlay-{secrets.token_hex(3)}"
        lines = ["set -e", "mount --make-rprivate /"]
        resolved: list[tuple[Path, str, bool]] = []
        overlays = {"/etc"}
        tmpfs_run = False
        for src, dst, ro in mounts:
            real = _resolve(dst)
            top = "/" + real.strip("/").split("/")[0]
            if top == "/run":
                tmpfs_run = True
            elif not os.path.exists(real):
                overlays.add(top)
            resolved.append((src, real, ro))
        scratch = "/mnt"
        lines.append(f"mount -t tmpfs -o mode=755 tmpfs {scratch}")
        # Sources are pinned first: an overlay mounted later over their top directory
        # (/var) would otherwise divert writes into its upper layer.
        staged: list[tuple[str, str, bool]] = []
        for i, (src, real, ro) in enumerate(resolved):
            stage = f"{scratch}/src/{i}"
            if Path(src).is_dir():
                lines.append(f"mkdir -p {stage}")
            else:
                lines.append(f"mkdir -p {scratch}/src && touch {stage}")
            lines.append(f"mount --bind {shlex.quote(str(src))} {stage}")
            staged.append((stage, real, ro))
        for top in sorted(overlays):
            if top == "/etc":
                u, w = upper / "etc" / "u", upper / "etc" / "w"
                u.mkdir(parents=True)
                w.mkdir(parents=True)
                shutil.copy(hosts, u / "hosts")
                uq, wq = str(u), str(w)
            else:
                uq, wq = f"{scratch}{top}/u", f"{scratch}{top}/w"
                lines.append(f"mkdir -p {uq} {wq}")
            lines.append(
                f"mount -t overlay overlay -o lowerdir={top},upperdir={uq},workdir={wq} {top}"
            )
        if tmpfs_run:
            lines.append("mount -t tmpfs -o mode=755 tmpfs /run")
        kinds = {
            stage: Path(src).is_dir()
            for (src, _, _), (stage, _, _) in zip(resolved, staged, strict=True)
        }
        for src, real, ro in sorted(staged, key=lambda m: m[1].count("/")):
            q = shlex.quote(real)
            if kinds[src]:
                lines.append(f"mkdir -p {q}")
            else:
                lines.append(f"[ -e {q} ] || {{ mkdir -p $(dirname {q}); touch {q}; }}")
            lines.append(f"mount --bind {shlex.quote(str(src))} {q}")
            if ro:
                lines.append(f"mount -o remount,bind,ro {q}")
        if read_only:
            lines.append("mount -o remount,bind,ro /")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ probes

    def probe(self, pod: Pod, ctr: dict[str, Any], kind: str = "readinessProbe") -> bool:
        spec = ctr.get(kind)
        if not spec:
            return True
        if "httpGet" in spec:
            port = spec["httpGet"]["port"]
            if isinstance(port, str):
                port = next(p["containerPort"] for p in ctr["ports"] if p.get("name") == port)
            try:
                status, _ = http_get(
                    self.router, pod.addresses[0], int(port), spec["httpGet"].get("path", "/")
                )
            except OSError:
                return False
            return 200 <= status < 400
        if "exec" in spec:
            probe_ctr = {**ctr, "command": spec["exec"]["command"], "args": []}
            process = self.launch(pod, probe_ctr, tag=".probe")
            try:
                return process.proc.wait(timeout=15) == 0
            except subprocess.TimeoutExpired:
                process.proc.kill()
                return False
            finally:
                pod.processes.remove(process)
        if "tcpSocket" in spec:
            sock = netns_socket(self.router, family_of(pod.addresses[0]))
            sock.settimeout(2)
            try:
                sock.connect((pod.addresses[0], int(spec["tcpSocket"]["port"])))
                return True
            except OSError:
                return False
            finally:
                sock.close()
        raise PlayError(f"probe kind not played: {spec}")

    def stop_pod(self, pod: Pod) -> None:
        for process in pod.processes:
            if process.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.proc.pid, 15)
        for process in pod.processes:
            try:
                process.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.proc.pid, 9)
                process.proc.wait(timeout=10)
        pod.processes.clear()

    def close(self) -> None:
        for pod in self.pods.values():
            with contextlib.suppress(Exception):
                self.stop_pod(pod)
        for relay in self.relays:
            relay.close()
        self.api.close()


def _resolve(path: str) -> str:
    """``path`` with the symlinks of its longest existing prefix resolved (/var/run -> /run)."""
    parts = Path(path).parts
    for i in range(len(parts), 0, -1):
        prefix = Path(*parts[:i])
        if prefix.exists():
            return str(Path(os.path.realpath(prefix), *parts[i:]))
    return path


def wait_until(predicate: Callable[[], Any], timeout: float, what: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise PlayError(what())
        time.sleep(0.5)


@contextlib.contextmanager
def suppress_all() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        print(f"cleanup: {exc}", file=sys.stderr)
