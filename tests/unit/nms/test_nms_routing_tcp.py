"""A node carried over TCP 443 (its observed source a stream address) is always relayed."""

from __future__ import annotations

from ipaddress import ip_address

from cyphonic.stream_address import is_stream_host, stream_address
from cyphonic_nms.routing import Endpoint, Pattern, classify, pattern_for


def _ep(text: str) -> Endpoint:
    return Endpoint.parse(text)


def test_stream_addresses() -> None:
    assert stream_address(1, 5000, ipv6=True) == ("100::1", 5000, 0, 0)
    assert stream_address(2, 5000, ipv6=False) == ("240.0.0.2", 5000)
    assert is_stream_host(ip_address("100::1"))
    assert is_stream_host(ip_address("::ffff:240.0.0.2"))
    assert not is_stream_host(ip_address("100:0:0:1::1"))  # outside 100::/64
    assert not is_stream_host(ip_address("203.0.113.5"))


def test_node_on_a_stream_is_relayed_even_with_global_addresses() -> None:
    global_a = classify([_ep("198.51.100.7:443")], _ep("198.51.100.7:443"))
    global_b = classify([_ep("198.51.100.8:443")], _ep("198.51.100.8:443"))
    assert pattern_for(global_a, global_b).pattern is Pattern.DIRECT
    on_tcp = classify([_ep("198.51.100.8:443"), _ep("[2001:db8::8]:443")], _ep("[100::3]:40000"))
    assert on_tcp.relay_only and not global_a.relay_only
    v6 = classify([_ep("[2001:db8::9]:443")], _ep("[2001:db8::9]:443"))
    for a, b in ((global_a, on_tcp), (on_tcp, global_a), (v6, on_tcp)):
        decision = pattern_for(a, b)
        assert decision.pattern is Pattern.RELAY and decision.candidates == ()
