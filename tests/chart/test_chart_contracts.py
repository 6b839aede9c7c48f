"""What the chart promises beyond valid YAML: hook order, kept secrets, the values schema's
refusals, strict lint, and that its settings and files match what the services read."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from sqlalchemy.engine import make_url

from .conftest import (
    CHART_DIR,
    FULLNAME,
    app_containers,
    helm,
    kubelet_env,
    pod_spec,
    render_chart,
)

# ------------------------------------------------------------------------------ hooks


def _hooks(annotations: dict[str, str]) -> set[str]:
    return set(annotations.get("helm.sh/hook", "").split(","))


@pytest.mark.parametrize("external", [True, False], ids=["external-db", "in-chart-db"])
def test_migrations_run_before_the_services_that_need_the_schema(
    render: Any, external: bool
) -> None:
    values = (
        {
            "postgresql": {"enabled": False},
            "externalDatabase": {"host": "db", "existingSecret": "db"},
        }
        if external
        else {}
    )
    rendered = render(values)
    # Every pod that needs the schema migrates (or finds it at head) before it starts.
    for component in ("as", "nms"):
        pod = pod_spec(rendered.get("Deployment", f"{FULLNAME}-{component}"))
        (init,) = pod["initContainers"]
        assert init["command"] == [f"cyphonic-{component}"]
        assert init["args"][0] == "migrate" and "--wait" in init["args"]
    # The TRS uses no schema: it starts without waiting for one.
    assert "initContainers" not in pod_spec(rendered.get("StatefulSet", f"{FULLNAME}-trs"))
    # With an external database a hook Job also migrates before anything rolls out; the
    # in-chart database does not exist while pre-install hooks run, so no Job then (and
    # never a post-install one: `helm install --wait` would wait for it forever).
    jobs = [m for m in rendered if m.kind == "Job" and m.name == f"{FULLNAME}-migrate"]
    if external:
        (job,) = jobs
        assert _hooks(job.annotations) == {"pre-install", "pre-upgrade"}
        pki = next(m for m in rendered if m.kind == "Job" and m.name == f"{FULLNAME}-pki")
        assert int(pki.annotations["helm.sh/hook-weight"]) < int(
            job.annotations["helm.sh/hook-weight"]
        )
    else:
        assert jobs == []
    for m in rendered:
        if m.kind in ("Deployment", "StatefulSet"):
            assert not m.is_hook, f"{m.kind}/{m.name} must not be a hook"
        assert "post-install" not in _hooks(m.annotations) or m.kind == "Pod", m.name


def test_pki_job_rbac_is_limited_to_its_secrets(render: Any) -> None:
    rendered = render()
    role = rendered.get("Role", f"{FULLNAME}-pki")
    get_rule, create_rule = role["rules"]
    assert get_rule["verbs"] == ["get"] and create_rule["verbs"] == ["create"]
    assert sorted(get_rule["resourceNames"]) == sorted(
        f"{FULLNAME}-pki-{p}" for p in ("as", "ca", "nms", "trs")
    )
    # Hook helpers exist before the Job and go away after it.
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        m = next(x for x in rendered if x.kind == kind and x.name == f"{FULLNAME}-pki")
        assert int(m.annotations["helm.sh/hook-weight"]) < -10
        assert "hook-succeeded" in m.annotations["helm.sh/hook-delete-policy"]
    job = rendered.get("Job", f"{FULLNAME}-pki")
    assert pod_spec(job)["serviceAccountName"] == f"{FULLNAME}-pki"
    # The AS image's own subcommand (the kubernetes client), not a script from the chart.
    (ctr,) = app_containers(job)
    assert "command" not in ctr and ctr["args"][0] == "pki-bootstrap"
    assert f"--prefix={FULLNAME}-pki" in ctr["args"]


def test_pki_job_absent_when_operator_brings_the_secrets(render: Any) -> None:
    rendered = render({"pki": {"generate": False, "secretPrefix": "ops-pki"}})
    assert not [m for m in rendered if m.name.endswith("-pki")]
    deployment = rendered.get("Deployment", f"{FULLNAME}-nms")
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert volumes["pki"]["secret"]["secretName"] == "ops-pki-nms"


def test_generated_secrets_are_kept_and_existing_ones_used(render: Any) -> None:
    rendered = render()
    generated = {m.name: m for m in rendered.of_kind("Secret")}
    assert set(generated) == {
        f"{FULLNAME}-{n}"
        for n in ("admin-token", "relay-token", "session-tickets", "postgresql", "redis")
    }
    for m in generated.values():
        assert m.annotations["helm.sh/resource-policy"] == "keep"
    # Offline rendering has no cluster to look up: each rendering makes new values.
    again = {m.name: m.doc["data"] for m in render().of_kind("Secret")}
    assert all(again[n] != m.doc["data"] for n, m in generated.items())

    rendered = render(
        {
            "adminToken": {"existingSecret": "ops-admin"},
            "relayToken": {"existingSecret": "ops-relay"},
            "sessionTickets": {"existingSecret": "ops-tickets"},
            "postgresql": {"existingSecret": "ops-pg"},
            "redis": {"existingSecret": "ops-redis"},
        }
    )
    assert rendered.of_kind("Secret") == []
    (ctr,) = app_containers(rendered.get("Deployment", f"{FULLNAME}-nms"))
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in ctr["env"]
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    }
    assert refs == {
        "CYPHONIC_DATABASE_PASSWORD": "ops-pg",
        "CYPHONIC_REDIS_PASSWORD": "ops-redis",
        "CYPHONIC_RELAY_TOKEN_SECRET": "ops-relay",
        "CYPHONIC_SESSION_TICKET_SECRET": "ops-tickets",
    }
    volumes = {
        v["name"]: v for v in pod_spec(rendered.get("Deployment", f"{FULLNAME}-nms"))["volumes"]
    }
    assert volumes["admin-token"]["secret"]["secretName"] == "ops-admin"


# ------------------------------------------------------------------------------ replicas


def test_replicas_pdbs_and_autoscalers(render: Any) -> None:
    rendered = render({"as": {"replicas": 3}, "nms": {"replicas": 4}, "trs": {"replicas": 5}})
    assert rendered.get("Deployment", f"{FULLNAME}-as")["spec"]["replicas"] == 3
    assert rendered.get("Deployment", f"{FULLNAME}-nms")["spec"]["replicas"] == 4
    assert rendered.get("StatefulSet", f"{FULLNAME}-trs")["spec"]["replicas"] == 5
    assert {m.name for m in rendered.of_kind("PodDisruptionBudget")} == {
        f"{FULLNAME}-{c}" for c in ("as", "nms", "trs")
    }
    assert rendered.of_kind("HorizontalPodAutoscaler") == []

    single = render({"as": {"replicas": 1}, "nms": {"replicas": 1}, "trs": {"replicas": 1}})
    # A PDB on one replica would block every node drain.
    assert single.of_kind("PodDisruptionBudget") == []

    scaled = render(
        {
            "nms": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 8}},
            "trs": {"autoscaling": {"enabled": True}},
        }
    )
    hpas = {m.name: m.doc["spec"] for m in scaled.of_kind("HorizontalPodAutoscaler")}
    assert hpas[f"{FULLNAME}-nms"]["scaleTargetRef"]["kind"] == "Deployment"
    assert hpas[f"{FULLNAME}-nms"]["minReplicas"] == 3
    assert hpas[f"{FULLNAME}-trs"]["scaleTargetRef"]["kind"] == "StatefulSet"
    # The HPA owns the replica count.
    assert "replicas" not in scaled.get("Deployment", f"{FULLNAME}-nms")["spec"]
    assert "replicas" not in scaled.get("StatefulSet", f"{FULLNAME}-trs")["spec"]


def test_trs_replica_number_is_the_statefulset_ordinal(render: Any) -> None:
    (ctr,) = app_containers(render().get("StatefulSet", f"{FULLNAME}-trs"))
    env = {e["name"]: e for e in ctr["env"]}
    assert (
        env["CYPHONIC_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.labels['apps.kubernetes.io/pod-index']"
    )


def test_trs_fetches_the_crl_from_the_as_service(render: Any) -> None:
    rendered = render({"as": {"http": {"port": 9081}}})
    (ctr,) = app_containers(rendered.get("StatefulSet", f"{FULLNAME}-trs"))
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    as_service = rendered.get("Service", f"{FULLNAME}-as")
    assert as_service["spec"]["ports"][0]["port"] == 9081
    assert env["CYPHONIC_AS_URL"] == f"http://{FULLNAME}-as:9081"


def test_public_endpoints_reach_the_services(render: Any) -> None:
    rendered = render(
        {
            "as": {"publicEndpoints": ["as.example.net:443"]},
            "nms": {"publicEndpoints": ["192.0.2.7:443", "[2001:db8::7]:443"]},
            "trs": {"publicEndpoints": ["198.51.100.9:443"]},
        }
    )

    def env_of(kind: str, component: str) -> dict[str, Any]:
        (ctr,) = app_containers(rendered.get(kind, f"{FULLNAME}-{component}"))
        return {e["name"]: e.get("value") for e in ctr["env"]}

    as_env = env_of("Deployment", "as")
    assert json.loads(as_env["CYPHONIC_AS_ENDPOINTS"]) == ["as.example.net:443"]
    # What the AS tells nodes about the NMS is the NMS's public address.
    assert json.loads(as_env["CYPHONIC_NMS_ENDPOINTS"]) == ["192.0.2.7:443", "[2001:db8::7]:443"]
    assert json.loads(env_of("Deployment", "nms")["CYPHONIC_PUBLIC_QUIC_ADDRESSES"]) == [
        "192.0.2.7:443",
        "[2001:db8::7]:443",
    ]
    assert json.loads(env_of("StatefulSet", "trs")["CYPHONIC_PUBLIC_ENDPOINTS"]) == [
        "198.51.100.9:443"
    ]


# ------------------------------------------------------------------------------ agent


def test_agent_daemonset_has_tun_and_net_admin(render: Any) -> None:
    rendered = render({"agent": {"enabled": True, "tokenSecret": "tokens"}})
    ds = rendered.get("DaemonSet", f"{FULLNAME}-agent")
    pod = pod_spec(ds)
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    assert agent["args"][0] == "up"
    assert agent["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["NET_ADMIN", "NET_BIND_SERVICE"],
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dev-net-tun"]["hostPath"] == {"path": "/dev/net/tun", "type": "CharDevice"}
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert mounts["dev-net-tun"] == "/dev/net/tun"
    (enroll,) = pod["initContainers"]
    script = enroll["command"][-1]
    assert "cyphonic-agent enroll" in script and "--token-file" in script
    assert "--token " not in script  # tokens never on a command line
    env = {e["name"]: e.get("value") for e in enroll["env"]}
    assert env["AS_URL"] == f"http://{FULLNAME}-as.overlay.svc:8081"
    assert not render().has("DaemonSet", f"{FULLNAME}-agent")


def test_helm_test_checks_every_readyz(render: Any) -> None:
    rendered = render()
    pod = rendered.get("Pod", f"{FULLNAME}-test-readyz")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    urls = [a for a in pod["spec"]["containers"][0]["command"] if a.startswith("http://")]
    assert urls == [
        f"http://{FULLNAME}-{c}:{p}/readyz" for c, p in (("as", 8081), ("nms", 8082), ("trs", 8083))
    ]


def test_notes_tell_how_to_enrol_a_first_node(chart: Any) -> None:
    out = chart.render({}, name="cy", namespace="overlay", is_install=True)
    notes = next(v for k, v in out.items() if k.endswith("NOTES.txt"))
    assert f"deploy/{FULLNAME}-as -- cyphonic-as create-node" in notes
    assert "cyphonic-as token" in notes and "cyphonic-agent enroll" in notes
    assert "nms.publicEndpoints" in notes  # unset by default: the operator is told


# ------------------------------------------------------------------------------ schema

BAD_VALUES = [
    ({"nms": {"replicas": "two"}}, "/nms/replicas", "want integer"),
    ({"nms": {"replica": 2}}, "'replica' not allowed", ""),
    ({"tpyo": True}, "'tpyo' not allowed", ""),
    ({"as": {"service": {"type": "External"}}}, "/as/service/type", "LoadBalancer"),
    ({"trs": {"service": {"port": 70000}}}, "/trs/service/port", "want 65,535"),
    ({"nms": {"publicEndpoints": ["nms.example.net:443"]}}, "/nms/publicEndpoints/0", "pattern"),
    ({"logLevel": "verbose"}, "/logLevel", "debug"),
    ({"domain": "Not A Domain"}, "/domain", "pattern"),
    ({"as": {"service": {"nodePort": 80}}}, "/as/service/nodePort", "want 30,000"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "IfNotPresent"),
    ({"nms": {"ipv4Pool": "10.0.0.0/8"}}, "/nms/ipv4Pool", "pattern"),
]


@pytest.mark.parametrize(
    ("values", "where", "what"),
    BAD_VALUES,
    ids=[next(iter(v)) + "-" + str(i) for i, (v, _, _) in enumerate(BAD_VALUES)],
)
def test_schema_rejects_bad_values_with_a_clear_message(
    chart: Any, values: dict[str, Any], where: str, what: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(values)
    message = str(caught.value)
    assert where in message and what in message, message
    # Rendering (what `helm install` does) refuses the same values.
    with pytest.raises(helm.HelmError):
        render_chart(chart, values)


def test_schema_accepts_the_documented_values(chart: Any) -> None:
    chart.validate_schema({})
    chart.validate_schema(
        {
            "nms": {"publicEndpoints": ["192.0.2.1:443", "[2001:db8::1]:443"]},
            "trs": {"publicEndpoints": ["198.51.100.20:443"]},
            "as": {"service": {"type": "NodePort", "nodePort": 30443}},
        }
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"postgresql": {"enabled": False}}, "externalDatabase.existingSecret"),
        (
            {"postgresql": {"enabled": False}, "externalDatabase": {"existingSecret": "db"}},
            "externalDatabase.host",
        ),
        ({"redis": {"enabled": False}}, "externalRedis.host"),
        ({"nms": {"offlineTimeoutSeconds": 10}}, "offlineTimeoutSeconds must be longer"),
        ({"agent": {"enabled": True}}, "agent.tokenSecret"),
        ({"unprivilegedPortSysctl": False}, "quicContainerPort and as.http.port >= 1024"),
    ],
)
def test_inconsistent_values_fail_rendering_with_what_to_set(
    chart: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render_chart(chart, values)
    assert message in str(caught.value)


# ------------------------------------------------------------------------------ lint


@pytest.mark.parametrize(
    "values",
    [
        {},
        {
            "postgresql": {"enabled": False},
            "externalDatabase": {"host": "db", "existingSecret": "db"},
            "redis": {"enabled": False},
            "externalRedis": {"host": "redis"},
        },
    ],
    ids=["defaults", "external"],
)
def test_lint_strict_is_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART_DIR, values, strict=True, namespace="overlay")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_lint_strict_reports_schema_violations() -> None:
    report = helm.lint(CHART_DIR, {"trs": {"replicas": 0}}, strict=True)
    assert any("/trs/replicas" in e for e in report["errors"]), report


# ------------------------------------------------------------------------------ contracts


def _service_settings() -> dict[str, Any]:
    from cyphonic_auth.config import AuthSettings
    from cyphonic_nms.config import NmsSettings
    from cyphonic_trs.config import TrsSettings

    return {"as": AuthSettings, "nms": NmsSettings, "trs": TrsSettings}


def test_every_cyphonic_env_var_is_a_setting_of_its_service(render: Any) -> None:
    """A CYPHONIC_* variable the service does not know would be silently ignored."""
    rendered = render(
        {
            "as": {"publicEndpoints": ["as.example.net:443"]},
            "nms": {"publicEndpoints": ["192.0.2.7:443"], "ipv6Pool": "fd00:1::/48"},
            "trs": {"publicEndpoints": ["198.51.100.9:443"]},
        }
    )
    for component, settings in _service_settings().items():
        kind = "StatefulSet" if component == "trs" else "Deployment"
        (ctr,) = app_containers(rendered.get(kind, f"{FULLNAME}-{component}"))
        names = [e["name"] for e in ctr["env"] if e["name"].startswith("CYPHONIC_")]
        unknown = [
            n for n in names if n.removeprefix("CYPHONIC_").lower() not in settings.model_fields
        ]
        assert unknown == [], f"{component}: {unknown} are not settings of {settings.__name__}"


def test_rendered_env_values_parse_as_the_services_settings(
    render: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The literal values the chart sets (lists as JSON, numbers as strings) are accepted
    by each service's settings class."""
    rendered = render(
        {
            "as": {"publicEndpoints": ["as.example.net:443"]},
            "nms": {"publicEndpoints": ["192.0.2.7:443", "[2001:db8::7]:443"]},
            "trs": {"publicEndpoints": ["198.51.100.9:443"]},
        }
    )
    token = tmp_path / "admin-token"
    token.write_text("t" * 40)
    # Issue 18 row 9: passwords with URL-special characters reach the database and Redis
    # intact (the kubelet's $(VAR) expansion would splice them into the URL raw).
    password = "p@ss/w:rd%40?#x"
    secrets = {
        (f"{FULLNAME}-postgresql", "password"): password,
        (f"{FULLNAME}-redis", "password"): password,
        (f"{FULLNAME}-relay-token", "relay-token-secret"): "r" * 32,
        (f"{FULLNAME}-session-tickets", "session-ticket-secret"): "s" * 48,
    }
    fields = {"metadata.name": "nms-0", "metadata.labels['apps.kubernetes.io/pod-index']": "1"}
    for component, settings in _service_settings().items():
        kind = "StatefulSet" if component == "trs" else "Deployment"
        (ctr,) = app_containers(rendered.get(kind, f"{FULLNAME}-{component}"))
        env = kubelet_env(ctr["env"], secrets=secrets, fields=fields)
        with monkeypatch.context() as mp:
            for name in [n for n in os.environ if n.startswith("CYPHONIC_")]:
                mp.delenv(name)
            for name, value in env.items():
                mp.setenv(name, value)
            mp.setenv("CYPHONIC_ADMIN_TOKEN_FILE", str(token))
            parsed = settings()
        assert parsed.environment == "production"
        assert parsed.quic_port == 443 and parsed.http_host == "::"
        url = make_url(parsed.database_url)
        assert (url.username, url.password, url.host) == (
            "cyphonic",
            password,
            f"{FULLNAME}-postgresql",
        ), f"{component}: chart value postgresql password vs the URL the service uses"
        assert parsed.redis_url is not None
        redis_url = urlsplit(parsed.redis_url)
        assert unquote(redis_url.password or "") == password
        assert redis_url.hostname == f"{FULLNAME}-redis"
    from cyphonic_auth.config import AuthSettings

    with monkeypatch.context() as mp:
        (ctr,) = app_containers(rendered.get("Deployment", f"{FULLNAME}-as"))
        for e in ctr["env"]:
            if e["name"] in ("CYPHONIC_AS_ENDPOINTS", "CYPHONIC_NMS_ENDPOINTS"):
                mp.setenv(e["name"], e["value"])
        auth = AuthSettings()
    assert auth.nms_endpoints == ["192.0.2.7:443", "[2001:db8::7]:443"]
    assert auth.as_endpoints == ["as.example.net:443"]


