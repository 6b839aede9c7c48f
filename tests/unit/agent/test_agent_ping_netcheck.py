"""``ping`` and ``netcheck``: the pure parts (ICMP echo, names, probe lines, NAT and family
verdicts, the report), the ping request on a real status socket with a fake peer lookup,
and the CLI's refusals. The commands themselves run in namespaces (tests/netns/cli)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from cyphonic.errors import InvalidArgument, RemoteError
from cyphonic_agent.cli import build_parser
from cyphonic_agent.dns import PeerAddresses
from cyphonic_agent.netcheck import (
    ProbeResult,
    Report,
    ServiceCheck,
    family_summary,
    format_report,
    nat_report,
    parse_trs,
    tcp_state,
    tunnel_mtu,
)
from cyphonic_agent.packet import internet_checksum
from cyphonic_agent.ping import (
    Pinger,
    Probe,
    describe_path,
    echo_reply_matches,
    echo_request,
    format_probe,
    fqdn_for,
    run_ping,
)
from cyphonic_agent.status import (
    AgentStatus,
    PeerStatus,
    StatusServer,
    ask_agent,
    fetch_status,
)

pytestmark = pytest.mark.timeout(30)


# --- ICMP echo -----------------------------------------------------------------------------


def test_echo_request_and_reply_matching() -> None:
    v4 = echo_request(version=4, ident=0x1234, seq=7)
    assert v4[0] == 8 and internet_checksum(v4) == 0  # a valid ICMP checksum
    reply = bytes([0]) + v4[1:]
    ip_header = bytes([0x45]) + bytes(19)
    assert echo_reply_matches(ip_header + reply, version=4, ident=0x1234, seq=7)
    assert not echo_reply_matches(ip_header + reply, version=4, ident=0x1234, seq=8)
    assert not echo_reply_matches(ip_header + v4, version=4, ident=0x1234, seq=7)  # request
    assert not echo_reply_matches(b"\x45" + bytes(10), version=4, ident=1, seq=1)  # short
    v6 = echo_request(version=6, ident=1, seq=70000)  # seq wraps at 16 bits
    assert v6[0] == 128 and v6[2:4] == b"\0\0"  # the kernel fills in the checksum
    assert echo_reply_matches(bytes([129]) + v6[1:], version=6, ident=1, seq=70000)


def test_names() -> None:
    assert fqdn_for("Bob", domain="cyphonic.internal") == "bob.cyphonic.internal"
    assert fqdn_for("bob.example.net.", domain="d") == "bob.example.net"
    for bad in ("", "x" * 254):
        with pytest.raises(InvalidArgument):
            fqdn_for(bad, domain="d")


def test_probe_lines() -> None:
    direct = PeerStatus(
        fqdn="bob.d", state="up", pattern="direct", path="[2001:db8::7]:443", rtt_ms=0.5
    )
    relayed = PeerStatus(
        fqdn="carol.d", state="up", pattern="relay", path="via 192.0.2.12:443 (trs.svc.d)"
    )
    p = Probe(seq=1, peer="bob.d", address="100.64.0.2", reply=True, rtt_ms=1.234)
    for key, value in describe_path(direct).items():
        setattr(p, key, value)
    assert (p.direct, p.via_trs, p.quic_rtt_ms) == (True, None, 0.5)
    assert format_probe(p) == (
        "pong from bob.d (100.64.0.2) seq 1: 1.23 ms direct [2001:db8::7]:443 udp (direct)"
    )
    for key, value in describe_path(relayed).items():
        setattr(p, key, value)
    assert p.via_trs == "192.0.2.12:443 (trs.svc.d)" and not p.direct
    assert "via TRS 192.0.2.12:443 (trs.svc.d) udp (relay)" in format_probe(p)
    p.reply = False
    assert format_probe(p) == "no reply from bob.d (100.64.0.2) seq 1"
    assert describe_path(None) == {}


# --- the ping request on a real status socket ----------------------------------------------


class FakePeers:
    async def lookup(self, fqdn: str) -> PeerAddresses | None:
        if fqdn == "bob.cyphonic.internal":
            return PeerAddresses(ipv4=ipaddress.IPv4Address("127.0.0.1"))
        return None


async def test_ping_request_answers_and_refuses(tmp_path: Path) -> None:
    row = PeerStatus(fqdn="bob.cyphonic.internal", state="up", pattern="direct", path="x:443")

    async def fqdn_of(address: Any) -> str | None:
        return None

    pinger = Pinger(
        peers=FakePeers(),
        domain="cyphonic.internal",
        snapshot=lambda: AgentStatus(fqdn="alice.cyphonic.internal", peers=[row]),
        fqdn_of=fqdn_of,
    )
    echoed: list[tuple[str, float]] = []

    async def fake_echo(address: Any, *, seq: int, wait_s: float) -> float | None:
        echoed.append((str(address), wait_s))
        return 0.002 if seq == 1 else None  # no raw socket needed here

    pinger._echo = fake_echo  # type: ignore[method-assign]
    path = tmp_path / "s.sock"

    async def boom(_request: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("a bug")

    server = await StatusServer.start(
        path=path, snapshot=pinger.snapshot, handlers={"ping": pinger.handle, "boom": boom}
    )

    def ask(**kw: Any) -> dict[str, Any]:
        return ask_agent("ping", path, **kw)

    try:
        got = await asyncio.to_thread(ask, peer="bob", seq=1, timeout_s=2)
        assert (got["reply"], got["rtt_ms"], got["direct"], got["path"]) == (
            True,
            2.0,
            True,
            "x:443",
        )
        assert echoed[0][0] == "127.0.0.1" and 0 < echoed[0][1] <= 2
        lost = await asyncio.to_thread(ask, peer="bob.cyphonic.internal", seq=2)
        assert lost["reply"] is False and lost["rtt_ms"] is None
        for kw, code in (
            ({"peer": "nobody", "seq": 1}, "not_found"),
            ({"peer": "100.64.9.9", "seq": 1}, "not_found"),
            ({"peer": "bob", "seq": "1"}, "invalid_argument"),
            ({"peer": "bob", "seq": 1, "timeout_s": 99}, "invalid_argument"),
            ({"seq": 1}, "invalid_argument"),
        ):
            with pytest.raises(RemoteError) as err:
                await asyncio.to_thread(ask, **kw)
            assert err.value.code_name == code, kw
        with pytest.raises(RemoteError) as err:
            await asyncio.to_thread(ask_agent, "netinfo", path)  # not registered here
        assert err.value.code_name == "invalid_argument"
        with pytest.raises(RemoteError) as err:  # a failing handler still answers
            await asyncio.to_thread(ask_agent, "boom", path)
        assert err.value.code_name == "internal" and "a bug" in err.value.message
        assert (await asyncio.to_thread(fetch_status, path)).fqdn == "alice.cyphonic.internal"
    finally:
        await server.close()


def test_status_shows_split_dns() -> None:
    from cyphonic_agent.status import format_status

    status = AgentStatus(
        fqdn="alice.d", split_dns={"manager": "resolv.conf", "detail": "/etc/resolv.conf: x"}
    )
    assert "dns        /etc/resolv.conf: x" in format_status(status)
    assert AgentStatus.from_dict(status.to_dict()) == status
    assert "dns " not in format_status(AgentStatus(fqdn="alice.d"))


def test_ping_cli_refuses_bad_flags_and_a_missing_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    args = parser.parse_args(["ping", "bob", "-c", "0", "--socket", str(tmp_path / "s")])
    assert run_ping(args) == 2
    args = parser.parse_args(["ping", "bob", "-c", "1", "--socket", str(tmp_path / "s")])
    assert run_ping(args) == 1
    assert "not running" in capsys.readouterr().err
    up = parser.parse_args(["up", "--accept-dns=false", "--dns-manager", "resolv.conf"])
    assert (up.accept_dns, up.dns_manager) == (False, "resolv.conf")
    with pytest.raises(SystemExit):
        parser.parse_args(["up", "--accept-dns=maybe"])


# --- netcheck ------------------------------------------------------------------------------


def test_tcp_states() -> None:
    assert tcp_state(None).state == "ok"
    opened = tcp_state(None, tls_error="certificate verify failed")
    assert opened.state == "open" and "certificate verify failed" in opened.detail
    assert tcp_state(ConnectionRefusedError()).state == "closed"
    assert tcp_state(TimeoutError()).state == "blocked"
    assert tcp_state(OSError(errno.ENETUNREACH, "Network is unreachable")).state == "no route"
    assert tcp_state(OSError(errno.EACCES, "Permission denied")).state == "error"


def test_nat_report() -> None:
    assert nat_report(None, local=None)["known"] is False
    public = nat_report({"behind_nat": False, "observed": ["203.0.113.10:443"]}, local="[::]:443")
    assert public["kind"] == "none"
    kept = nat_report({"behind_nat": True, "observed": ["198.51.100.2:443"]}, local="[::]:443")
    assert kept["kind"] == "port-preserving" and kept["mapping"] == "unknown"
    moved = nat_report({"behind_nat": True, "observed": ["198.51.100.2:50123"]}, local="[::]:443")
    assert moved["kind"] == "port-translating" and "443 -> 50123" in moved["detail"]
    assert "only the NMS" in moved["detail"]


def check(family: int, udp: str, tcp: str) -> ServiceCheck:
    return ServiceCheck(
        service="as",
        endpoint="192.0.2.10:443" if family == 4 else "[2001:db8::10]:443",
        family=family,
        server_name="as.svc.d",
        udp443=ProbeResult(udp, ms=1.0),
        tcp443=ProbeResult(tcp),
        path_mtu=1500,
        tunnel_mtu=tunnel_mtu(1500, family),
    )


def test_family_verdicts_and_report() -> None:
    checks = [
        check(4, "blocked", "closed"),
        check(4, "ok", "blocked"),
        check(6, "no route", "no route"),
    ]
    v4 = family_summary(checks, family=4, route=True)
    assert (v4["udp443"], v4["tcp443"], v4["endpoints"]) == ("ok", "reachable", 2)
    v6 = family_summary(checks, family=6, route=False)
    assert (v6["udp443"], v6["tcp443"]) == ("no route", "no route")
    assert family_summary([check(4, "blocked", "blocked")], family=4, route=True)["udp443"] == (
        "blocked"
    )
    assert family_summary([], family=4, route=True)["udp443"] == "untested"
    assert (tunnel_mtu(1500, 4), tunnel_mtu(1500, 6), tunnel_mtu(None, 4)) == (1442, 1422, None)
    report = Report(node="alice.d", agent="running", local="[::]:443", services=checks)
    report.ipv4, report.ipv6 = v4, v6
    report.nat = nat_report({"behind_nat": False}, local="[::]:443")
    text = format_report(report)
    assert "ipv4     route yes  udp/443 ok  tcp/443 reachable" in text
    assert "ipv6     no route" in text and "1500 (tunnel 1442)" in text
    assert json.loads(json.dumps(report.to_dict()))["services"][0]["udp443"]["state"] == "blocked"


def test_trs_flag() -> None:
    assert parse_trs("192.0.2.12:443=trs.svc.d") == ("192.0.2.12:443", "trs.svc.d")
    assert parse_trs("[2001:db8::12]:443") == ("[2001:db8::12]:443", "")
    with pytest.raises(InvalidArgument):
        parse_trs("not an endpoint:x=y")
    args = build_parser().parse_args(["netcheck", "--trs", "192.0.2.12:443=t", "--json"])
    assert isinstance(args, argparse.Namespace) and args.trs == ["192.0.2.12:443=t"]
