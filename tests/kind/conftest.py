"""Fixtures of the kind-cluster tests: a throwaway kind cluster with the CYPHONIC images
loaded, the chart installed through Helm's library, and a Kubernetes API client.

Needs `kind`, a working container engine (docker or podman) and the `kubernetes` client
(`make kind-test` adds it to the run). Without them every test here is skipped and the
reason printed. Everything is torn down at the end, also after a failure; set
KIND_KEEP_CLUSTER=1 to keep the cluster for a look around.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cyphonic"
CLUSTER = os.environ.get("KIND_CLUSTER_NAME", "cyphonic-test")
NAMESPACE = "cyphonic"
RELEASE = "cy"
FULLNAME = f"{RELEASE}-cyphonic"
TAG = "kind"
IMAGES = ("as", "nms", "trs", "agent")


def _engine() -> str | None:
    """The first container engine that answers: docker, then podman."""
    for engine in ("docker", "podman"):
        if shutil.which(engine) is None:
            continue
        probe = subprocess.run([engine, "info"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return engine
    return None


def _why_not() -> str | None:
    if shutil.which("kind") is None:
        return "kind is not installed (https://kind.sigs.k8s.io)"
    if _engine() is None:
        return "no working container engine (docker or podman) for kind"
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        return "the kubernetes Python client is missing (run through `make kind-test`)"
    try:
        import helm_python  # noqa: F401
    except ImportError:
        return "helm-python-sdk is missing (dev group)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _why_not()
    if reason is None:
        return
    here = Path(__file__).parent
    marker = pytest.mark.skip(reason=f"kind tests skipped: {reason}")
    skipped = [item for item in items if here in Path(str(item.fspath)).parents]
    for item in skipped:
        item.add_marker(marker)
    if skipped:
        print(f"\nkind tests skipped: {reason}")


def run(*args: str, timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, fail the test with its output when it fails."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@dataclass
class Cluster:
    """A running kind cluster and clients for it."""

    kubeconfig: Path
    core: Any  # kubernetes.client.CoreV1Api
    apps: Any  # kubernetes.client.AppsV1Api
    helm: Any  # helm_python.Config

    def exec(
        self,
        pod: str,
        command: list[str],
        *,
        namespace: str = NAMESPACE,
        container: str | None = None,
    ) -> str:
        """Run a command in a pod and return its output (stdout and stderr)."""
        from kubernetes.stream import stream

        kwargs: dict[str, Any] = {"container": container} if container else {}
        return str(
            stream(
                self.core.connect_get_namespaced_pod_exec,
                pod,
                namespace,
                command=command,
                stderr=True,
                stdin=False,
                stdout=True,
                tty=False,
                _request_timeout=120,
                **kwargs,
            )
        )

    def wait_pod_ready(self, name: str, *, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pod = self.core.read_namespaced_pod(name, NAMESPACE)
            conditions = {c.type: c.status for c in (pod.status.conditions or [])}
            if conditions.get("Ready") == "True":
                return
            if pod.status.phase in ("Failed", "Succeeded"):
                break
            time.sleep(2)
        logs = self.core.read_namespaced_pod_log(name, NAMESPACE, tail_lines=40)
        pytest.fail(f"pod {name} not ready after {timeout}s:\n{logs}")

    def service_pod(self, component: str) -> str:
        pods = self.core.list_namespaced_pod(
            NAMESPACE,
            label_selector=f"app.kubernetes.io/component={component},"
            f"app.kubernetes.io/instance={RELEASE}",
        )
        running = [p.metadata.name for p in pods.items if p.status.phase == "Running"]
        assert running, f"no running {component} pod"
        return running[0]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    import helm_python
    from kubernetes import client, config

    engine = _engine()
    assert engine is not None
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    env = {**os.environ, "KIND_EXPERIMENTAL_PROVIDER": engine}
    run(
        "kind",
        "create",
        "cluster",
        "--name",
        CLUSTER,
        "--kubeconfig",
        str(kubeconfig),
        "--wait",
        "180s",
        env=env,
    )
    try:
        for image in IMAGES:
            ref = f"localhost/cyphonic-{image}:{TAG}"
            run(
                engine,
                "build",
                "-f",
                "deploy/images/Dockerfile",
                "--target",
                image,
                "-t",
                ref,
                ".",
                cwd=REPO,
                timeout=1800,
            )
            archive = kubeconfig.parent / f"{image}.tar"
            run(engine, "save", "-o", str(archive), ref)
            run("kind", "load", "image-archive", str(archive), "--name", CLUSTER, env=env)
            archive.unlink()
        config.load_kube_config(config_file=str(kubeconfig))
        helm = helm_python.Config(kubeconfig_path=kubeconfig, namespace=NAMESPACE)
        yield Cluster(
            kubeconfig=kubeconfig, core=client.CoreV1Api(), apps=client.AppsV1Api(), helm=helm
        )
        helm.close()
    finally:
        if os.environ.get("KIND_KEEP_CLUSTER") != "1":
            subprocess.run(
                ["kind", "delete", "cluster", "--name", CLUSTER],
                env=env,
                capture_output=True,
                timeout=300,
                check=False,
            )


# Values for kind: local images, no cloud load balancer (QUIC Services as ClusterIP; the
# agents run inside the cluster), small replicas.
KIND_VALUES: dict[str, Any] = {
    "image": {"registry": "localhost", "tag": TAG, "pullPolicy": "Never"},
    "as": {"replicas": 1, "service": {"type": "ClusterIP"}},
    "nms": {"replicas": 2, "service": {"type": "ClusterIP"}},
    "trs": {"replicas": 2, "service": {"type": "ClusterIP"}},
    "postgresql": {"persistence": {"size": "1Gi"}},
    "redis": {"persistence": {"enabled": False}},
}
