"""``cyphonic-agent up`` refuses what it cannot run with, saying why (exit status 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cyphonic_agent.cli import build_parser, main


def test_missing_state_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["up", "--state-dir", str(tmp_path / "nothing"),
                 "--status-socket", str(tmp_path / "status.sock")])
    assert code == 1
    err = capsys.readouterr().err
    assert "invalid_argument" in err and "cyphonic-agent enroll" in err


def test_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--mtu", "100"]) == 1
    assert "mtu" in capsys.readouterr().err


def test_up_flags_reach_the_settings() -> None:
    args = build_parser().parse_args(["up", "--quic-port", "0", "--as-endpoint", "192.0.2.1:443",
                                      "--as-endpoint", "[2001:db8::1]:443", "--give-up-after",
                                      "5", "--dns-listen", "off"])
    assert (args.quic_port, args.give_up_after_s, args.dns_listen) == (0, 5.0, "off")
    assert args.as_endpoints == ["192.0.2.1:443", "[2001:db8::1]:443"]
