"""``cyphonic-agent up`` refuses what it cannot run with, saying why (exit status 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cyphonic_agent.cli import build_parser, main


def test_missing_state_directory(tmp_path: Path) -> None:
    # A process of its own: `up` configures process-wide logging.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cyphonic_agent.cli",
            "up",
            "--state-dir",
            str(tmp_path / "nothing"),
            "--status-socket",
            str(tmp_path / "status.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "invalid_argument" in proc.stderr and "cyphonic-agent enroll" in proc.stderr


def test_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--mtu", "100"]) == 1
    assert "mtu" in capsys.readouterr().err


def test_up_flags_reach_the_settings() -> None:
    args = build_parser().parse_args(
        [
            "up",
            "--quic-port",
            "0",
            "--as-endpoint",
            "192.0.2.1:443",
            "--as-endpoint",
            "[2001:db8::1]:443",
            "--give-up-after",
            "5",
            "--dns-listen",
            "off",
            "--metrics-listen",
            "127.0.0.1:9464",
        ]
    )
    assert (args.quic_port, args.give_up_after_s, args.dns_listen) == (0, 5.0, "off")
    assert args.metrics_listen == "127.0.0.1:9464"
    assert args.as_endpoints == ["192.0.2.1:443", "[2001:db8::1]:443"]
