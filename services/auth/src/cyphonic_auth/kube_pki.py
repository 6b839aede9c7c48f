"""``cyphonic-as pki-bootstrap``: the CA hierarchy kept in Kubernetes Secrets (the chart's
pre-install/pre-upgrade hook Job runs it with its service account).

    cyphonic-as pki-bootstrap --prefix cy-cyphonic-pki --domain cyphonic.internal \\
        --label app.kubernetes.io/part-of=cyphonic

The existing Secrets ``<prefix>-{ca,as,nms,trs}`` are read back into a private work
directory, ``init_pki`` completes what is missing there (it keeps every file it finds), and
only the missing Secrets are created. The guarantees:

- **never overwrite**: a Secret that exists is never updated, replaced or deleted; the Job's
  Role grants ``get`` on the four names and ``create``, nothing else;
- **kept across uninstall**: the Secrets carry no Helm ownership;
- **no stale CA**: a lost Secret that held a CA key while other Secrets still carry that CA's
  certificate is refused, creating nothing (a new CA would leave the NMS and TRS trusting the
  old one), and so are Secrets that already disagree about a CA certificate;
- **never print a key**: only Secret and file names are printed.

The store of Secrets is a Protocol: ``KubernetesSecrets`` (the ``kubernetes`` client with the
pod's in-cluster configuration) in the Job, a dict in unit tests.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from cyphonic.errors import AlreadyExists, InvalidArgument, Unavailable
from cyphonic.pki import init_pki

TRUST = ["root-ca.crt", "node-ca.crt", "service-ca.crt"]
LAYOUT: dict[str, list[str]] = {
    "ca": ["root-ca.crt", "root-ca.key", "service-ca.crt", "service-ca.key"],
    "as": [*TRUST, "node-ca.key", "as.crt", "as.key"],
    "nms": [*TRUST, "nms.crt", "nms.key"],
    "trs": [*TRUST, "trs.crt", "trs.key"],
}
"""What each Secret holds; ``-ca`` is mounted by no pod (keep it, or move it offline)."""

CA_KEYS: dict[str, list[str]] = {"ca": ["root-ca.crt", "service-ca.crt"], "as": ["node-ca.crt"]}
"""The Secret holding each CA's key, and the certificates of those CAs copied elsewhere."""


class PkiInconsistent(InvalidArgument):
    """The existing PKI Secrets cannot be completed without leaving one stale."""


class SecretStore(Protocol):
    """The two Secret calls the bootstrap makes."""

    def get(self, name: str) -> dict[str, bytes] | None:
        """The data of Secret ``name``, or None when it does not exist."""

    def create(self, name: str, files: Mapping[str, bytes], labels: Mapping[str, str]) -> None:
        """Create an Opaque Secret; ``AlreadyExists`` if one appeared meanwhile."""


class KubernetesSecrets:
    """Secrets of the pod's own namespace through the ``kubernetes`` client (in-cluster)."""

    NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

    def __init__(self, namespace: str | None = None) -> None:
        from kubernetes import client, config

        config.load_incluster_config()  # type: ignore[no-untyped-call]
        self._api = client.CoreV1Api()
        self._client = client
        self.namespace = namespace or self.NAMESPACE_FILE.read_text().strip()

    def get(self, name: str) -> dict[str, bytes] | None:
        import base64

        from kubernetes.client.exceptions import ApiException

        try:
            found = self._api.read_namespaced_secret(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise Unavailable(f"reading Secret {name}: API answered {exc.status}") from exc
        return {k: base64.b64decode(v) for k, v in (found.data or {}).items()}

    def create(self, name: str, files: Mapping[str, bytes], labels: Mapping[str, str]) -> None:
        import base64

        from kubernetes.client.exceptions import ApiException

        body = self._client.V1Secret(
            api_version="v1",
            kind="Secret",
            type="Opaque",
            metadata=self._client.V1ObjectMeta(name=name, labels=dict(labels)),
            data={k: base64.b64encode(v).decode() for k, v in files.items()},
        )
        try:
            self._api.create_namespaced_secret(self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                raise AlreadyExists(f"Secret {name} appeared meanwhile; run again") from exc
            raise Unavailable(f"creating Secret {name}: API answered {exc.status}") from exc


def inconsistency(prefix: str, existing: Mapping[str, Mapping[str, bytes] | None]) -> str | None:
    """Why the existing Secrets cannot be completed safely, or None (see the module doc)."""
    for part, certs in CA_KEYS.items():
        if existing.get(part) is not None:
            continue
        holders = sorted(
            f"{prefix}-{other}"
            for other, data in existing.items()
            if data is not None and any(name in data for name in certs)
        )
        if holders:
            return (
                f"Secret {prefix}-{part} (the key of {', '.join(certs)}) is missing while "
                f"{', '.join(holders)} still hold the old certificate; a new CA would leave "
                f"them stale. Restore {prefix}-{part} from a backup, or delete "
                f"{', '.join(holders)} as well so that everything is issued anew under a new "
                f"CA (every node then enrols again)."
            )
    for name in TRUST:
        seen = {
            f"{prefix}-{part}": bytes(data[name])
            for part, data in existing.items()
            if data is not None and name in data
        }
        if len(set(seen.values())) > 1:
            return (
                f"Secrets {', '.join(sorted(seen))} hold different {name}; delete the stale "
                f"ones (their holders are issued anew) or restore them from a backup."
            )
    return None


def bootstrap(
    store: SecretStore,
    *,
    prefix: str,
    domain: str,
    labels: Mapping[str, str],
    now: datetime.datetime,
    say: Callable[[str], Any] = print,
) -> list[str]:
    """Create the missing PKI Secrets; the names created. ``PkiInconsistent`` when the
    existing ones cannot be completed safely (nothing is created then)."""
    existing = {part: store.get(f"{prefix}-{part}") for part in LAYOUT}
    missing = [part for part, data in existing.items() if data is None]
    if not missing:
        say(f"pki: all Secrets {prefix}-{{{','.join(LAYOUT)}}} exist, kept")
        return []
    problem = inconsistency(prefix, existing)
    if problem:
        raise PkiInconsistent(problem)
    work = Path(tempfile.mkdtemp(prefix="pki-"))
    try:
        work.chmod(0o700)
        for data in existing.values():
            for name, content in (data or {}).items():
                path = work / name
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(content)
        init_pki(work, domain=domain, now=now)
        planned: dict[str, dict[str, bytes]] = {}
        for part in missing:
            files = {n: (work / n).read_bytes() for n in LAYOUT[part] if (work / n).exists()}
            absent = sorted(set(LAYOUT[part]) - set(files))
            if part != "ca" and absent:
                raise PkiInconsistent(f"cannot build {prefix}-{part}: missing {absent}")
            planned[part] = files
    finally:
        shutil.rmtree(work, ignore_errors=True)
    created = []
    for part, files in planned.items():
        store.create(f"{prefix}-{part}", files, labels)
        created.append(f"{prefix}-{part}")
        say(f"pki: created Secret {prefix}-{part} ({', '.join(sorted(files))})")
    return created
