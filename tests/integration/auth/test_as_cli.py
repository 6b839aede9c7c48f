"""``cyphonic-as`` subcommands called in-process on SQLite (test_as_e2e runs the processes)."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from cyphonic_auth.cli import main


@pytest.fixture
def as_env_vars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("CYPHONIC_DATABASE_URL", f"sqlite:///{tmp_path / 'as.db'}")
    monkeypatch.setenv("CYPHONIC_PKI_DIR", str(tmp_path / "pki"))
    monkeypatch.delenv("CYPHONIC_ADMIN_TOKEN", raising=False)
    # main() configures process-wide logging onto the current (captured, soon closed)
    # stderr; give the tests that run after this one their configuration back.
    saved = structlog.get_config()
    yield tmp_path
    structlog.reset_defaults()
    structlog.configure(**saved)


def test_operator_commands(as_env_vars: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init-pki"]) == 0
    created = capsys.readouterr().out
    assert "root-ca.key" in created and "node-ca.crt" in created and "as.key" in created
    key_mode = stat.S_IMODE((as_env_vars / "pki" / "node-ca.key").stat().st_mode)
    assert key_mode == 0o600
    assert main(["init-pki"]) == 0
    assert "nothing created" in capsys.readouterr().out

    assert main(["migrate"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["create-node", "printer", "--tag", "owner=ops", "--device", "model=x1"]) == 0
    assert capsys.readouterr().out.strip() == "printer.cyphonic.internal"
    assert main(["create-node", "printer"]) == 1
    assert "already_exists" in capsys.readouterr().err

    assert main(["token", "printer", "--ttl", "600"]) == 0
    captured = capsys.readouterr()
    token = captured.out.strip()
    assert token.startswith("cye_") and "printer.cyphonic.internal" in captured.err
    assert main(["token", "nobody"]) == 1
    assert "not_found" in capsys.readouterr().err

    assert main(["revoke", "printer", "--reason", "retired"]) == 0
    assert "1 new revocation" in capsys.readouterr().out
    assert main(["token", "printer"]) == 1
    assert "permission_denied" in capsys.readouterr().err


def test_bad_usage_and_settings(
    as_env_vars: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["create-node"])
    assert usage.value.code == 2
    monkeypatch.setenv("CYPHONIC_NMS_ENDPOINTS", "nms.example.net:443")
    assert main(["migrate"]) == 2
    assert "bad settings" in capsys.readouterr().err
    monkeypatch.setenv("CYPHONIC_NMS_ENDPOINTS", "192.0.2.1:443, [2001:db8::1]:443")
    assert main(["migrate"]) == 0


def test_serve_without_pki_fails_cleanly(
    as_env_vars: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--migrate", "--http-port", "0", "--no-quic"]) == 1
    assert "node-ca" in capsys.readouterr().err
