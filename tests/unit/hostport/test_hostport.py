"""Text and socket forms of endpoints (``cyphonic.hostport``), shared by every component."""

from __future__ import annotations

import ipaddress

import pytest
from cyphonic.errors import InvalidArgument
from cyphonic.hostport import format_host_port, parse_host_port, plain_address
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("text", "require_ip", "expected"),
    [
        ("192.0.2.1:443", True, ("192.0.2.1", 443)),
        ("192.0.2.1", True, ("192.0.2.1", 443)),
        (" 192.0.2.1:8443 ", True, ("192.0.2.1", 8443)),
        ("[2001:db8::1]:8443", True, ("2001:db8::1", 8443)),
        ("[2001:DB8::1]", True, ("2001:db8::1", 443)),
        ("2001:db8::1", True, ("2001:db8::1", 443)),
        ("AS.Example.net:443", False, ("as.example.net", 443)),
        ("as.example.net", False, ("as.example.net", 443)),
    ],
)
def test_parse(text: str, require_ip: bool, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, default_port=443, require_ip=require_ip) == expected


@pytest.mark.parametrize(
    "text",
    [
        "as.example.net:443",
        "1.2.3.4:0",
        "1.2.3.4:70000",
        "[::1",
        "[::1]x",
        "1.2.3.4:port",
        "",
        "[::1]:",
    ],
)
def test_bad_endpoints_are_invalid_arguments(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_host_port(text, default_port=443, require_ip=True)


def test_a_port_is_needed_without_a_default_and_zero_only_when_allowed() -> None:
    with pytest.raises(InvalidArgument, match="lacks a port"):
        parse_host_port("192.0.2.1")
    with pytest.raises(InvalidArgument, match="out of range"):
        parse_host_port("127.0.0.1:0")
    assert parse_host_port("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)
    with pytest.raises(InvalidArgument, match="bad label"):
        parse_host_port("under_score.example:443")


def test_socket_addresses_become_plain_host_port() -> None:
    assert plain_address(("::ffff:192.0.2.1", 443, 0, 0)) == ("192.0.2.1", 443)
    assert plain_address(("2001:db8::1", 443, 0, 0)) == ("2001:db8::1", 443)
    assert plain_address(("192.0.2.1", 443)) == ("192.0.2.1", 443)


ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)


@given(host=ips, port=st.integers(1, 65535))
def test_format_then_parse_is_the_identity(host: str, port: int) -> None:
    text = format_host_port(host, port)
    assert parse_host_port(text, require_ip=True) == (str(ipaddress.ip_address(host)), port)
