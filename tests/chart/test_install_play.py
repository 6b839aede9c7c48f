"""`helm install`, `helm test` and `helm upgrade` of the chart played as a cluster would run
them, without a cluster (issue 18; issue 13 item 5). See install_play.py for what stands for
what. For each value set:

1. render the chart through Helm's library (the Services' cluster IPs are the operator's
   public endpoints: the NMS and TRS QUIC Services);
2. run the pre-install hooks by weight (the PKI Job against a stand-in API server, the
   migration Job with an external database);
3. start every workload replica as rendered: init containers to completion, then the
   containers, each in its pod's namespace as the rendered uid with the rendered mounts;
4. require every readiness probe to answer before any post-install hook runs (`--wait`);
5. run `helm test`'s pod, then open the web console through the NMS admin Service: the
   page, the admin token check, every TRS replica read at the chart's admin URL template
   (StatefulSet pod DNS names) and a revoke the NMS forwards to the AS;
6. upgrade: the operator has created two nodes and their enrolment tokens, turns on the agent
   DaemonSet with the root CA fingerprint and changes the log level; pre-upgrade hooks run,
   every workload rolls, every probe answers again, and the DaemonSet's agents on two
   cluster nodes (namespaces reaching the services only through the Services' ports) enrol,
   log in and ping each other by name; `helm test` again.

Each component runs from an environment installed alone from its own dependency set (as its
image is), after a check that every module of it imports there. Runs as root (namespaces,
mount namespaces, setpriv) against this machine's PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .conftest import NAMESPACE, RELEASE
from .install_play import Cluster, PlayError, Relay, Venvs, http_get, http_post, wait_until
from .value_sets import REDIS_DB, VALUE_SETS

pytestmark = [pytest.mark.netns, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(900)]

POSTGRES_ADMIN = os.environ.get(
    "CYPHONIC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
READY_TIMEOUT = 180.0
PASSWORD = "p@ss/w:rd%40?#x"  # every character that breaks a URL (row 9)

AGENT_SETS = {"default", "production-like", "quic-port-8443"}


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces, setpriv)"
    for tool in ("ip", "nft", "unshare", "setpriv", "redis-server", "dig", "pg_isready"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs it)"
    return None


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _render(chart: Any, values: dict[str, Any], *, upgrade: bool) -> list[dict[str, Any]]:
    import yaml

    out = chart.render(
        values,
        name=RELEASE,
        namespace=NAMESPACE,
        is_install=not upgrade,
        is_upgrade=upgrade,
        revision=2 if upgrade else 1,
    )
    docs = []
    for template, text in sorted(out.items()):
        if template.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def _hooks(doc: dict[str, Any]) -> list[str]:
    value = (doc["metadata"].get("annotations") or {}).get("helm.sh/hook", "")
    return [h for h in value.split(",") if h]


def _weight(doc: dict[str, Any]) -> int:
    return int((doc["metadata"].get("annotations") or {}).get("helm.sh/hook-weight", "0"))


async def _pg(statement: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES_ADMIN).set(drivername="postgresql")
    conn = await asyncpg.connect(url.render_as_string(hide_password=False), timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _redis_flush() -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_connect_timeout=3).flushdb()


@pytest.fixture(scope="module")
def venvs() -> Iterator[Venvs]:
    reason = _why_not()
    if reason:
        pytest.skip(f"install play: {reason}")
    made = Venvs()
    try:
        yield made
    finally:
        made.close()


def test_each_image_installs_alone_and_imports_every_module(venvs: Venvs) -> None:
    """Issue 13 item 5 (first half): each component from its own dependency set."""
    failures = {t: venvs.import_everything(t) for t in ("as", "nms", "trs", "agent")}
    assert not any(failures.values()), json.dumps(failures, indent=2)


class Play:
    """One release through install, test and upgrade."""

    def __init__(self, chart: Any, venvs: Venvs, name: str, workdir: Path) -> None:
        self.chart = chart
        self.venvs = venvs
        self.name = name
        self.ipv6 = name == "ipv6"
        self.workdir = workdir
        self.agents = name in AGENT_SETS
        suffix = secrets.token_hex(4)
        self.role = f"cyplay_{suffix}"
        self.database = f"cyplay_{suffix}"
        base = VALUE_SETS[name]
        operator: dict[str, Any] = {}
        if base.get("postgresql", {}).get("enabled", True):
            operator["postgresql"] = {"username": self.role, "database": self.database}
        else:
            operator["externalDatabase"] = {"database": self.database}
        self.values = _merge(base, operator)
        self.cluster: Cluster | None = None
        self.log: list[str] = []

    # ------------------------------------------------------------------ set-up

    def __enter__(self) -> Play:
        asyncio.run(_pg(f'CREATE ROLE "{self.role}" LOGIN'))
        asyncio.run(_pg(f'CREATE DATABASE "{self.database}" OWNER "{self.role}"'))
        if not self.values.get("redis", {}).get("enabled", True):
            _redis_flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cluster is not None:
            self.cluster.close()
        if getattr(self, "bed", None) is not None:
            self.bed.close()
        asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
        asyncio.run(_pg(f'DROP ROLE IF EXISTS "{self.role}"'))
        if not self.values.get("redis", {}).get("enabled", True):
            _redis_flush()

    def _services(self, docs: list[dict[str, Any]]) -> list[str]:
        return sorted(
            d["metadata"]["name"]
            for d in docs
            if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None"
        )

    def _pod_count(self, docs: list[dict[str, Any]]) -> int:
        count = 0
        for d in docs:
            if d["kind"] in ("Deployment", "StatefulSet"):
                count += int(d["spec"].get("replicas", 1))
            elif d["kind"] in ("Job", "Pod"):
                count += 2  # install and upgrade run their own pods
        return count + 8

    def build(self) -> None:
        from cyphonic_testbed.bed import build
        from cyphonic_testbed.topology import Host, Network, Router, Topology

        first = _render(self.chart, _merge(self.values, self._agent_values("0" * 64)), upgrade=True)
        services = self._services(first)
        if self.ipv6:
            ips = {s: f"fd00:96::{10 + i:x}" for i, s in enumerate(services)}
            api = "fd00:96::1"
            pods_net = Network("pods", ipv6="fd00:244::/64")
            nodes_net = Network("nodes", ipv6="fd00:250::/64")
        else:
            ips = {s: f"10.96.0.{10 + i}" for i, s in enumerate(services)}
            api = "10.96.0.1"
            pods_net = Network("pods", ipv4="10.244.0.0/24")
            nodes_net = Network("nodes", ipv4="10.250.0.0/24")
        full = f"{RELEASE}-cyphonic"

        def ep(service: str, port: int) -> str:
            ip = ips[service]
            return f"[{ip}]:{port}" if self.ipv6 else f"{ip}:{port}"

        self.values = _merge(
            self.values,
            {
                "nms": {"publicEndpoints": [ep(f"{full}-nms-quic", 443)]},
                "trs": {"publicEndpoints": [ep(f"{full}-trs-quic", 443)]},
            },
        )
        pods = [f"p{i}" for i in range(self._pod_count(first))]
        topology = Topology(
            name="helmplay",
            networks=[pods_net, nodes_net],
            hosts=[
                *[Host(p, networks=["pods"]) for p in pods],
                Host("n1", networks=["nodes"]),
                Host("n2", networks=["nodes"]),
            ],
            routers=[Router("kube", networks=["pods", "nodes"])],
        )
        self.bed = build(topology)
        self.cluster = Cluster(
            bed=self.bed,
            namespace=NAMESPACE,
            workdir=self.workdir,
            venvs=self.venvs,
            ipv6=self.ipv6,
            service_ips=ips,
            api_address=api,
            pod_hosts=pods,
            node_hosts=["n1", "n2"],
        )
        # The operator's Secrets and external services (before `helm install`).
        if not self.values.get("postgresql", {}).get("enabled", True):
            self.cluster.create_secret("ops-db", {"password": PASSWORD})
            self._external("db.ops.example", 5432)
            self._external("redis.ops.example", 6379)

    def _external(self, name: str, port: int) -> None:
        assert self.cluster is not None
        host = self.bed.host(self.cluster.free_hosts.pop(0))
        address = host.address(family=6 if self.ipv6 else 4)
        self.cluster.relays.append(Relay(host.netns, port, ("127.0.0.1", port), ipv6=self.ipv6))
        self.cluster.extra_hosts[name] = address

    def _agent_values(self, fingerprint: str) -> dict[str, Any]:
        return {
            "agent": {"enabled": True, "tokenSecret": "enrol-tokens", "rootCaSha256": fingerprint},
            "logLevel": "debug",
        }

    # ------------------------------------------------------------------ Helm's steps

    def run_hooks(self, docs: list[dict[str, Any]], phase: str) -> None:
        assert self.cluster is not None
        hooks = sorted((d for d in docs if phase in _hooks(d)), key=_weight)
        for doc in hooks:
            if doc["kind"] in ("Job", "Pod"):
                self.run_to_completion(doc, phase)
            else:
                self.cluster.apply(doc)
            self.log.append(f"{phase}: {doc['kind']}/{doc['metadata']['name']}")

    def run_to_completion(self, doc: dict[str, Any], phase: str) -> None:
        assert self.cluster is not None
        c = self.cluster
        spec = doc["spec"]
        attempts = int(spec.get("backoffLimit", 0)) + 1 if doc["kind"] == "Job" else 1
        attempts = min(attempts, 3)
        deadline = min(float(spec.get("activeDeadlineSeconds", 300)), 240.0)
        name = f"{doc['metadata']['name']}-{phase}"
        pod = c.new_pod(name, doc)
        c.program_services()
        failures = []
        for attempt in range(attempts):
            ok = True
            for ctr in [*pod.spec.get("initContainers", []), *pod.spec["containers"]]:
                process = c.launch(pod, ctr, tag=f".{attempt}")
                try:
                    status = process.proc.wait(timeout=deadline)
                except subprocess.TimeoutExpired:
                    c.stop_pod(pod)
                    status = -1
                if status != 0:
                    failures.append(f"{process.described}\n  exit {status}:\n{process.tail()}")
                    ok = False
                    break
            if ok:
                pod.processes.clear()
                return
            time.sleep(1)
        raise PlayError(
            f"{phase} {doc['kind']}/{doc['metadata']['name']} failed:\n" + "\n".join(failures)
        )

    def start_workloads(self, docs: list[dict[str, Any]], *, upgrade: bool) -> None:
        """Create the release's objects, then start (or roll) every workload's pods."""
        assert self.cluster is not None
        c = self.cluster
        for doc in docs:
            if not _hooks(doc) and doc["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
                c.apply(doc, keep_live_secrets=upgrade)
        workloads = [
            d
            for d in docs
            if not _hooks(d) and d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
        ]
        # Data stores first (they start in parallel in a cluster; the services wait for them).
        workloads.sort(
            key=lambda d: d["metadata"]["name"].endswith(("postgresql", "redis")), reverse=True
        )
        started = []
        rolled = []
        for doc in workloads:
            name = doc["metadata"]["name"]
            if doc["kind"] == "DaemonSet":
                replicas = 2
                names = [f"{name}-{n}" for n in ("n1", "n2")]
            else:
                replicas = int(doc["spec"].get("replicas", 1))
                names = [
                    f"{name}-{i}" if doc["kind"] == "StatefulSet" else f"{name}-x{i}"
                    for i in range(replicas)
                ]
            for i, pod_name in enumerate(names):
                existing = c.pods.get(pod_name)
                if existing is not None:
                    rolled.append(existing)
                    existing.workload = doc
                    pod = existing
                else:
                    pod = c.new_pod(pod_name, doc, i if doc["kind"] == "StatefulSet" else None)
                started.append(pod)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(c.stop_pod, rolled))
        c.program_services()
        for pod in started:
            if pod.name.endswith("-postgresql-0"):
                self._postgres(pod)
        # Every pod starts at once, as the cluster starts them; the agents start once the
        # services are ready (below).
        to_start = [
            p for p in started if not p.host_network and not p.name.endswith("-postgresql-0")
        ]
        with ThreadPoolExecutor(max_workers=len(to_start) or 1) as pool:
            list(pool.map(self._start_pod, to_start))

    def _postgres(self, pod: Any) -> None:
        """The in-chart PostgreSQL: this machine's server behind a relay in the pod."""
        assert self.cluster is not None
        if not any(r for r in self.cluster.relays if getattr(r, "pod", None) == pod.name):
            relay = Relay(pod.netns, 5432, ("127.0.0.1", 5432), ipv6=self.ipv6)
            relay.pod = pod.name  # type: ignore[attr-defined]
            self.cluster.relays.append(relay)

    def _start_pod(self, pod: Any) -> None:
        assert self.cluster is not None
        c = self.cluster
        for ctr in pod.spec.get("initContainers", []):
            process = c.launch(pod, ctr)
            try:
                status = process.proc.wait(timeout=READY_TIMEOUT)
            except subprocess.TimeoutExpired:
                status = -1
            if status != 0:
                raise PlayError(
                    f"init container failed (the pod never starts):\n{process.described}\n"
                    f"  exit {status}:\n{process.tail()}"
                )
            pod.processes.remove(process)
        for ctr in pod.spec["containers"]:
            c.launch(pod, ctr)

    def wait_ready(self, docs: list[dict[str, Any]], *, agents: bool = False) -> float:
        """Helm's --wait: every pod's readiness probe answers (no container may have exited)."""
        assert self.cluster is not None
        c = self.cluster
        start = time.monotonic()
        pending = {
            p.name: p for p in c.pods.values() if p.processes and (agents or not p.host_network)
        }
        pending.update({p.name: p for p in c.pods.values() if p.name.endswith("-postgresql-0")})

        def check() -> bool:
            for name, pod in list(pending.items()):
                for process in pod.processes:
                    if process.proc.poll() is not None:
                        raise PlayError(
                            f"a container exited while Helm waits for readiness:\n"
                            f"{process.described}\n  exit {process.proc.returncode}:\n"
                            f"{process.tail()}"
                        )
                if all(c.probe(pod, ctr) for ctr in pod.spec["containers"]):
                    del pending[name]
            return not pending

        def why() -> str:
            lines = [f"not ready after {READY_TIMEOUT:.0f}s (helm install --wait times out):"]
            for pod in pending.values():
                for process in pod.processes:
                    lines.append(f"{process.described}\n{process.tail(1500)}")
            return "\n".join(lines)

        wait_until(check, READY_TIMEOUT, why)
        return time.monotonic() - start

    def scrape_metrics(self) -> dict[str, str]:
        """Metric families (name -> type) that the running AS, NMS and TRS expose on /metrics,
        scraped as Prometheus would: from the node, at each pod's admin port."""
        assert self.cluster is not None
        families: dict[str, str] = {}
        for component in ("as", "nms", "trs"):
            pod = next(
                p
                for p in self.cluster.pods.values()
                if p.labels.get("app.kubernetes.io/component") == component and p.processes
            )
            (ctr,) = pod.spec["containers"]
            port = next(p["containerPort"] for p in ctr["ports"] if p["name"] == "http")
            status, body = http_get(self.cluster.router, pod.addresses[0], port, "/metrics")
            assert status == 200, (component, status)
            for line in body.decode().splitlines():
                if line.startswith("# TYPE "):
                    _, _, name, kind = line.split()
                    # The text format names a counter's family after its sample (_total).
                    if kind == "counter":
                        name = name.removesuffix("_total")
                    if name.endswith("_created"):
                        continue  # prometheus_client's creation timestamp of each family
                    families[name] = kind
        return families

    def helm_test(self, docs: list[dict[str, Any]], round_: str) -> None:
        for doc in docs:
            if "test" in _hooks(doc):
                self.run_to_completion(doc, f"test-{round_}")

    # ------------------------------------------------------------------ the console

    def check_console(self, docs: list[dict[str, Any]]) -> None:
        """The web console (issue 17 item 1) through the NMS admin Service, as a client in
        the cluster (or a port-forward) reaches it: the page, the token check, the TRS
        replicas read at the chart's URL template (StatefulSet pod DNS) and a revoke
        forwarded to the AS."""
        assert self.cluster is not None
        c = self.cluster
        full = f"{RELEASE}-cyphonic"
        _, as_port, token = self.admin()
        nms = c.service_ips[f"{full}-nms"]
        port = int(self.values.get("nms", {}).get("http", {}).get("port", 8082))
        bearer = {"Authorization": f"Bearer {token}"}

        def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
            status, body = http_get(c.router, nms, port, path, headers=headers, timeout=10)
            return status, body

        status, page = get("/console/")
        assert status == 200 and b"<title>CYPHONIC console</title>" in page, (status, page[:300])
        status, body = get("/v1/console")
        assert status == 401, (status, body)
        status, body = get("/v1/console", {"Authorization": "Bearer " + "x" * 40})
        assert status == 401, (status, body)
        status, body = get("/v1/console", bearer)
        assert status == 200, (status, body)
        info = json.loads(body)
        assert info["revoke_available"] and info["trs_admin_apis"] == 1, info

        (trs,) = [
            d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == f"{full}-trs"
        ]
        (nms_deploy,) = [
            d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"{full}-nms"
        ]
        env = {
            e["name"]: e.get("value")
            for e in nms_deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        template = env["CYPHONIC_TRS_ADMIN_URL_TEMPLATE"]
        expected = {f"trs-{i}" for i in range(int(trs["spec"]["replicas"]))}
        seen: dict[str, Any] = {}

        def all_live() -> bool:
            # Any NMS replica may answer (the Service balances): each must see every TRS.
            status, body = get("/v1/trs", bearer)
            assert status == 200, (status, body)
            overview = json.loads(body)
            seen.update(overview)
            live = {
                r["replica_id"]
                for r in overview["replicas"]
                if r["in_directory"]
                and r["counters"] is not None
                and r["admin_url"] == template.replace("{replica}", r["replica_id"][4:])
            }
            return live == expected and not overview["problems"]

        wait_until(
            all_live,
            60,
            lambda: (
                f"the console never listed TRS replicas {sorted(expected)} as live via "
                f"{template}: {json.dumps(seen, indent=1)}"
            ),
        )

        # Revoke (NMS -> AS with the NMS's own admin token): a node the operator created.
        domain = self.values.get("domain", "cyphonic.internal")
        status, body = http_post(
            c.router, c.service_ips[f"{full}-as"], as_port, "/v1/nodes", {"name": "gone"},
            token=token,
        )  # fmt: skip
        assert status == 201, (status, body)
        status, body = http_post(
            c.router, nms, port, f"/v1/nodes/gone.{domain}/revoke", {"reason": "install play"},
            token=token,
        )  # fmt: skip
        assert status == 200 and body["state"] == "revoked", (status, body)
        self.log.append("console: page, token, TRS replicas via the template, revoke")

    # ------------------------------------------------------------------ the agents

    def admin(self) -> tuple[str, int, str]:
        assert self.cluster is not None
        full = f"{RELEASE}-cyphonic"
        token = self.cluster.secret_values()[(f"{full}-admin-token", "admin-token")]
        as_port = int(self.values.get("as", {}).get("http", {}).get("port", 8081))
        return self.cluster.service_ips[f"{full}-as"], as_port, token

    def enrolment_tokens(self) -> dict[str, str]:
        """The operator creates a node per cluster node and an enrolment token for each."""
        assert self.cluster is not None
        host, port, token = self.admin()
        tokens = {}
        for node in ("n1", "n2"):
            status, body = http_post(
                self.cluster.router, host, port, "/v1/nodes", {"name": node}, token=token
            )
            assert status == 201, (status, body)
            status, body = http_post(
                self.cluster.router,
                host,
                port,
                f"/v1/nodes/{node}/enrolment-tokens",
                {},
                token=token,
            )
            assert status == 201, (status, body)
            tokens[node] = body["token"]
        return tokens

    def root_fingerprint(self) -> str:
        from cryptography import x509
        from cyphonic.pki import fingerprint

        assert self.cluster is not None
        pem = self.cluster.secret_values()[(f"{RELEASE}-cyphonic-pki-as", "root-ca.crt")]
        return str(fingerprint(x509.load_pem_x509_certificates(pem.encode())[0]))

    def start_agents(self) -> list[Any]:
        assert self.cluster is not None
        agents = [p for p in self.cluster.pods.values() if p.host_network]
        with ThreadPoolExecutor(max_workers=len(agents)) as pool:
            list(pool.map(self._start_pod, agents))
        return agents

    def agents_ping(self, agents: list[Any]) -> None:
        assert self.cluster is not None
        by_node = {p.node: p for p in agents}
        domain = "cyphonic.internal"

        def up(pod: Any) -> bool:
            (process,) = pod.processes
            if process.proc.poll() is not None:
                raise PlayError(f"agent exited:\n{process.described}\n{process.tail()}")
            return "overlay_up" in process.tail(200000)

        for pod in agents:
            wait_until(
                lambda pod=pod: up(pod),
                90,
                lambda pod=pod: (
                    f"agent never came up:\n{pod.processes[0].described}\n{pod.processes[0].tail()}"
                ),
            )
        n1, n2 = by_node["n1"], by_node["n2"]
        answer = subprocess.run(
            ["ip", "netns", "exec", n1.netns, "dig", "+short", "@127.0.0.1", "-p", "53",
             "+time=5", "+tries=2", f"n2.{domain}", "A"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        addresses = [a for a in answer.stdout.split() if a]
        assert addresses, (
            f"n1's DNS stub did not resolve n2.{domain}: {answer.stdout}{answer.stderr}\n"
            f"{n1.processes[0].tail()}"
        )
        for _ in range(15):
            ping = subprocess.run(
                ["ip", "netns", "exec", n1.netns, "ping", "-c", "1", "-W", "2", addresses[0]],
                capture_output=True, text=True, timeout=10, check=False,
            )  # fmt: skip
            if ping.returncode == 0:
                return
            time.sleep(1)
        raise PlayError(
            f"n1 cannot ping n2 ({addresses[0]}) over the overlay:\n{ping.stdout}\n"
            f"n1:\n{n1.processes[0].tail()}\nn2:\n{n2.processes[0].tail()}"
        )


def sample_names(families: dict[str, str]) -> set[str]:
    """The series names PromQL sees for metric families of the given types."""
    out = set()
    for name, kind in families.items():
        if kind == "counter":
            out |= {f"{name}_total", f"{name}_created"}
        elif kind == "histogram":
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
        else:
            out.add(name)
    return out


def check_monitoring(chart: Any, families: dict[str, str]) -> None:
    """Issue 17 item 4: the dashboard and the alerts use only series the running services
    export, and docs/kubernetes.md lists every metric they export."""
    import re

    from .test_monitoring import documented_metrics, monitoring_objects

    exported = {n for n in families if n.startswith("cyphonic_")}
    series = sample_names({n: families[n] for n in exported})
    rule, dashboard = monitoring_objects(chart)
    used = set(re.findall(r"cyphonic_[a-z0-9_]+", json.dumps(rule) + dashboard))
    # The admin request counters are matched by a regex over the three services.
    used = {u for u in used if not u.startswith("cyphonic_(")}
    unknown = sorted(used - series)
    assert not unknown, f"dashboard/alerts use series no service exports: {unknown}"
    documented = documented_metrics()
    assert documented == exported, (
        f"docs/kubernetes.md lists {sorted(documented - exported)} that no service exports and "
        f"misses {sorted(exported - documented)}"
    )


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_install_test_upgrade_as_a_cluster_would(chart: Any, venvs: Venvs, value_set: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"cyplay-{value_set}-", dir="/var/tmp"))
    workdir.chmod(0o755)
    try:
        with Play(chart, venvs, value_set, workdir) as play:
            play.build()
            assert play.cluster is not None
            docs = _render(chart, play.values, upgrade=False)
            # helm install --wait
            play.run_hooks(docs, "pre-install")
            play.start_workloads(docs, upgrade=False)
            play.wait_ready(docs)
            play.run_hooks(docs, "post-install")
            # helm test
            play.helm_test(docs, "install")
            play.check_console(docs)
            if value_set == "default":
                check_monitoring(chart, play.scrape_metrics())
            # helm upgrade --wait, with the agent DaemonSet turned on
            if play.agents:
                tokens = play.enrolment_tokens()
                play.cluster.create_secret("enrol-tokens", tokens)
                upgraded = _merge(play.values, play._agent_values(play.root_fingerprint()))
            else:
                upgraded = _merge(play.values, {"logLevel": "debug"})
            docs = _render(chart, upgraded, upgrade=True)
            play.run_hooks(docs, "pre-upgrade")
            play.start_workloads(docs, upgrade=True)
            play.wait_ready(docs)
            if play.agents:
                agents = play.start_agents()
                play.agents_ping(agents)
            play.run_hooks(docs, "post-upgrade")
            play.helm_test(docs, "upgrade")
            print(f"{value_set}: remapped paths {play.cluster.remapped}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
