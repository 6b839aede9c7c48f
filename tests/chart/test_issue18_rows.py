"""One test per defect of issue 18's table (what broke when each component ran exactly as the
chart renders it), plus the public /metrics behind the Ingress and the TRS's undeclared httpx.
Rows 1, 7, 8 and 9 are also covered where their subject lives (test_chart_contracts,
test_pki_bootstrap, test_chart_render); the whole install is played in test_install_play."""

from __future__ import annotations

import ast
import asyncio
import json
import socket
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import CHART_DIR, FULLNAME, NAMESPACE, app_containers, helm, pod_spec, render_chart

REPO = CHART_DIR.parents[1]
EXTERNAL_DB = {
    "postgresql": {"enabled": False},
    "externalDatabase": {"host": "db.example.net", "existingSecret": "ops-db"},
}


def _hooks(doc: dict[str, Any]) -> list[str]:
    hook = (doc["metadata"].get("annotations") or {}).get("helm.sh/hook", "")
    return [h for h in hook.split(",") if h]


def _referenced(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """(kind, name) of every Secret, ConfigMap and ServiceAccount a pod template uses."""
    spec = doc["spec"]
    pod = spec["template"]["spec"] if "template" in spec else spec
    refs: set[tuple[str, str]] = set()
    if pod.get("serviceAccountName"):
        refs.add(("ServiceAccount", pod["serviceAccountName"]))
    for volume in pod.get("volumes", []):
        if "secret" in volume and not volume["secret"].get("optional"):
            refs.add(("Secret", volume["secret"]["secretName"]))
        if "configMap" in volume and not volume["configMap"].get("optional"):
            refs.add(("ConfigMap", volume["configMap"]["name"]))
    for ctr in [*pod.get("initContainers", []), *pod["containers"]]:
        for env in ctr.get("env", []):
            source = env.get("valueFrom") or {}
            for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if key in source and not source[key].get("optional"):
                    refs.add((kind, source[key]["name"]))
    return refs


@pytest.mark.parametrize(
    "values",
    [
        {},
        EXTERNAL_DB,
        {**EXTERNAL_DB, "redis": {"enabled": False}, "externalRedis": {"host": "r.example.net"}},
        {"pki": {"generate": False, "secretPrefix": "ops-pki"}},
    ],
    ids=["defaults", "external-db-in-chart-redis", "external-db-redis", "own-pki"],
)
def test_row2_hooks_need_only_what_exists_at_their_phase(render: Any, values: Any) -> None:
    """A pre-install hook can use only what the operator made beforehand (the Secrets named
    by existingSecret values) and hooks of the same phase with a lower weight; the
    release's own objects do not exist yet."""
    rendered = render(values)
    operator_made = {
        ("Secret", name)
        for name in (
            values.get("externalDatabase", {}).get("existingSecret"),
            values.get("externalRedis", {}).get("existingSecret"),
        )
        if name
    }
    for m in rendered:
        if "pre-install" not in _hooks(m.doc) or m.kind not in ("Job", "Pod"):
            continue
        weight = int(m.annotations.get("helm.sh/hook-weight", "0"))
        earlier = {
            (o.kind, o.name)
            for o in rendered
            if "pre-install" in _hooks(o.doc)
            and int(o.annotations.get("helm.sh/hook-weight", "0")) < weight
        }
        missing = _referenced(m.doc) - earlier - operator_made
        assert not missing, f"pre-install {m.kind}/{m.name} needs {sorted(missing)}"


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"quicContainerPort": 8443},
        {"quicContainerPort": 8443, "unprivilegedPortSysctl": False},
        {"quicContainerPort": 443, "as": {"http": {"port": 80}}},
        {"quicContainerPort": 2000, "nms": {"http": {"port": 900}}},
    ],
    ids=["defaults", "quic-8443", "quic-8443-no-sysctl", "as-http-80", "nms-http-900"],
)
def test_row3_every_port_a_pod_binds_is_unprivileged_for_it(render: Any, values: Any) -> None:
    rendered = render(values)
    for component in ("as", "nms", "trs"):
        kind = "StatefulSet" if component == "trs" else "Deployment"
        doc = rendered.get(kind, f"{FULLNAME}-{component}")
        sysctls = {
            s["name"]: int(s["value"]) for s in pod_spec(doc)["securityContext"].get("sysctls", [])
        }
        start = sysctls.get("net.ipv4.ip_unprivileged_port_start", 1024)
        (ctr,) = app_containers(doc)
        for port in ctr["ports"]:
            assert port["containerPort"] >= start, (
                f"{component}: port {port['name']}={port['containerPort']} is privileged "
                f"(net.ipv4.ip_unprivileged_port_start={start}); uid "
                f"{pod_spec(doc)['securityContext']['runAsUser']} cannot bind it"
            )


