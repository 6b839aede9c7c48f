"""`cyphonic-as pki-bootstrap` (the chart's PKI hook) over an in-memory store of Secrets,
running the real `init_pki`. The kubernetes-client store itself is driven by the install play
(tests/chart/test_install_play.py) against a stand-in API server with the rendered RBAC: no
cluster can run here (kind is the better way, in tests/kind, where it exists)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography import x509
from cyphonic_auth.kube_pki import PkiInconsistent, bootstrap

PREFIX = "cy-cyphonic-pki"


class FakeSecrets:
    """The two calls the bootstrap makes, over a dict of Secrets."""

    def __init__(self) -> None:
        self.store: dict[str, dict[str, bytes]] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.created: list[str] = []

    def get(self, name: str) -> dict[str, bytes] | None:
        return dict(self.store[name]) if name in self.store else None

    def create(self, name: str, files: Mapping[str, bytes], labels: Mapping[str, str]) -> None:
        assert name not in self.store, f"{name} overwritten"
        self.store[name] = dict(files)
        self.labels[name] = dict(labels)
        self.created.append(name)


@pytest.fixture
def bootstrap_run() -> Any:
    api = FakeSecrets()
    printed: list[str] = []

    def run() -> list[str]:
        return bootstrap(
            api,
            prefix=PREFIX,
            domain="example.internal",
            labels={"app.kubernetes.io/part-of": "cyphonic"},
            now=datetime.now(UTC),
            say=printed.append,
        )

    return api, run, printed


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem)[0]


def test_creates_all_secrets_once_and_keeps_them(bootstrap_run: Any) -> None:
    api, run, printed = bootstrap_run
    run()
    assert sorted(api.created) == sorted(f"{PREFIX}-{p}" for p in ("ca", "as", "nms", "trs"))
    assert api.labels[f"{PREFIX}-as"] == {"app.kubernetes.io/part-of": "cyphonic"}
    assert "root-ca.key" not in api.store[f"{PREFIX}-as"]
    assert "root-ca.key" in api.store[f"{PREFIX}-ca"]
    assert "node-ca.key" in api.store[f"{PREFIX}-as"]
    assert not any(k.endswith(".key") and k != "nms.key" for k in api.store[f"{PREFIX}-nms"])
    nms = _cert(api.store[f"{PREFIX}-nms"]["nms.crt"])
    names = nms.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["nms.svc.example.internal"]
    # Never a key in what it prints.
    assert not any("PRIVATE KEY" in line for line in printed)

    before = {k: dict(v) for k, v in api.store.items()}
    api.created.clear()
    assert run() == []  # an upgrade: everything exists
    assert api.created == [] and api.store == before


def test_a_lost_service_secret_is_reissued_under_the_same_ca(bootstrap_run: Any) -> None:
    api, run, _ = bootstrap_run
    run()
    old = dict(api.store.pop(f"{PREFIX}-trs"))
    api.created.clear()
    assert run() == [f"{PREFIX}-trs"]
    new = api.store[f"{PREFIX}-trs"]
    assert new["root-ca.crt"] == old["root-ca.crt"]
    assert new["service-ca.crt"] == old["service-ca.crt"]
    assert new["trs.key"] != old["trs.key"]  # a new key, not a copy of the lost one
    leaf, issuer = x509.load_pem_x509_certificates(new["trs.crt"])[:2]
    assert leaf.issuer == _cert(old["service-ca.crt"]).subject
    leaf.verify_directly_issued_by(issuer)


def _node_cas(api: Any) -> dict[str, bytes]:
    return {n: d["node-ca.crt"] for n, d in api.store.items() if "node-ca.crt" in d}


def test_a_lost_as_secret_never_leaves_nms_and_trs_with_a_stale_node_ca(
    bootstrap_run: Any,
) -> None:
    """Issue 18 row 7: losing the AS Secret (the node CA key) must not produce a new node
    CA next to NMS/TRS Secrets that keep trusting the old one."""
    api, run, _ = bootstrap_run
    run()
    api.store.pop(f"{PREFIX}-as")
    api.created.clear()
    with pytest.raises(PkiInconsistent) as refused:
        run()
    assert len(set(_node_cas(api).values())) <= 1, "NMS/TRS kept a stale node-ca.crt"
    assert api.created == []
    message = refused.value.message
    assert f"{PREFIX}-as" in message and f"{PREFIX}-nms" in message and "backup" in message
    # The documented way out: delete the holders too; all are issued under one new node CA.
    api.store.pop(f"{PREFIX}-nms")
    api.store.pop(f"{PREFIX}-trs")
    run()
    cas = _node_cas(api)
    assert sorted(cas) == sorted(f"{PREFIX}-{p}" for p in ("as", "nms", "trs"))
    assert len(set(cas.values())) == 1


def test_a_lost_ca_secret_is_refused_while_others_carry_the_root(bootstrap_run: Any) -> None:
    api, run, _ = bootstrap_run
    run()
    api.store.pop(f"{PREFIX}-ca")
    api.created.clear()
    with pytest.raises(PkiInconsistent, match=f"{PREFIX}-ca"):
        run()
    assert api.created == []


def test_disagreeing_copies_are_refused(bootstrap_run: Any) -> None:
    api, run, _ = bootstrap_run
    run()
    other = FakeSecrets()
    bootstrap(other, prefix=PREFIX, domain="example.internal", labels={}, now=datetime.now(UTC),
              say=lambda _: None)  # fmt: skip
    api.store[f"{PREFIX}-trs"] = other.store[f"{PREFIX}-trs"]
    api.store.pop(f"{PREFIX}-nms")
    with pytest.raises(PkiInconsistent, match="different"):
        run()
