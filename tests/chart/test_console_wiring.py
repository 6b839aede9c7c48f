"""The chart's wiring of the NMS web console (docs/console.md, issue 17 item 1): the NMS
reaches the AS admin API for revoke and every TRS replica's admin API through StatefulSet
pod DNS, with the one admin token all services mount; an optional Ingress that is TLS only;
NOTES that say how to open the console. The install play drives the same wiring live."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from .conftest import FULLNAME, NAMESPACE, app_containers, helm, pod_spec, render_chart

INGRESS = {
    "enabled": True,
    "className": "nginx",
    "hosts": ["console.example.net"],
    "tls": [{"hosts": ["console.example.net"], "secretName": "console-tls"}],
}


def _env(rendered: Any, kind: str, name: str) -> dict[str, Any]:
    (ctr,) = app_containers(rendered.get(kind, name))
    return {e["name"]: e.get("value") for e in ctr["env"]}


def test_nms_revokes_at_the_same_as_url_as_the_trs(render: Any) -> None:
    rendered = render({"as": {"http": {"port": 9081}}})
    nms = _env(rendered, "Deployment", f"{FULLNAME}-nms")
    trs = _env(rendered, "StatefulSet", f"{FULLNAME}-trs")
    assert nms["CYPHONIC_AS_URL"] == trs["CYPHONIC_AS_URL"] == f"http://{FULLNAME}-as:9081"
    assert rendered.get("Service", f"{FULLNAME}-as")["spec"]["ports"][0]["port"] == 9081


@pytest.mark.parametrize("replicas", [1, 4])
def test_trs_admin_template_names_every_statefulset_pod(render: Any, replicas: int) -> None:
    """{replica} filled with an ordinal gives <statefulset>-<n>.<governing service>.<ns>.svc
    at the TRS's admin container port; the governing Service is headless and selects the
    TRS pods (so cluster DNS has a record per pod, ready or not)."""
    rendered = render({"trs": {"replicas": replicas, "http": {"port": 9083}}})
    template = _env(rendered, "Deployment", f"{FULLNAME}-nms")["CYPHONIC_TRS_ADMIN_URL_TEMPLATE"]
    sts = rendered.get("StatefulSet", f"{FULLNAME}-trs")
    governing = rendered.get("Service", sts["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["spec"]["publishNotReadyAddresses"] is True
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert governing["spec"]["selector"].items() <= labels.items()
    (ctr,) = app_containers(sts)
    admin = next(p["containerPort"] for p in ctr["ports"] if p["name"] == "http")
    assert admin == 9083
    for n in range(replicas):
        # As the console fills it (cyphonic_nms.console: str.replace of "{replica}").
        assert template.replace("{replica}", str(n)) == (
            f"http://{sts['metadata']['name']}-{n}.{governing['metadata']['name']}"
            f".{NAMESPACE}.svc:{admin}"
        )


def test_nms_calls_as_and_trs_with_the_admin_token_every_service_mounts(
    render: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No separate AS/TRS token is set for the NMS, so it sends its own admin token; that
    token is the file from the one admin-token Secret the AS and TRS also mount."""
    from cyphonic_nms.config import NmsSettings

    rendered = render({})
    secret_names = set()
    for kind, component in (("Deployment", "as"), ("Deployment", "nms"), ("StatefulSet", "trs")):
        doc = rendered.get(kind, f"{FULLNAME}-{component}")
        (ctr,) = app_containers(doc)
        env = {e["name"]: e.get("value") for e in ctr["env"]}
        assert "CYPHONIC_AS_ADMIN_TOKEN" not in env and "CYPHONIC_TRS_ADMIN_TOKEN" not in env
        path = Path(env["CYPHONIC_ADMIN_TOKEN_FILE"])
        (mount,) = [m for m in ctr["volumeMounts"] if m["mountPath"] == str(path.parent)]
        (volume,) = [v for v in pod_spec(doc)["volumes"] if v["name"] == mount["name"]]
        assert [i["path"] for i in volume["secret"]["items"]] == [path.name]
        secret_names.add((volume["secret"]["secretName"], volume["secret"]["items"][0]["key"]))
    assert secret_names == {(f"{FULLNAME}-admin-token", "admin-token")}

    env = _env(rendered, "Deployment", f"{FULLNAME}-nms")
    token = tmp_path / "admin-token"
    token.write_text("a" * 40 + "\n")
    with monkeypatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("CYPHONIC_")]:
            mp.delenv(name)
        for name in ("CYPHONIC_AS_URL", "CYPHONIC_TRS_ADMIN_URL_TEMPLATE"):
            mp.setenv(name, env[name])
        mp.setenv("CYPHONIC_ADMIN_TOKEN_FILE", str(token))
        settings = NmsSettings()
    assert settings.as_url == env["CYPHONIC_AS_URL"]
    assert settings.trs_admin_url_template == env["CYPHONIC_TRS_ADMIN_URL_TEMPLATE"]
    assert settings.as_admin_token is None and settings.trs_admin_token is None
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "a" * 40  # what console.py falls back to


def test_console_ingress_is_off_by_default(render: Any) -> None:
    assert not [m for m in render({}) if m.kind == "Ingress"]


def test_console_ingress_serves_the_whole_nms_admin_port_over_tls(render: Any) -> None:
    rendered = render({"nms": {"ingress": INGRESS}})
    ingress = rendered.get("Ingress", f"{FULLNAME}-nms")
    assert ingress["spec"]["tls"] == INGRESS["tls"]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "console.example.net"
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    backend = path["backend"]["service"]
    assert backend == {"name": f"{FULLNAME}-nms", "port": {"name": "http"}}
    assert rendered.get("Service", f"{FULLNAME}-nms")["spec"]["ports"][0]["name"] == "http"


@pytest.mark.parametrize(
    ("ingress", "message"),
    [
        ({"enabled": True, "hosts": ["console.example.net"]}, "needs nms.ingress.tls"),
        ({"enabled": True, "tls": INGRESS["tls"]}, "needs nms.ingress.hosts"),
    ],
    ids=["no-tls", "no-hosts"],
)
def test_console_ingress_without_tls_or_host_fails(
    chart: Any, ingress: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render_chart(chart, {"nms": {"ingress": ingress}})
    assert message in str(caught.value)


def test_schema_refuses_unknown_console_ingress_keys(chart: Any) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema({"nms": {"ingress": {"enabeld": True}}})
    assert "'enabeld' not allowed" in str(caught.value)
    chart.validate_schema({"nms": {"ingress": INGRESS}})


@pytest.mark.parametrize("port", [8082, 9082])
def test_notes_tell_how_to_open_the_console(chart: Any, port: int) -> None:
    out = chart.render(
        {"nms": {"http": {"port": port}, "ingress": INGRESS}},
        name="cy",
        namespace="overlay",
        is_install=True,
    )
    notes = next(v for k, v in out.items() if k.endswith("NOTES.txt"))
    forward = "8082" if port == 8082 else f"8082:{port}"
    assert f"kubectl -n overlay port-forward svc/cy-cyphonic-nms {forward}\n" in notes
    assert "http://127.0.0.1:8082/" in notes
    assert "get secret cy-cyphonic-admin-token -o jsonpath='{.data.admin-token}'" in notes
    assert "https://console.example.net/" in notes
