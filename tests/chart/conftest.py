"""Fixtures of the chart tests: the chart loaded once through Helm's own library
(helm-python-sdk, Helm 4, offline) and a renderer returning parsed manifests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (dev group)")

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "cyphonic"
RELEASE = "cy"
NAMESPACE = "overlay"
FULLNAME = f"{RELEASE}-cyphonic"


@dataclass(frozen=True)
class Manifest:
    """One rendered Kubernetes object and the template it came from."""

    template: str
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.doc["metadata"].get("annotations") or {})

    @property
    def is_hook(self) -> bool:
        return "helm.sh/hook" in self.annotations


class Rendered(list[Manifest]):
    """The objects of one rendering, with lookups by kind and name."""

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for m in self:
            if m.kind == kind and m.name == name:
                return m.doc
        raise KeyError(f"no {kind}/{name}; have {sorted((m.kind, m.name) for m in self)}")

    def of_kind(self, kind: str) -> list[Manifest]:
        return [m for m in self if m.kind == kind]

    def has(self, kind: str, name: str) -> bool:
        return any(m.kind == kind and m.name == name for m in self)


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    loaded = helm.Chart.load(CHART_DIR)
    yield loaded
    loaded.close()


def render_chart(chart: Any, values: dict[str, Any] | None = None) -> Rendered:
    """Render offline as `helm install` would (schema checked first), parse every document."""
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    rendered = Rendered()
    for template, text in sorted(out.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                rendered.append(Manifest(template=template, doc=doc))
    return rendered


@pytest.fixture(scope="session")
def render(chart: Any) -> Callable[[dict[str, Any] | None], Rendered]:
    return lambda values=None: render_chart(chart, values)


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Containers and init containers of a workload or Pod."""
    spec = doc["spec"]
    pod = spec["template"]["spec"] if "template" in spec else spec
    return [*pod.get("initContainers", []), *pod["containers"]]


def app_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers of a workload or Pod, without its init containers."""
    return list(pod_spec(doc)["containers"])


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return spec["template"]["spec"] if "template" in spec else spec


@pytest.fixture(scope="session")
def kube_validate() -> Iterator[Callable[[dict[str, Any], str], str]]:
    """kubernetes-validate's `validate`, strict, with its schema files read once per run.

    The library re-reads the whole definitions file for every object (0.2 s each); the
    contents are only read, so caching them changes nothing but the time.
    """
    import functools

    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    from kubernetes_validate import utils

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils, "schema_contents", functools.cache(utils.schema_contents))
        yield lambda doc, version: kv.validate(doc, version, strict=True)


def kubelet_env(
    env: list[dict[str, Any]],
    *,
    secrets: dict[tuple[str, str], str],
    fields: dict[str, str] | None = None,
) -> dict[str, str]:
    """A container's environment as the kubelet makes it: ``secretKeyRef`` and ``fieldRef``
    resolved from ``secrets[(name, key)]`` and ``fields[fieldPath]``, and ``$(VAR)``
    references to variables defined earlier in the list expanded (``$$`` escapes); a
    reference to an unknown variable stays as written, as Kubernetes leaves it."""
    import re

    out: dict[str, str] = {}
    for item in env:
        name = item["name"]
        if "value" in item:
            value = str(item["value"])

            def expand(m: re.Match[str]) -> str:
                if m.group(0) == "$$":
                    return "$"
                return out.get(m.group(1), m.group(0))

            out[name] = re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, value)
            continue
        source = item.get("valueFrom") or {}
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            key = (ref["name"], ref["key"])
            if key not in secrets:
                if ref.get("optional"):
                    continue
                raise KeyError(f"env {name}: Secret {ref['name']} has no key {ref['key']}")
            out[name] = secrets[key]
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            if fields is None or path not in fields:
                raise KeyError(f"env {name}: no value for fieldRef {path}")
            out[name] = fields[path]
        else:
            raise KeyError(f"env {name}: unsupported source {source}")
    return out
