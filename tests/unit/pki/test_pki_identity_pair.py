"""Replacing a key and its certificate as a pair, and recovering from a crash midway."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cyphonic import pki
from cyphonic.errors import InvalidArgument

NOW = datetime.datetime.now(datetime.UTC)
FQDN = "n.cyphonic.internal"


@pytest.fixture(scope="module")
def node_ca() -> pki.CertifiedKey:
    root = pki.create_root_ca("root", now=NOW)
    return pki.create_intermediate_ca(root, "node-ca", now=NOW)


def issued(
    node_ca: pki.CertifiedKey,
) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
    key = pki.generate_key()
    cert = pki.sign_node_csr(node_ca, pki.make_csr(key, FQDN), fqdn=FQDN, now=NOW)
    return key, [cert, node_ca.cert]


def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "node.crt", tmp_path / "node.key"


def test_write_then_load_and_nothing_left_over(node_ca: pki.CertifiedKey, tmp_path: Path) -> None:
    cert_path, key_path = paths(tmp_path)
    key, certs = issued(node_ca)
    pki.write_identity(cert_path, key_path, key=key, certs=certs)
    new_key, new_certs = issued(node_ca)
    pki.write_identity(cert_path, key_path, key=new_key, certs=new_certs)
    loaded = pki.recover_identity(cert_path, key_path)
    assert loaded.cert == new_certs[0] and loaded.key.public_key() == new_key.public_key()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.crt", "node.key"]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    with pytest.raises(InvalidArgument, match="not for the key"):
        pki.write_identity(cert_path, key_path, key=key, certs=new_certs)


@pytest.mark.parametrize("crash_at", [0, 1, 2, 3, 4, 5])
def test_a_crash_at_any_step_leaves_a_matching_pair(
    node_ca: pki.CertifiedKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    crash_at: int,
) -> None:
    """``crash_at`` counts the file operations (writes of the staged files and of the kept
    pair, then the two renames) before the process dies."""
    cert_path, key_path = paths(tmp_path)
    old_key, old_certs = issued(node_ca)
    pki.write_identity(cert_path, key_path, key=old_key, certs=old_certs)
    new_key, new_certs = issued(node_ca)

    steps = [0]
    real_replace = os.replace

    def dying_replace(src: object, dst: object) -> None:
        if steps[0] == crash_at:
            raise SystemExit("power cut")
        steps[0] += 1
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(SystemExit):
        pki.write_identity(cert_path, key_path, key=new_key, certs=new_certs)
    monkeypatch.setattr(os, "replace", real_replace)

    recovered = pki.recover_identity(cert_path, key_path)
    assert recovered.cert in (old_certs[0], new_certs[0])
    expected_key = new_key if recovered.cert == new_certs[0] else old_key
    assert recovered.key.public_key() == expected_key.public_key()
    # The pair in place now matches, and no staged file is left behind.
    assert pki.load_identity(cert_path, key_path).cert == recovered.cert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.crt", "node.key"]
    if crash_at >= 2:  # both staged files were complete: the renewal is finished
        assert recovered.cert == new_certs[0]


def test_no_matching_pair_is_an_invalid_argument(node_ca: pki.CertifiedKey, tmp_path: Path) -> None:
    cert_path, key_path = paths(tmp_path)
    _key, certs = issued(node_ca)
    other, _ = issued(node_ca)
    pki.write_certificates(cert_path, certs)
    pki.write_private_key(key_path, other)
    with pytest.raises(InvalidArgument, match="not a matching"):
        pki.recover_identity(cert_path, key_path)
