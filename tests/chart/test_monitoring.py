"""Issue 17 item 4: the chart's optional ServiceMonitor, PrometheusRule and Grafana dashboard.
The names they use are checked against what the running services export in the install play
(test_install_play.check_monitoring); here, their shape and wiring."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from .conftest import CHART_DIR, FULLNAME, NAMESPACE, render_chart

ENABLED = {
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    }
}
DOCS = CHART_DIR.parents[1] / "docs" / "kubernetes.md"


def monitoring_objects(chart: Any) -> tuple[dict[str, Any], str]:
    """The rendered PrometheusRule and the dashboard JSON text."""
    rendered = render_chart(chart, ENABLED)
    rule = rendered.get("PrometheusRule", FULLNAME)
    dashboard = rendered.get("ConfigMap", f"{FULLNAME}-dashboard")["data"]["cyphonic.json"]
    return rule, dashboard


def documented_metrics() -> set[str]:
    """Metric names in the table of docs/kubernetes.md's "Metrics" section."""
    text = DOCS.read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(cyphonic_[a-z0-9_]+)`", section, re.M))


def test_nothing_is_rendered_by_default(render: Any) -> None:
    kinds = {m.kind for m in render()}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert not render().has("ConfigMap", f"{FULLNAME}-dashboard")


def test_service_monitor_scrapes_the_admin_services(render: Any) -> None:
    rendered = render(ENABLED)
    monitor = rendered.get("ServiceMonitor", FULLNAME)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    selector = monitor["spec"]["selector"]
    (expr,) = selector["matchExpressions"]
    scraped = []
    for service in rendered.of_kind("Service"):
        labels = service.doc["metadata"]["labels"]
        if not selector["matchLabels"].items() <= labels.items():
            continue
        if labels.get("app.kubernetes.io/component") not in expr["values"]:
            continue
        ports = [p for p in service.doc["spec"]["ports"] if p.get("name") == endpoint["port"]]
        if ports:
            scraped.append(service.name)
            assert ports[0]["protocol"] == "TCP"
    assert sorted(scraped) == sorted(f"{FULLNAME}-{c}" for c in ("as", "nms", "trs"))


def test_rules_and_dashboard_are_well_formed(chart: Any) -> None:
    rule, dashboard_text = monitoring_objects(chart)
    rules = rule["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"CyphonicServiceDown", "CyphonicRelayDrops"}
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning")
        assert f'namespace="{NAMESPACE}"' in r["expr"], r["alert"]
        assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]
        assert re.fullmatch(r"[0-9]+m", r["for"])
    dashboard = json.loads(dashboard_text)
    assert dashboard == json.loads((CHART_DIR / "files" / "grafana-dashboard.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    # What issue 17 asks the dashboard to show.
    for wanted in ("Online nodes", "Registrations", "Route decisions", "Relay bytes",
                   "Relay packets", "refusals", "Revocations"):  # fmt: skip
        assert any(wanted.lower() in t.lower() for t in titles), wanted
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert "$namespace" in target["expr"], panel["title"]


def test_every_metric_named_by_the_chart_is_documented(chart: Any) -> None:
    rule, dashboard = monitoring_objects(chart)
    documented = documented_metrics()
    assert documented, "docs/kubernetes.md has no metrics table"
    used = set(re.findall(r"cyphonic_[a-z0-9_]+", json.dumps(rule) + dashboard))
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", u) for u in used}
    families.discard("cyphonic_")
    undocumented = sorted(f for f in families if f not in documented)
    assert not undocumented, undocumented


@pytest.mark.parametrize("part", ["serviceMonitor", "prometheusRule", "grafanaDashboard"])
def test_each_part_can_be_turned_on_alone(render: Any, part: str) -> None:
    rendered = render({"monitoring": {part: {"enabled": True}}})
    kinds = {"serviceMonitor": "ServiceMonitor", "prometheusRule": "PrometheusRule"}
    if part in kinds:
        assert rendered.of_kind(kinds[part])
    else:
        assert rendered.has("ConfigMap", f"{FULLNAME}-dashboard")
