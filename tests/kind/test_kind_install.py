"""The chart on a real (kind) cluster: install, readiness, `helm test`, an upgrade that keeps
every secret, two agent pods enrolled and pinging each other by FQDN, uninstall.

The tests run in file order and share one release (each step needs the previous one).
"""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import CHART as CHART_PATH
from .conftest import FULLNAME, KIND_VALUES, NAMESPACE, RELEASE, TAG, Cluster

pytestmark = [pytest.mark.kind, pytest.mark.timeout(1800)]

AGENTS = ("alpha", "beta")
DOMAIN = "cyphonic.internal"


def _secret_data(cluster: Cluster, name: str) -> dict[str, str]:
    return dict(cluster.core.read_namespaced_secret(name, NAMESPACE).data)


def _kept_secrets(cluster: Cluster) -> dict[str, dict[str, str]]:
    names = [
        f"{FULLNAME}-admin-token",
        f"{FULLNAME}-relay-token",
        f"{FULLNAME}-session-tickets",
        f"{FULLNAME}-postgresql",
        f"{FULLNAME}-redis",
    ] + [f"{FULLNAME}-pki-{p}" for p in ("ca", "as", "nms", "trs")]
    return {n: _secret_data(cluster, n) for n in names}


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[Cluster]:
    from kubernetes.client.exceptions import ApiException

    cluster.helm.install(
        str(CHART_PATH),
        RELEASE,
        KIND_VALUES,
        namespace=NAMESPACE,
        create_namespace=True,
        wait="watcher",
        timeout=900,
    )
    yield cluster
    cluster.helm.uninstall(RELEASE, wait="watcher", timeout=300, ignore_not_found=True)
    # Kept on purpose: the CA and generated secrets survive an uninstall.
    try:
        cluster.core.read_namespaced_secret(f"{FULLNAME}-pki-ca", NAMESPACE)
    except ApiException as exc:  # pragma: no cover - reported, not hidden
        pytest.fail(f"PKI Secret was deleted by uninstall: {exc.status}")


def test_install_makes_every_service_ready(release: Cluster) -> None:
    for name in (f"{FULLNAME}-as", f"{FULLNAME}-nms"):
        dep = release.apps.read_namespaced_deployment(name, NAMESPACE)
        assert dep.status.ready_replicas == dep.spec.replicas, name
    sts = release.apps.read_namespaced_stateful_set(f"{FULLNAME}-trs", NAMESPACE)
    assert sts.status.ready_replicas == sts.spec.replicas
    # The PKI hook made the Secrets and the migration hook's schema is in place.
    for part in ("ca", "as", "nms", "trs"):
        assert _secret_data(release, f"{FULLNAME}-pki-{part}")
    out = release.exec(release.service_pod("as"), ["cyphonic-as", "create-node", "probe-node"])
    assert out.strip() == f"probe-node.{DOMAIN}"


def test_helm_test_checks_readyz(release: Cluster) -> None:
    result = release.helm.test(RELEASE, timeout=300, logs=True)
    logs = json.dumps(result)
    for port in (8081, 8082, 8083):
        assert f":{port}/readyz 200" in logs


def test_trs_replicas_carry_their_ordinal(release: Cluster) -> None:
    for ordinal in (0, 1):
        pod = release.core.read_namespaced_pod(f"{FULLNAME}-trs-{ordinal}", NAMESPACE)
        assert pod.metadata.labels["apps.kubernetes.io/pod-index"] == str(ordinal)


def test_upgrade_with_public_endpoints_keeps_every_secret(release: Cluster) -> None:
    before = _kept_secrets(release)
    addresses = {
        c: release.core.read_namespaced_service(f"{FULLNAME}-{c}-quic", NAMESPACE).spec.cluster_ip
        for c in ("as", "nms", "trs")
    }
    values = copy.deepcopy(KIND_VALUES)
    values["as"]["publicEndpoints"] = [f"{addresses['as']}:443"]
    values["nms"]["publicEndpoints"] = [f"{addresses['nms']}:443"]
    values["trs"]["publicEndpoints"] = [f"{addresses['trs']}:443"]
    release.helm.upgrade(
        str(CHART_PATH), RELEASE, values, namespace=NAMESPACE, wait="watcher", timeout=900
    )
    assert _kept_secrets(release) == before


