"""The command line and settings of the TRS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from cyphonic import relay_token
from cyphonic_trs.cli import build_parser, main
from cyphonic_trs.config import TrsSettings
from pydantic import ValidationError


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--replica-id",
        "--quic-port",
        "--redis-url",
        "--public-endpoint",
        "--http-port",
        "--idle-timeout",
    ):
        assert flag in out
    assert {"serve", "replicas", "cid"} <= set(build_parser()._subparsers._group_actions[0].choices)


def test_cid_decodes_and_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cid", "07002a0102030405"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "config": 0,
        "replica": 42,
        "replica_id": "trs-42",
        "nonce": "0102030405",
    }
    assert main(["cid", "e7002a0102030405"]) == 1
    assert "unroutable" in capsys.readouterr().err
    assert main(["cid", "zz"]) == 2


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CYPHONIC_REPLICA_ID", "5")
    monkeypatch.setenv("CYPHONIC_PUBLIC_ENDPOINTS", '["192.0.2.1:443"]')
    assert TrsSettings().replica_id == 5
    assert TrsSettings().public_endpoints == ["192.0.2.1:443"]
    assert TrsSettings(replica_id=9).replica_id == 9
    s = TrsSettings()
    assert s.http_port == 8083 and s.certificate_name == "trs.svc.cyphonic.internal"
    assert s.session_ttl_s == s.idle_timeout_s + 2 * s.sync_interval_s


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValidationError):
        TrsSettings(replica_id=70000)
    with pytest.raises(ValidationError):
        TrsSettings(idle_timeout_s=10, sync_interval_s=10)
    with pytest.raises(ValidationError):
        TrsSettings(cids_per_side=0)
    assert main(["serve", "--replica-id", "-1"]) == 2


def test_relay_secret_local_default_and_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CYPHONIC_RELAY_TOKEN_SECRET", raising=False)
    assert TrsSettings().relay_secrets() == [relay_token.LOCAL_SECRET]
    s = TrsSettings(
        environment="test", relay_token_secret="n" * 20, relay_token_previous_secret="o" * 20
    )
    assert s.relay_secrets() == [b"n" * 20, b"o" * 20]
    with pytest.raises(Exception, match="RELAY_TOKEN_SECRET"):
        TrsSettings(environment="test").relay_secrets()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    # main() configures process-wide logging onto the current (captured, soon closed)
    # stderr; give the tests that run after this one their configuration back.
    saved = structlog.get_config()
    yield
    structlog.reset_defaults()
    structlog.configure(**saved)


@pytest.mark.usefixtures("restore_logging")
def test_serve_without_the_trs_certificate_exits_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No relay-only mode: without trs.crt no node could allocate, so the TRS refuses to start.
    assert (
        main(
            [
                "serve",
                "--pki-dir",
                str(tmp_path),
                "--quic-host",
                "127.0.0.1",
                "--quic-port",
                "0",
                "--no-http",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "trs.crt is missing" in err and "init-pki" in err