def test_row4_agents_in_the_cluster_are_told_a_reachable_as_endpoint(render: Any) -> None:
    rendered = render({"agent": {"enabled": True, "tokenSecret": "tokens"}})
    (ctr,) = app_containers(rendered.get("Deployment", f"{FULLNAME}-as"))
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    (endpoint,) = json.loads(env["CYPHONIC_AS_ENDPOINTS"])
    host, port = endpoint.rsplit(":", 1)
    service_name, namespace, svc = host.split(".")
    assert (namespace, svc) == (NAMESPACE, "svc")
    service = rendered.get("Service", service_name)
    assert {"protocol": "UDP", "port": int(port)}.items() <= service["spec"]["ports"][0].items()
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "as"
    # And the AS itself accepts it.
    from cyphonic_auth.config import AuthSettings

    assert AuthSettings(as_endpoints=env["CYPHONIC_AS_ENDPOINTS"]).as_endpoints == [endpoint]
    # Set by the operator, it wins.
    rendered = render({"as": {"publicEndpoints": ["as.example.net:443"]}})
    (ctr,) = app_containers(rendered.get("Deployment", f"{FULLNAME}-as"))
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    assert json.loads(env["CYPHONIC_AS_ENDPOINTS"]) == ["as.example.net:443"]


# Endpoints and whether the programs accept them: (text, as (names allowed), nms/trs (IP)).
ENDPOINT_SAMPLES = [
    ("192.0.2.7:443", True, True),
    ("[2001:db8::7]:443", True, True),
    ("[::ffff:192.0.2.1]:443", True, True),
    ("relay.example.net:443", True, False),
    ("as.example.net:65535", True, False),
    ("192.0.2.7:99999", False, False),
    ("192.0.2.7:0", False, False),
    ("192.0.2.7:65536", False, False),
    ("[2001:db8:::7]:443", False, False),
    ("300.1.1.1:443", True, False),  # a DNS name of digits, to the AS
    ("[2001:db8::7]", True, True),  # no port: 443
    ("2001:db8::7", True, True),
    ("192.0.2.7", True, True),
    ("[2001:db8::7]:", False, False),
    ("", False, False),
    ("bad_name.example:443", False, False),
]


@pytest.mark.parametrize(("text", "as_ok", "ip_ok"), ENDPOINT_SAMPLES)
def test_rows5_6_the_schema_refuses_what_the_programs_refuse(
    chart: Any, text: str, as_ok: bool, ip_ok: bool
) -> None:
    """The values schema and the services' settings agree on every endpoint: the TRS and
    NMS take addresses only (row 5), ports are 1..65535 (row 6)."""
    from cyphonic_auth.config import AuthSettings
    from cyphonic_trs.config import TrsSettings
    from pydantic import ValidationError

    def program_accepts(build: Any) -> bool:
        try:
            build()
        except ValidationError:
            return False
        return True

    def schema_accepts(values: dict[str, Any]) -> bool:
        try:
            chart.validate_schema(values)
        except helm.HelmValuesError:
            return False
        return True

    checks = {
        "as.publicEndpoints (AS CYPHONIC_AS_ENDPOINTS)": (
            {"as": {"publicEndpoints": [text]}},
            lambda: AuthSettings(as_endpoints=[text]),
        ),
        "nms.publicEndpoints (AS CYPHONIC_NMS_ENDPOINTS)": (
            {"nms": {"publicEndpoints": [text]}},
            lambda: AuthSettings(nms_endpoints=[text]),
        ),
        "trs.publicEndpoints (TRS CYPHONIC_PUBLIC_ENDPOINTS)": (
            {"trs": {"publicEndpoints": [text]}},
            lambda: TrsSettings(public_endpoints=[text]),
        ),
    }
    for what, (values, build) in checks.items():
        schema, program = schema_accepts(values), program_accepts(build)
        assert schema == program, (
            f"{what} = {text!r}: the chart's schema {'accepts' if schema else 'refuses'} it, "
            f"the program {'accepts' if program else 'refuses'} it"
        )
    assert program_accepts(lambda: AuthSettings(as_endpoints=[text])) == as_ok
    assert program_accepts(lambda: TrsSettings(public_endpoints=[text])) == (ip_ok and as_ok)


