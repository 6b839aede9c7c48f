"""tcpdump captures inside namespaces, read back with the package's pcap reader."""

from __future__ import annotations

import pytest
from cyphonic_testbed import TestbedError, capture, pattern2, v4_v6, wait_for

pytestmark = pytest.mark.timeout(60)


def test_capture_reports_ports_protocols_and_payload_bytes(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(v4_v6())
    alice, as_, core = bed.host("alice"), bed.host("as"), bed.router("core")
    as_.udp_echo(443)
    with capture(core, "lana", "udp") as udp, capture(core, "lana", "udp port 9999") as none:
        alice.udp_send([(as_.address(family=4), 443)], b"needle-7f3a", sport=41000)
        # The file is readable while tcpdump runs.
        wait_for(lambda: udp.contains(b"needle-7f3a"), 2.0)
    assert udp.protocols() == {"udp"}
    assert {443, 41000} <= udp.ports("udp")
    assert (alice.address(family=4), 41000, as_.address(family=4), 443) in udp.endpoints()
    assert len(udp) == 2  # the datagram and its echo
    assert udp.contains(b"needle-7f3a") and not udp.contains(b"absent-bytes")
    assert udp.contains_anywhere(b"needle-7f3a")
    assert len(none) == 0
    assert udp.path.suffix == ".pcap" and udp.path.stat().st_size > 24


def test_capture_on_a_network_segment_and_ipv6_and_icmp(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(v4_v6())
    bob, as_ = bed.host("bob"), bed.host("as")
    with capture(bed.network("cloud"), "br0", "icmp6 or icmp") as cap:
        assert bob.ping(as_.address(family=6), timeout=1)
    packets = [p for p in cap.packets() if p.protocol == "icmpv6"]
    assert any(p.src == bob.address(family=6) and p.dst == as_.address(family=6) for p in packets)
    assert all(p.family == 6 for p in packets)


def test_capture_sees_nat_translation_on_both_sides(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(pattern2())
    alice, bob, gwa = bed.host("alice"), bed.host("bob"), bed.router("gwa")
    bob.udp_echo(443)
    with gwa.capture("lana", "udp port 443") as inside, gwa.capture("wana", "udp port 443") as out:
        alice.udp_send([(bob.address(family=4), 443)], b"x")
    bob_addr = bob.address(family=4)
    assert {src for src, _, _, _ in inside.endpoints()} == {alice.address(family=4), bob_addr}
    assert {src for src, _, _, _ in out.endpoints()} == {gwa.address("wana", 4), bob_addr}


def test_bad_interface_fails_fast_with_tcpdumps_reason(netbed) -> None:  # type: ignore[no-untyped-def]
    bed = netbed(v4_v6())
    with pytest.raises(TestbedError, match="tcpdump"), capture(bed.router("core"), "nosuch0"):
        pass
