"""The chart's access-policy default (docs/policy.md): ``nms.policyDefault`` reaches every NMS
pod as ``CYPHONIC_POLICY_DEFAULT``; the schema takes only allow or deny."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import FULLNAME, app_containers, helm, render_chart


def _nms_env(rendered: Any) -> dict[str, Any]:
    (ctr,) = app_containers(rendered.get("Deployment", f"{FULLNAME}-nms"))
    return {e["name"]: e.get("value") for e in ctr["env"]}


def test_allow_by_default_and_deny_when_asked(render: Any) -> None:
    assert _nms_env(render({}))["CYPHONIC_POLICY_DEFAULT"] == "allow"
    assert _nms_env(render({"nms": {"policyDefault": "deny"}}))["CYPHONIC_POLICY_DEFAULT"] == "deny"


def test_schema_refuses_another_default(chart: Any) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render_chart(chart, {"nms": {"policyDefault": "maybe"}})
    assert "policyDefault" in str(caught.value)