def test_admin_app_serves_the_probed_endpoints() -> None:
    """The probes' paths exist on the admin app every service builds on."""
    from cyphonic.admin import create_admin_app

    app = create_admin_app(service="chart_probe", title="probe", admin_token=None)
    paths = {getattr(r, "path", None) for r in app.routes}
    assert {"/healthz", "/readyz", "/metrics"} <= paths


def test_pki_secret_layout_matches_what_init_pki_writes_and_services_load(tmp_path: Path) -> None:
    from cyphonic.pki import init_pki, load_identity, load_trust_store
    from cyphonic_auth.kube_pki import LAYOUT as layout

    init_pki(tmp_path, domain="cyphonic.internal", now=datetime.now(UTC))
    written = {p.name for p in tmp_path.iterdir()}
    for part, files in layout.items():
        assert set(files) <= written, f"{part}: {set(files) - written} not made by init-pki"
    # Each service's Secret alone is enough for what the service loads at start.
    for svc in ("as", "nms", "trs"):
        mounted = tmp_path / f"mounted-{svc}"
        mounted.mkdir()
        for name in layout[svc]:
            (mounted / name).write_bytes((tmp_path / name).read_bytes())
        identity = load_identity(mounted / f"{svc}.crt", mounted / f"{svc}.key")
        assert identity.chain, f"{svc}.crt must hold the intermediate too"
        load_trust_store(mounted)
        assert not any(n.startswith("root-ca.key") for n in layout[svc])
    assert "node-ca.key" in layout["as"] and "node-ca.key" not in layout["nms"]