def _agent_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"agent-{name}", "labels": {"app": "cyphonic-agent-test"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "agent",
                    "image": f"localhost/cyphonic-agent:{TAG}",
                    "imagePullPolicy": "Never",
                    "command": [
                        "sh",
                        "-c",
                        'cyphonic-agent enroll --as "$AS_URL" --state-dir /state && '
                        "exec cyphonic-agent up --state-dir /state",
                    ],
                    "env": [
                        {"name": "AS_URL", "value": f"http://{FULLNAME}-as.{NAMESPACE}.svc:8081"},
                        {
                            "name": "CYPHONIC_ENROL_TOKEN",
                            "valueFrom": {
                                "secretKeyRef": {"name": f"enrol-{name}", "key": "token"}
                            },
                        },
                    ],
                    "securityContext": {
                        "capabilities": {
                            "drop": ["ALL"],
                            "add": ["NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"],
                        }
                    },
                    "readinessProbe": {
                        "exec": {"command": ["cyphonic-agent", "status"]},
                        "periodSeconds": 3,
                    },
                    "volumeMounts": [
                        {"name": "tun", "mountPath": "/dev/net/tun"},
                        {"name": "state", "mountPath": "/state"},
                    ],
                }
            ],
            "volumes": [
                {"name": "tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}},
                {"name": "state", "emptyDir": {}},
            ],
        },
    }


# Resolve the peer through the agent's DNS stub, then ICMP echo over the overlay.
PING = """
import socket, struct, sys, time, dns.resolver
r = dns.resolver.Resolver(configure=False); r.nameservers = ["127.0.0.1"]
addr = r.resolve(sys.argv[1], "A")[0].address
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(3)
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b)); t = (t >> 16) + (t & 0xFFFF)
    return ~(t + (t >> 16)) & 0xFFFF
ok = 0
for seq in range(5):
    body = struct.pack("!HH", 0x4359, seq) + b"cyphonic"
    s.sendto(struct.pack("!BBH", 8, 0, csum(struct.pack("!BBH", 8, 0, 0) + body)) + body,
             (addr, 0))
    try:
        data, _ = s.recvfrom(2048)
        ok += data[20] == 0
    except OSError:
        pass
    time.sleep(0.2)
print(addr, ok)
"""


def test_two_agents_enrol_and_ping_by_fqdn(release: Cluster) -> None:
    from kubernetes import client

    as_pod = release.service_pod("as")
    for name in AGENTS:
        release.exec(as_pod, ["cyphonic-as", "create-node", name])
        token = release.exec(as_pod, ["cyphonic-as", "token", name, "--ttl", "600"])
        token = token.strip().splitlines()[0]
        release.core.create_namespaced_secret(
            NAMESPACE,
            client.V1Secret(
                metadata=client.V1ObjectMeta(name=f"enrol-{name}"),
                data={"token": base64.b64encode(token.encode()).decode()},
            ),
        )
        release.core.create_namespaced_pod(NAMESPACE, _agent_pod(name))
    try:
        for name in AGENTS:
            release.wait_pod_ready(f"agent-{name}")
        deadline = time.monotonic() + 120
        answer = ""
        while time.monotonic() < deadline:
            answer = release.exec("agent-alpha", ["python3", "-c", PING, f"beta.{DOMAIN}"])
            parts = answer.split()
            if len(parts) >= 2 and parts[-1].isdigit() and int(parts[-1]) >= 3:
                break
            time.sleep(3)
        parts = answer.split()
        assert len(parts) >= 2 and int(parts[-1]) >= 3, f"ping over the overlay: {answer}"
        assert parts[-2].startswith("100."), "beta's virtual IPv4 comes from 100.64.0.0/10"
    finally:
        for name in AGENTS:
            release.core.delete_namespaced_pod(f"agent-{name}", NAMESPACE, grace_period_seconds=0)
            release.core.delete_namespaced_secret(f"enrol-{name}", NAMESPACE)
