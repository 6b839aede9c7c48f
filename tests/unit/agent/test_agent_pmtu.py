"""Path MTU, sans-I/O: the DPLPMTUD search on a fake clock, the sizes fitted to the host's
links, the tunnel's probes between two in-memory cores (one path dropping what is too big),
and IPv6 fragmented by the tunnel below 1,280 bytes."""

from __future__ import annotations

import struct

import pytest
from cyphonic.errors import MalformedMessage
from cyphonic_agent.packet import PROTO_IPV6_FRAGMENT, fragment_ipv6, parse_header
from cyphonic_agent.path_sizes import LinkMtu, plan_sizes
from cyphonic_agent.pmtu import PathMtuSearch, SearchState
from cyphonic_agent.tunnel import PROBE_MAGIC, QUIC_MIN_DATAGRAM, TunnelCore, inner_mtu_for
from test_agent_tunnel import CLIENT_ADDR, MTU, SERVER_ADDR, Pair, cores, established, udp4, udp6

BASE = inner_mtu_for(QUIC_MIN_DATAGRAM)


def run(search: PathMtuSearch, *, carries: int, answers: bool = True, until: float) -> float:
    """Drive ``search`` on a path that carries ``carries`` bytes, one tick per 0.1 s."""
    now = search.now
    while now < until:
        probe = search.poll(now)
        if probe is not None and answers and probe.size <= carries:
            search.acked(probe.probe_id, now=now + 0.02)
        now += 0.1
    return now


# ---------------------------------------------------------------------- the search


def test_the_size_both_links_allow_is_confirmed_and_kept() -> None:
    search = PathMtuSearch(base=BASE, upper=1420, now=0.0)
    first = search.poll(0.0)
    assert first is not None and first.size == 1420  # confirm the start at once
    search.acked(first.probe_id, now=0.01)
    assert search.state is SearchState.COMPLETE and search.mtu == 1420
    assert search.poll(5.0) is None  # nothing until the next confirmation
    again = search.poll(15.5)
    assert again is not None and again.size == 1420  # black-hole detection, periodic
    assert search.history == []


def test_a_narrower_hop_drops_to_the_base_and_the_search_climbs_back() -> None:
    search = PathMtuSearch(base=BASE, upper=1420, now=0.0)
    run(search, carries=1420, until=1.0)  # the peer answers: it speaks probes
    assert search.state is SearchState.COMPLETE
    # The path narrows (a move onto a smaller link): the next confirmations are lost.
    run(search, carries=1300, until=60.0)
    assert search.history[0][1:] == (BASE, "black hole")
    assert search.state is SearchState.COMPLETE
    assert 1300 - search.granularity <= search.mtu <= 1300
    assert search.probes_sent < 30


def test_a_narrow_path_from_the_start_is_told_apart_from_an_old_peer() -> None:
    search = PathMtuSearch(base=BASE, upper=1420, now=0.0)
    run(search, carries=1250, until=40.0)
    assert search.history[0][2] == "black hole"  # the base probe was answered
    assert 1250 - search.granularity <= search.mtu <= 1250


def test_a_peer_that_never_answers_leaves_the_size_alone() -> None:
    search = PathMtuSearch(base=BASE, upper=1420, now=0.0)
    run(search, carries=1420, answers=False, until=30.0)
    assert search.state is SearchState.DISABLED and search.mtu == 1420
    assert search.poll(1000.0) is None
    assert search.probes_sent == 2 * search.max_probes  # confirm, then base: then silence


def test_losing_even_the_base_keeps_the_base_and_retries() -> None:
    search = PathMtuSearch(base=BASE, upper=1420, now=0.0)
    run(search, carries=1420, until=1.0)
    run(search, carries=0, until=80.0)
    assert search.state is SearchState.ERROR and search.mtu == BASE
    run(search, carries=1420, until=200.0)  # the path is back: confirmed, then climbs
    assert search.state is SearchState.COMPLETE and search.mtu > 1400


def test_late_and_unknown_answers_are_ignored() -> None:
    search = PathMtuSearch(base=BASE, upper=1420, now=0.0)
    probe = search.poll(0.0)
    assert probe is not None
    search.acked(probe.probe_id + 7, now=0.1)
    assert search.state is SearchState.SEARCHING
    assert search.poll(2.0) is not None  # the first counted lost, a second sent
    search.acked(probe.probe_id, now=2.1)  # the first one's answer, too late
    assert search.state is SearchState.SEARCHING
    with pytest.raises(ValueError):
        PathMtuSearch(base=1400, upper=1300, now=0.0)


# ---------------------------------------------------------------------- sizes from the links


def test_sizes_follow_the_smallest_link() -> None:
    assert plan_sizes(tun_mtu=1420, links=[]).datagram == 1450  # nothing known: configured
    plain = plan_sizes(tun_mtu=1420, links=[LinkMtu("eth0", 1500, 4)])
    assert (plain.datagram, plain.tun_mtu, plain.limited_by) == (1450, 1420, None)
    small = plan_sizes(tun_mtu=1420, links=[LinkMtu("eth0", 1500, 4), LinkMtu("wwan0", 1280, 4)])
    assert (small.datagram, small.tun_mtu) == (1252, 1280)  # never below IPv6's minimum
    assert (plain.receive, small.receive) == (1472, 1252)  # sent as max_udp_payload_size
    assert small.limited_by == LinkMtu("wwan0", 1280, 4)
    assert plan_sizes(tun_mtu=1420, links=[LinkMtu("eth0", 1280, 6)]).datagram == 1232
    assert plan_sizes(tun_mtu=1420, links=[LinkMtu("ppp0", 576, 4)]).datagram == 1200
    assert plan_sizes(tun_mtu=1200, links=[LinkMtu("eth0", 1280, 4)]).tun_mtu == 1200