@pytest.mark.parametrize(
    "expression",
    [
        "as.publicEndpoints={203.0.113.10:443}",
        "nms.publicEndpoints={203.0.113.11:443}",
        "trs.publicEndpoints={203.0.113.12:443}",
        "postgresql.enabled=false,externalDatabase.host=db.example.net,"
        "externalDatabase.existingSecret=cyphonic-db",
        "redis.enabled=false,externalRedis.host=redis.example.net,"
        "externalRedis.existingSecret=cyphonic-redis",
        "agent.enabled=true,agent.tokenSecret=agent-tokens",
        "image.registry=registry.example.net/cyphonic",
        "nms.ingress.enabled=true,nms.ingress.hosts={console.example.net},"
        "nms.ingress.tls[0].hosts={console.example.net},"
        "nms.ingress.tls[0].secretName=console-tls",
    ],
)
def test_documented_set_flags_are_accepted(chart: Any, expression: str) -> None:
    """The `--set` lines of docs/kubernetes.md and NOTES.txt parse and pass the schema."""
    docs = (CHART_DIR.parents[1] / "docs" / "kubernetes.md").read_text()
    for part in expression.split(","):
        assert part in docs, f"{part} is not in docs/kubernetes.md"
    chart.validate_schema(helm.parse_set_string(expression))
