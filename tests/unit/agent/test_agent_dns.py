"""The DNS stub's sans-I/O core: overlay answers, NXDOMAIN, forwarding decisions, FORMERR."""

from __future__ import annotations

import ipaddress
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from cyphonic_agent.dns import (
    Forward,
    OverlayQuestion,
    PeerAddresses,
    answer,
    classify,
    failure_response,
    upstreams_from_resolv_conf,
)
from hypothesis import given, settings
from hypothesis import strategies as st

DOMAIN = "cyphonic.internal"
PEERS = {
    "bob.cyphonic.internal": PeerAddresses(
        ipv4=ipaddress.IPv4Address("100.64.0.7"), ipv6=ipaddress.IPv6Address("fd00:c1::7")
    ),
    "v6only.cyphonic.internal": PeerAddresses(ipv6=ipaddress.IPv6Address("fd00:c1::8")),
}


class RecordingLookup:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, fqdn: str) -> PeerAddresses | None:
        self.calls.append(fqdn)
        return PEERS.get(fqdn)


def ask(name: str, rdtype: str, *, use_edns: bool = False) -> tuple[dns.message.Message, list[str]]:
    lookup = RecordingLookup()
    query = dns.message.make_query(name, rdtype, use_edns=0 if use_edns else None)
    out = answer(query.to_wire(), domain=DOMAIN, lookup=lookup)
    assert isinstance(out, bytes)
    response = dns.message.from_wire(out)
    assert response.id == query.id
    assert response.flags & dns.flags.QR
    return response, lookup.calls


def addresses(response: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in response.answer for rd in rrset)


def test_a_for_known_peer_calls_lookup_once() -> None:
    response, calls = ask("bob.cyphonic.internal", "A")
    assert calls == ["bob.cyphonic.internal"]
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert addresses(response) == ["100.64.0.7"]
    assert response.answer[0].ttl == 60


def test_aaaa_and_case_insensitivity() -> None:
    response, calls = ask("BoB.Cyphonic.Internal.", "AAAA")
    assert calls == ["bob.cyphonic.internal"]
    assert addresses(response) == ["fd00:c1::7"]
    # the question keeps the asker's spelling (0x20 randomisation needs that)
    assert response.question[0].name.to_text() == "BoB.Cyphonic.Internal."


def test_any_gives_both() -> None:
    response, _ = ask("bob.cyphonic.internal", "ANY")
    assert addresses(response) == ["100.64.0.7", "fd00:c1::7"]


def test_nodata_when_family_missing() -> None:
    response, _ = ask("v6only.cyphonic.internal", "A")
    assert response.rcode() == dns.rcode.NOERROR and response.answer == []
    assert response.authority[0].rdtype == dns.rdatatype.SOA


def test_nxdomain_for_unknown_overlay_name() -> None:
    response, calls = ask("nobody.cyphonic.internal", "A")
    assert calls == ["nobody.cyphonic.internal"]
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.AA
    soa = response.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl == 5


def test_apex_is_answered_without_lookup() -> None:
    response, calls = ask("cyphonic.internal", "SOA")
    assert calls == []
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer[0].rdtype == dns.rdatatype.SOA


def test_edns_is_echoed() -> None:
    response, _ = ask("bob.cyphonic.internal", "A", use_edns=True)
    assert response.edns == 0


@pytest.mark.parametrize("name", ["example.com", "cyphonic.internal.example.com", "internal"])
def test_outside_domain_is_forwarded_unchanged(name: str) -> None:
    lookup = RecordingLookup()
    wire = dns.message.make_query(name, "A").to_wire()
    out = answer(wire, domain=DOMAIN, lookup=lookup)
    assert isinstance(out, Forward) and out.query == wire
    assert out.query_id == struct.unpack_from("!H", wire)[0]
    assert lookup.calls == []


def test_classify_gives_overlay_question() -> None:
    wire = dns.message.make_query("bob.cyphonic.internal", "AAAA").to_wire()
    decision = classify(wire, domain=DOMAIN)
    assert isinstance(decision, OverlayQuestion)
    assert (decision.fqdn, decision.rdtype) == ("bob.cyphonic.internal", dns.rdatatype.AAAA)
    servfail = dns.message.from_wire(failure_response(decision))
    assert servfail.rcode() == dns.rcode.SERVFAIL


def test_garbage_gets_formerr_with_same_id() -> None:
    garbage = b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff\xff"
    out = answer(garbage, domain=DOMAIN, lookup=RecordingLookup())
    assert isinstance(out, bytes) and len(out) == 12
    query_id, flags = struct.unpack_from("!HH", out)
    assert query_id == 0xBEEF
    assert flags & dns.flags.QR and flags & 0xF == dns.rcode.FORMERR
    assert flags & dns.flags.RD  # RD copied from the query


def test_two_questions_formerr() -> None:
    query = dns.message.make_query("bob.cyphonic.internal", "A")
    query.question.append(dns.message.make_query("x.cyphonic.internal", "A").question[0])
    out = answer(query.to_wire(), domain=DOMAIN, lookup=RecordingLookup())
    assert isinstance(out, bytes) and out[3] & 0xF == dns.rcode.FORMERR


def test_non_query_opcode_notimp() -> None:
    query = dns.message.make_query("bob.cyphonic.internal", "A")
    query.set_opcode(dns.opcode.UPDATE)
    out = answer(query.to_wire(), domain=DOMAIN, lookup=RecordingLookup())
    assert isinstance(out, bytes) and out[3] & 0xF == dns.rcode.NOTIMP


def test_short_and_response_packets_are_dropped() -> None:
    assert answer(b"\x00" * 11, domain=DOMAIN, lookup=RecordingLookup()) is None
    response = dns.message.make_response(dns.message.make_query("example.com", "A"))
    assert answer(response.to_wire(), domain=DOMAIN, lookup=RecordingLookup()) is None


def test_chaos_class_in_overlay_refused() -> None:
    query = dns.message.make_query("bob.cyphonic.internal", "TXT", rdclass="CH")
    out = answer(query.to_wire(), domain=DOMAIN, lookup=RecordingLookup())
    assert isinstance(out, bytes)
    assert dns.message.from_wire(out).rcode() == dns.rcode.REFUSED


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_never_crash(data: bytes) -> None:
    out = answer(data, domain=DOMAIN, lookup=RecordingLookup())
    if isinstance(out, bytes):
        assert out[:2] == data[:2] and out[2] & 0x80


@settings(max_examples=300)
@given(st.data())
def test_fuzz_mutated_queries_never_crash(data: st.DataObject) -> None:
    wire = bytearray(dns.message.make_query("bob.cyphonic.internal", "A", use_edns=0).to_wire())
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    out = answer(bytes(wire[:cut]), domain=DOMAIN, lookup=RecordingLookup())
    assert out is None or isinstance(out, bytes | Forward)


def test_resolv_conf_parsing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# comment\nsearch example.com\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\n"
        "nameserver 127.0.0.1\nnameserver not-an-ip\nnameserver 10.0.0.53\n"
    )
    assert upstreams_from_resolv_conf(conf, exclude=[("127.0.0.1", 53)]) == [
        ("10.0.0.53", 53),
        ("fe80::1", 53),
    ]
    assert upstreams_from_resolv_conf(tmp_path / "missing") == []
