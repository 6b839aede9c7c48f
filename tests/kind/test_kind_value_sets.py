"""The install-play value sets (tests/chart/value_sets.py) on a real kind cluster: each
installed with `--wait` in a namespace of its own, `helm test`, uninstalled. The default set
(with the agents, the upgrade and the kept secrets) is test_kind_install.py."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from .conftest import CHART, KIND_VALUES, REPO, Cluster


def _value_sets() -> dict[str, dict[str, Any]]:
    # tests/chart/value_sets.py, shared with the install play (tests is not a package).
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cyphonic_value_sets", REPO / "tests" / "chart" / "value_sets.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.VALUE_SETS)


VALUE_SETS = _value_sets()

pytestmark = [pytest.mark.kind, pytest.mark.timeout(1800)]

NOT_ON_KIND = {
    "external-postgres-redis": "needs a PostgreSQL and a Redis reachable from the kind nodes "
    "(the install play covers it against this machine's servers)",
    "ipv6": "needs an IPv6 kind cluster (networking.ipFamily: ipv6); the install play covers it",
}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("value_set", sorted(set(VALUE_SETS) - {"default"}))
def test_value_set_installs_ready_and_passes_helm_test(cluster: Cluster, value_set: str) -> None:
    if value_set in NOT_ON_KIND:
        pytest.skip(f"{value_set} on kind: {NOT_ON_KIND[value_set]}")
    release = f"vs{abs(hash(value_set)) % 10_000}"
    namespace = f"cyphonic-{value_set}"[:63]
    values = _merge(KIND_VALUES, VALUE_SETS[value_set])
    import helm_python

    helm = helm_python.Config(kubeconfig_path=cluster.kubeconfig, namespace=namespace)
    helm.install(
        str(CHART),
        release,
        values,
        namespace=namespace,
        create_namespace=True,
        wait="watcher",
        timeout=900,
    )
    try:
        result = helm.test(release, timeout=300, logs=True)
        logs = json.dumps(result)
        for component in ("as", "nms", "trs"):
            port = values.get(component, {}).get("http", {}).get("port")
            assert "/readyz 200" in logs and (port is None or f":{port}/" in logs), logs
    finally:
        helm.uninstall(release, wait="watcher", timeout=300)
        helm.close()
