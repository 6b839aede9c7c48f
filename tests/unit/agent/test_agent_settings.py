"""Settings of ``cyphonic-agent up``: flags beat CYPHONIC_* variables beat the TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest
from cyphonic.errors import InvalidArgument
from cyphonic.hostport import format_host_port as format_hostport
from cyphonic_agent.config import AgentSettings, parse_hostport


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CYPHONIC_QUIC_PORT", "CYPHONIC_DNS_LISTEN", "CYPHONIC_STATUS_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    s = AgentSettings.load()
    assert (s.quic_host, s.quic_port, s.mtu, s.tun_name) == ("::", 443, 1420, "cyphonic0")
    assert s.dns_address == ("127.0.0.1", 53)
    assert s.peer_timeout_s == 30.0 and s.give_up_after_s == 0.0


def test_flags_beat_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'quic_port = 8443\nmtu = 1380\ndns_listen = "127.0.0.1:5353"\n'
        'as_endpoints = ["[2001:db8::10]:443"]\n'
    )
    monkeypatch.setenv("CYPHONIC_MTU", "1400")
    s = AgentSettings.load(config_file=config, quic_port=None, tun_name="cy1")
    assert s.quic_port == 8443  # file (flag not given, no variable)
    assert s.mtu == 1400  # variable beats the file
    assert s.tun_name == "cy1"  # flag
    assert s.dns_address == ("127.0.0.1", 5353)
    assert s.as_endpoints == ["[2001:db8::10]:443"]
    assert AgentSettings.load(config_file=config, mtu=1300).mtu == 1300  # flag beats both


def test_dns_can_be_switched_off() -> None:
    assert AgentSettings.load(dns_listen="off").dns_address is None


@pytest.mark.parametrize(
    "flags",
    [
        {"mtu": 1000},  # below IPv6's minimum
        {"tun_name": "a-very-long-device-name"},
        {"dns_listen": "localhost:53"},  # the stub binds an address
        {"as_endpoints": ["[2001:db8::1"]},
        {"peer_timeout_s": 10, "tunnel_keepalive_s": 6},
        {"quic_port": 70000},
    ],
)
def test_bad_settings_are_refused_with_the_reason(flags: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument, match="bad agent settings"):
        AgentSettings.load(**flags)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        AgentSettings.load(config_file=tmp_path / "nope.toml")


def test_host_port_forms() -> None:
    assert parse_hostport("192.0.2.1:443") == ("192.0.2.1", 443)
    assert parse_hostport("[2001:db8::1]:8443") == ("2001:db8::1", 8443)
    assert parse_hostport("2001:db8::1", default_port=443) == ("2001:db8::1", 443)
    assert parse_hostport("as.example.net", default_port=443) == ("as.example.net", 443)
    assert format_hostport("2001:db8::1", 443) == "[2001:db8::1]:443"
    assert format_hostport("192.0.2.1", 443) == "192.0.2.1:443"
    for bad in ("192.0.2.1:x", "[::1]x", "host"):
        with pytest.raises(InvalidArgument):
            parse_hostport(bad)