# ---------------------------------------------------------------------- the tunnel's probes


def lossy_pump(pair: Pair, *, carries: int, rounds: int = 20) -> None:
    """Like ``Pair.pump``, but UDP datagrams above ``carries`` bytes are lost."""
    for _ in range(rounds):
        step = 0
        for src, dst, addr in (
            (pair.client, pair.server, CLIENT_ADDR),
            (pair.server, pair.client, SERVER_ADDR),
        ):
            for data, _ in src.datagrams_to_send(now=pair.now):
                step += 1
                if len(data) <= carries:
                    dst.receive_datagram(data, addr, now=pair.now)
        pair.now += 0.001
        for conn in (pair.client, pair.server):
            timer = conn.get_timer()
            if timer is not None and timer <= pair.now:
                conn.handle_timer(now=pair.now)
        if step == 0:
            break


def exchange(pair: Pair, a: TunnelCore, b: TunnelCore, *, carries: int = 65535) -> None:
    """a's probe to b, b's answer back (datagrams above ``carries`` bytes are lost)."""
    lossy_pump(pair, carries=carries)
    assert b.receive_events()[0] == []  # probes never reach the TUN
    lossy_pump(pair, carries=carries)
    a.receive_events()


def test_probes_confirm_the_full_size_on_a_clean_path() -> None:
    pair, a, b = established()
    assert a.poll_pmtu(pair.now)
    exchange(pair, a, b)
    assert b.stats.probes_answered == 1
    a.poll_pmtu(pair.now + 0.1)
    assert a.pmtu is not None and a.pmtu.state is SearchState.COMPLETE
    assert a.effective_mtu == MTU and a.stats.probes_sent == 1


def test_a_black_hole_lowers_the_tunnel_mtu_and_icmp_follows() -> None:
    pair, a, b = established()
    a.poll_pmtu(pair.now)
    exchange(pair, a, b)
    now = pair.now
    a.poll_pmtu(now)
    assert a.pmtu is not None and a.pmtu.state is SearchState.COMPLETE
    carries = 1300 + 30  # UDP payload: an inner packet of 1300 and QUIC's 30 bytes
    for _ in range(2000):  # 0.1 s ticks: confirmations lost, then the search
        now += 0.1
        pair.now = now
        if a.poll_pmtu(now):
            exchange(pair, a, b, carries=carries)
        if a.pmtu.state is SearchState.COMPLETE and a.effective_mtu < MTU:
            break
    assert 1300 - 16 <= a.effective_mtu <= 1300
    answers = a.packets_from_tun([udp4(1350, tag=3)])
    assert len(answers) == 1 and struct.unpack_from("!H", answers[0], 26)[0] == a.effective_mtu


def test_probe_datagrams_are_checked() -> None:
    pair, _, b = established()
    assert b.accept(PROBE_MAGIC + b"\x09" + bytes(4)) is None
    assert b.stats.dropped_malformed == 1
    assert b.accept(PROBE_MAGIC + b"\x02" + (99).to_bytes(4, "big")) is None  # unasked
    b.poll_pmtu(pair.now)  # an unknown answer id changes nothing
    assert b.pmtu is not None and b.pmtu.mtu == MTU


# ---------------------------------------------------------------------- IPv6 below 1,280


def test_ipv6_up_to_1280_is_fragmented_by_the_tunnel() -> None:
    packet = udp6(1280, tag=5)
    pieces = fragment_ipv6(packet, mtu=1222, identification=0x01020304)
    assert len(pieces) == 2 and all(len(p) <= 1222 for p in pieces)
    first, second = (parse_header(p) for p in pieces)
    assert first.protocol == PROTO_IPV6_FRAGMENT == second.protocol
    offsets = [struct.unpack_from("!BBHI", p, 40) for p in pieces]
    assert offsets[0] == (17, 0, 1, 0x01020304) and offsets[1][2] == (1222 - 48) // 8 * 8
    assert b"".join(p[48:] for p in pieces) == packet[40:]
    with pytest.raises(MalformedMessage):
        fragment_ipv6(packet[:6] + bytes([0]) + packet[7:], mtu=1222, identification=1)


def test_tunnel_below_1280_fragments_ipv6_and_answers_larger_with_1280() -> None:
    pair = Pair(max_datagram_size=1252)
    a, b = cores(pair)
    pair.pump()
    a.receive_events()
    b.receive_events()
    assert a.effective_mtu == 1222
    assert a.packets_from_tun([udp6(1280, tag=1)]) == []
    assert a.stats.fragmented == 1
    pair.pump()
    got, _ = b.receive_events()
    assert len(got) == 2  # the receiving host reassembles
    answers = a.packets_from_tun([udp6(1400, tag=2)])
    assert len(answers) == 1 and struct.unpack_from("!BBHI", answers[0], 40)[3] == 1280
