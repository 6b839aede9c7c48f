"""The chart's PKI hook script (charts/cyphonic/files/pki-bootstrap.py) against an in-memory
stand-in for the Kubernetes Secret API, running the real `cyphonic-as init-pki`."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from .conftest import CHART_DIR

PREFIX = "cy-cyphonic-pki"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location(
        "pki_bootstrap", CHART_DIR / "files" / "pki-bootstrap.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeSecrets:
    """The two calls the script makes, over a dict of Secrets."""

    def __init__(self) -> None:
        self.namespace = "overlay"
        self.store: dict[str, dict[str, str]] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.created: list[str] = []

    def get_secret(self, name: str) -> dict[str, str] | None:
        return dict(self.store[name]) if name in self.store else None

    def create_secret(self, name: str, files: dict[str, bytes], labels: dict[str, str]) -> None:
        assert name not in self.store, f"{name} overwritten"
        self.store[name] = {k: v.decode() for k, v in files.items()}
        self.labels[name] = labels
        self.created.append(name)


@pytest.fixture
def bootstrap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    if shutil.which("cyphonic-as") is None:
        pytest.fail("cyphonic-as is not on PATH (run through `uv run`)")
    module = _load()
    api = FakeSecrets()
    monkeypatch.setattr(module, "Api", lambda: api)
    counter = iter(range(100))

    def run() -> int:
        work = tmp_path / f"work-{next(counter)}"
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "pki-bootstrap",
                f"--prefix={PREFIX}",
                "--domain=example.internal",
                f"--work-dir={work}",
                "--label=app.kubernetes.io/part-of=cyphonic",
            ],
        )
        return int(module.main())

    return api, run


def _cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem.encode())[0]


def test_creates_all_secrets_once_and_keeps_them(bootstrap: Any) -> None:
    api, run = bootstrap
    assert run() == 0
    assert sorted(api.created) == sorted(f"{PREFIX}-{p}" for p in ("ca", "as", "nms", "trs"))
    assert api.labels[f"{PREFIX}-as"] == {"app.kubernetes.io/part-of": "cyphonic"}
    assert "root-ca.key" in api.store[f"{PREFIX}-ca"]
    assert "node-ca.key" in api.store[f"{PREFIX}-as"]
    assert not any(k.endswith(".key") and k != "nms.key" for k in api.store[f"{PREFIX}-nms"])
    nms = _cert(api.store[f"{PREFIX}-nms"]["nms.crt"])
    names = nms.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["nms.svc.example.internal"]

    before = {k: dict(v) for k, v in api.store.items()}
    api.created.clear()
    assert run() == 0  # an upgrade: everything exists
    assert api.created == [] and api.store == before


def test_a_lost_service_secret_is_reissued_under_the_same_ca(bootstrap: Any) -> None:
    api, run = bootstrap
    assert run() == 0
    old = dict(api.store.pop(f"{PREFIX}-trs"))
    api.created.clear()
    assert run() == 0
    assert api.created == [f"{PREFIX}-trs"]
    new = api.store[f"{PREFIX}-trs"]
    assert new["root-ca.crt"] == old["root-ca.crt"]
    assert new["service-ca.crt"] == old["service-ca.crt"]
    assert new["trs.key"] != old["trs.key"]  # a new key, not a copy of the lost one
    leaf, issuer = x509.load_pem_x509_certificates(new["trs.crt"].encode())[:2]
    assert leaf.issuer == _cert(old["service-ca.crt"]).subject
    leaf.verify_directly_issued_by(issuer)


def _node_cas(api: Any) -> dict[str, str]:
    return {name: data["node-ca.crt"] for name, data in api.store.items() if "node-ca.crt" in data}


def test_a_lost_as_secret_never_leaves_nms_and_trs_with_a_stale_node_ca(
    bootstrap: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 18 row 7: losing the AS Secret (the node CA key) must not produce a new node
    CA next to NMS/TRS Secrets that keep trusting the old one."""
    api, run = bootstrap
    assert run() == 0
    api.store.pop(f"{PREFIX}-as")
    api.created.clear()
    status = run()
    # Whatever the script does, the node CA copies must agree afterwards.
    assert len(set(_node_cas(api).values())) <= 1, "NMS/TRS kept a stale node-ca.crt"
    assert status == 1 and api.created == []
    err = capsys.readouterr().err
    assert f"{PREFIX}-as" in err and f"{PREFIX}-nms" in err and "backup" in err
    # The documented way out: delete the holders too; all are issued under one new node CA.
    api.store.pop(f"{PREFIX}-nms")
    api.store.pop(f"{PREFIX}-trs")
    assert run() == 0
    cas = _node_cas(api)
    assert sorted(cas) == sorted(f"{PREFIX}-{p}" for p in ("as", "nms", "trs"))
    assert len(set(cas.values())) == 1


def test_a_lost_ca_secret_is_refused_while_others_carry_the_root(
    bootstrap: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    api, run = bootstrap
    assert run() == 0
    api.store.pop(f"{PREFIX}-ca")
    api.created.clear()
    assert run() == 1 and api.created == []
    assert f"{PREFIX}-ca" in capsys.readouterr().err
