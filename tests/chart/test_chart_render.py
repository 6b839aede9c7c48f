"""The chart rendered offline by Helm 4's library, for the value sets operators use, and
every object validated against Kubernetes' own schemas (kubernetes-validate, strict: an
unknown or misspelt field fails)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from .conftest import FULLNAME, Rendered, app_containers, containers, pod_spec

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas
# kubernetes-validate ships.
OLDEST_KUBERNETES = "1.28"

EXTERNAL = {
    "postgresql": {"enabled": False},
    "externalDatabase": {"host": "db.example.net", "existingSecret": "cyphonic-db"},
    "redis": {"enabled": False},
    "externalRedis": {"host": "redis.example.net", "existingSecret": "cyphonic-redis", "tls": True},
}
EXTERNAL_DSN = {
    "postgresql": {"enabled": False},
    "externalDatabase": {"existingSecret": "cyphonic-db", "urlKey": "dsn"},
    "redis": {"enabled": False},
    "externalRedis": {"existingSecret": "cyphonic-redis", "urlKey": "url"},
}
REPLICAS = {"as": {"replicas": 3}, "nms": {"replicas": 5}, "trs": {"replicas": 4}}
AUTOSCALING = {
    "nms": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9}},
    "trs": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4}},
}
SINGLE = {"as": {"replicas": 1}, "nms": {"replicas": 1}, "trs": {"replicas": 1}}
EXISTING_SECRETS = {
    "adminToken": {"existingSecret": "ops-admin-token"},
    "relayToken": {"existingSecret": "ops-relay-token"},
    "postgresql": {"existingSecret": "ops-pg"},
    "redis": {"existingSecret": "ops-redis"},
    "pki": {"generate": False, "secretPrefix": "ops-pki"},
}
AGENT_AND_INGRESS = {
    "agent": {"enabled": True, "tokenSecret": "enrolment-tokens", "rootCaSha256": "ab" * 32},
    "as": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "hosts": ["enrol.example.net"],
            "tls": [{"hosts": ["enrol.example.net"], "secretName": "enrol-tls"}],
        },
        "publicEndpoints": ["as.example.net:443"],
    },
    "nms": {
        "publicEndpoints": ["192.0.2.10:443", "[2001:db8::10]:443"],
        "ingress": {
            "enabled": True,
            "hosts": ["console.example.net"],
            "tls": [{"hosts": ["console.example.net"], "secretName": "console-tls"}],
        },
    },
    "trs": {"publicEndpoints": ["198.51.100.20:443"]},
}


def _service_type(kind: str) -> dict[str, Any]:
    node_port = {"nodePort": 30443} if kind != "ClusterIP" else {}
    return {c: {"service": {"type": kind, **node_port}} for c in ("as", "nms", "trs")}


SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external-postgres-redis": EXTERNAL,
    "external-dsn-secrets": EXTERNAL_DSN,
    "several-replicas": REPLICAS,
    "autoscaling": AUTOSCALING,
    "single-replica": SINGLE,
    "existing-secrets": EXISTING_SECRETS,
    "agent-ingress-endpoints": AGENT_AND_INGRESS,
    "service-LoadBalancer": _service_type("LoadBalancer"),
    "service-NodePort": _service_type("NodePort"),
    "service-ClusterIP": _service_type("ClusterIP"),
}


@pytest.fixture(scope="module", params=sorted(SCENARIOS), ids=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest, render: Any) -> tuple[str, Rendered]:
    return request.param, render(SCENARIOS[request.param])


def test_every_object_is_valid_kubernetes(
    scenario: tuple[str, Rendered], kube_validate: Any
) -> None:
    from kubernetes_validate.utils import latest_version

    _, rendered = scenario
    assert len(rendered) >= 15
    for version in (OLDEST_KUBERNETES, latest_version()):
        for m in rendered:
            try:
                kube_validate(m.doc, version)
            except Exception as exc:
                pytest.fail(
                    f"{m.template} {m.kind}/{m.name} invalid for Kubernetes {version}: {exc}"
                )


def test_names_are_unique_and_dns_safe(scenario: tuple[str, Rendered]) -> None:
    _, rendered = scenario
    seen = [(m.kind, m.name) for m in rendered]
    assert len(seen) == len(set(seen)), "duplicate objects"
    for kind, name in seen:
        assert len(name) <= 63 and name == name.lower(), (kind, name)


def test_quic_services_expose_udp_443(scenario: tuple[str, Rendered]) -> None:
    name, rendered = scenario
    for component in ("as", "nms", "trs"):
        service = rendered.get("Service", f"{FULLNAME}-{component}-quic")
        port, tcp = service["spec"]["ports"]
        assert port["protocol"] == "UDP" and port["port"] == 443
        # TCP 443 next to it: QUIC over TLS for nodes whose UDP is blocked.
        assert (tcp["name"], tcp["protocol"], tcp["port"]) == ("quic-tcp", "TCP", 443)
        assert tcp["targetPort"] == "quic-tcp" and "nodePort" not in tcp
        assert port["targetPort"] == "quic"
        expected_type = (
            name.removeprefix("service-") if name.startswith("service-") else "LoadBalancer"
        )
        assert service["spec"]["type"] == expected_type
        if expected_type == "NodePort":
            assert port["nodePort"] == 30443
        # The named target port is a UDP container port of the pods the Service selects.
        kind = "StatefulSet" if component == "trs" else "Deployment"
        workload = rendered.get(kind, f"{FULLNAME}-{component}")
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        (ctr,) = app_containers(workload)
        quic = [p for p in ctr["ports"] if p["name"] in ("quic", "quic-tcp")]
        assert quic == [
            {"name": "quic", "containerPort": 443, "protocol": "UDP"},
            {"name": "quic-tcp", "containerPort": 443, "protocol": "TCP"},
        ]


def test_tcp_443_can_be_turned_off(render: Any) -> None:
    rendered = render({c: {"service": {"tcp": False}} for c in ("as", "nms", "trs")})
    for component in ("as", "nms", "trs"):
        service = rendered.get("Service", f"{FULLNAME}-{component}-quic")
        assert [p["protocol"] for p in service["spec"]["ports"]] == ["UDP"]


def test_admin_services_are_tcp_on_the_admin_port(scenario: tuple[str, Rendered]) -> None:
    _, rendered = scenario
    for component, port in (("as", 8081), ("nms", 8082), ("trs", 8083)):
        service = rendered.get("Service", f"{FULLNAME}-{component}")
        assert service["spec"]["ports"] == [
            {"name": "http", "protocol": "TCP", "port": port, "targetPort": "http"}
        ]


def test_probes_hit_healthz_and_readyz_on_the_admin_port(scenario: tuple[str, Rendered]) -> None:
    _, rendered = scenario
    for component, port in (("as", 8081), ("nms", 8082), ("trs", 8083)):
        kind = "StatefulSet" if component == "trs" else "Deployment"
        (ctr,) = app_containers(rendered.get(kind, f"{FULLNAME}-{component}"))
        http = {p["name"]: p for p in ctr["ports"]}["http"]
        assert http == {"name": "http", "containerPort": port, "protocol": "TCP"}
        env = {e["name"]: e.get("value") for e in ctr["env"]}
        # The process listens where the probes knock: every address, the same port.
        # Dual-stack (issue 18 row 8): IPv4, IPv6 and dual-stack clusters alike.
        assert env["CYPHONIC_HTTP_HOST"] == "::"
        assert env["CYPHONIC_HTTP_PORT"] == str(port)
        assert ctr["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert ctr["startupProbe"]["httpGet"]["port"] == "http"


def test_service_pods_run_non_root_and_bind_443_by_sysctl(scenario: tuple[str, Rendered]) -> None:
    _, rendered = scenario
    for component in ("as", "nms", "trs"):
        kind = "StatefulSet" if component == "trs" else "Deployment"
        doc = rendered.get(kind, f"{FULLNAME}-{component}")
        pod = pod_spec(doc)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "443"} in pod[
            "securityContext"
        ]["sysctls"]
        assert pod["automountServiceAccountToken"] is False
        (ctr,) = app_containers(doc)
        sc = ctr["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False


def test_no_secret_value_is_inlined(scenario: tuple[str, Rendered]) -> None:
    """Secrets reach pods only by reference: no sensitive env var carries a literal value,
    and no generated secret value appears outside its Secret."""
    _, rendered = scenario
    secret_values = {
        base64.b64decode(v).decode()
        for m in rendered.of_kind("Secret")
        for v in (m.doc.get("data") or {}).values()
    }
    sensitive = ("PASSWORD", "SECRET", "TOKEN", "KEY")
    for m in rendered:
        if m.kind == "Secret":
            continue
        text = repr(m.doc)
        for value in secret_values:
            assert value not in text, f"{m.kind}/{m.name} inlines a secret value"
        assert "PRIVATE KEY" not in text
        if "spec" not in m.doc or m.kind in (
            "Service",
            "PodDisruptionBudget",
            "Ingress",
            "HorizontalPodAutoscaler",
        ):
            continue
        if m.kind in ("Role", "RoleBinding", "ServiceAccount", "ConfigMap"):
            continue
        for ctr in containers(m.doc):
            for env in ctr.get("env", []):
                name = env["name"]
                if name.endswith("_FILE"):
                    continue
                if any(word in name for word in sensitive):
                    assert "valueFrom" in env and "secretKeyRef" in env["valueFrom"], (
                        f"{m.kind}/{m.name} {name} is not from a Secret"
                    )
                if "value" in env and "://" in env["value"]:
                    # A URL may carry credentials only as a $(VAR) reference.
                    userinfo = env["value"].split("://", 1)[1].split("@", 1)
                    if len(userinfo) == 2:
                        creds = userinfo[0].split(":", 1)
                        assert len(creds) == 1 or creds[1].startswith("$("), (
                            f"{m.kind}/{m.name} {name} has an inline password"
                        )


def test_database_and_redis_urls_match_the_values(scenario: tuple[str, Rendered]) -> None:
    name, rendered = scenario
    (ctr,) = app_containers(rendered.get("Deployment", f"{FULLNAME}-nms"))
    env = {e["name"]: e for e in ctr["env"]}
    db, redis = env["CYPHONIC_DATABASE_URL"], env["CYPHONIC_REDIS_URL"]
    if name == "external-postgres-redis":
        assert db["value"] == "postgresql+asyncpg://cyphonic@db.example.net:5432/cyphonic"
        assert env["CYPHONIC_DATABASE_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "cyphonic-db",
            "key": "password",
        }
        assert redis["value"] == "rediss://redis.example.net:6379/0"
        assert env["CYPHONIC_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "cyphonic-redis",
            "key": "password",
        }
    elif name == "external-dsn-secrets":
        assert db["valueFrom"]["secretKeyRef"] == {"name": "cyphonic-db", "key": "dsn"}
        assert redis["valueFrom"]["secretKeyRef"] == {"name": "cyphonic-redis", "key": "url"}
    else:
        assert db["value"] == f"postgresql+asyncpg://cyphonic@{FULLNAME}-postgresql:5432/cyphonic"
        assert redis["value"] == f"redis://{FULLNAME}-redis:6379/0"
    # Passwords are never spliced into a URL by $(VAR) expansion (no percent-encoding).
    for e in ctr["env"]:
        assert "$(" not in str(e.get("value", "")), e["name"]
    has_pg = rendered.has("StatefulSet", f"{FULLNAME}-postgresql")
    has_redis = rendered.has("StatefulSet", f"{FULLNAME}-redis")
    assert has_pg == has_redis == (not name.startswith("external"))