def test_row8_admin_socket_is_dual_stack_as_rendered(render: Any) -> None:
    """The admin REST socket bound where the chart says answers the probes over IPv4 and
    IPv6 (an IPv6-only cluster probes the pod's IPv6 address)."""
    from cyphonic.admin import AdminServer, create_admin_app

    (ctr,) = app_containers(render().get("Deployment", f"{FULLNAME}-nms"))
    host = {e["name"]: e.get("value") for e in ctr["env"]}["CYPHONIC_HTTP_HOST"]

    async def probe() -> list[int]:
        server = AdminServer(
            create_admin_app(service="t", title="t", admin_token=None), host=host, port=0
        )
        await server.start()
        try:
            answers = []
            for address in ("127.0.0.1", "[::1]"):
                url = f"http://{address}:{server.port}/healthz"

                def get(url: str = url) -> int:
                    with urllib.request.urlopen(url, timeout=5) as answer:
                        return int(answer.status)

                answers.append(await asyncio.to_thread(get))
            return answers
        finally:
            await server.stop()

    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    assert asyncio.run(probe()) == [200, 200], f"CYPHONIC_HTTP_HOST={host!r}"


def test_ingress_exposes_only_what_nodes_outside_need(render: Any) -> None:
    rendered = render({"as": {"ingress": {"enabled": True, "hosts": ["enrol.example.net"]}}})
    ingress = rendered.get("Ingress", f"{FULLNAME}-as")
    (rule,) = ingress["spec"]["rules"]
    paths = {(p["path"], p["pathType"]) for p in rule["http"]["paths"]}
    assert paths == {
        ("/v1/enrol", "Exact"),
        ("/v1/enrol/info", "Exact"),
        ("/v1/crl", "Exact"),
        ("/v1/ca", "Exact"),
    }
    # Those are routes of the AS without the admin token; /metrics, /nodes, /docs are not.
    from cyphonic_auth.api import create_app

    app_routes = _public_routes(create_app)
    for path, _ in paths:
        assert path in app_routes, f"Ingress path {path} is no public route of the AS"


def _public_routes(create_app: Any) -> set[str]:
    import inspect

    source = inspect.getsource(inspect.getmodule(create_app))  # type: ignore[arg-type]
    found = set()
    tree = ast.parse(source)
    prefixes = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", "") == "APIRouter"
        ):
            for kw in node.value.keywords:
                if kw.arg == "prefix" and isinstance(kw.value, ast.Constant):
                    prefixes[node.targets[0].id] = kw.value.value  # type: ignore[attr-defined]
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef):
            uses_admin = any(
                "AdminAuth" in ast.unparse(a.annotation or ast.Constant(None))
                for a in node.args.args
            )
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute):
                    router = getattr(dec.func.value, "id", "")
                    if router in prefixes and dec.args and not uses_admin:
                        found.add(prefixes[router] + dec.args[0].value)  # type: ignore[attr-defined]
    return found


# ------------------------------------------------------------------ dependencies (TRS httpx)

MEMBERS = {
    "cyphonic": REPO / "lib" / "src" / "cyphonic",
    "cyphonic-auth": REPO / "services" / "auth" / "src" / "cyphonic_auth",
    "cyphonic-nms": REPO / "services" / "nms" / "src" / "cyphonic_nms",
    "cyphonic-trs": REPO / "services" / "trs" / "src" / "cyphonic_trs",
    "cyphonic-agent": REPO / "node-agent" / "src" / "cyphonic_agent",
}


def _closure(package: str, lock: dict[str, Any]) -> set[str]:
    """Distribution names installed by `uv sync --no-dev --package <package>`."""
    by_name = {p["name"]: p for p in lock["package"]}
    seen: set[str] = set()
    todo = [package]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for dep in by_name[name].get("dependencies", []):
            todo.append(dep["name"])
    return seen


def _imported(src: Path) -> set[str]:
    names: set[str] = set()
    for path in src.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_every_imported_distribution_is_declared_by_the_member(member: str) -> None:
    """What a member imports is installed with it alone (its image): lib/revocation.py's
    httpx crashed the TRS image."""
    import importlib.metadata
    import sys

    lock = tomllib.loads((REPO / "uv.lock").read_text())
    closure = _closure(member, lock)
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported(MEMBERS[member]) - set(sys.stdlib_module_names)):
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if not owners:
            continue  # a workspace module not installed under that name, or a test-only one
        if not owners & closure:
            missing[module] = sorted(owners)
    assert not missing, f"{member} imports {missing} without declaring them"


def test_the_chart_renders_with_schema_errors_naming_value_and_program(chart: Any) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render_chart(chart, {"trs": {"publicEndpoints": ["relay.example.net:443"]}})
    assert "/trs/publicEndpoints/0" in str(caught.value)
