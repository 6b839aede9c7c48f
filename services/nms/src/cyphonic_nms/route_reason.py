"""Why a route has its pattern, in words for people (the console, the admin REST).

Sans-I/O and pure: the route's pattern and family, and both nodes' ``NetworkInfo`` as the
NMS holds them now, go in; a ``RouteReason`` (a stable code and a sentence) comes out. It
asks ``routing.pattern_for`` and the same table (``routing.cell``) rather than keeping a
second copy of the rules, so an explanation cannot disagree with the decision.

Codes:

    both_ipv6             direct over IPv6 (pattern 1)
    both_global_ipv4      direct over IPv4, neither side behind NAT (pattern 1)
    one_side_nat          the NATed side connects to the other's public IPv4 (pattern 2)
    inbound_blocked       a node with a public address takes no inbound traffic (a
                          firewall, found by the reachability probe): it connects out
                          (pattern 2)
    both_behind_nat       relayed: IPv4 on both sides behind NAT and no IPv6 in common
                          (the words name a NAT whose mapping is symmetric)
    hole_punching         relayed first, both NATs map endpoint-independently: the nodes
                          punch and their connection moves to the direct path
    no_common_family      relayed: the two nodes share no address family (IPv6-only vs IPv4)
    udp_blocked           relayed: a node reaches the overlay only over TCP 443 (its UDP is
                          blocked, or an HTTPS proxy is its only way out)
    no_dialable_address   relayed: a direct cell exists but no address a peer may dial
    outdated              the networks now give another pattern (a node moved; the NMS
                          re-decides the route)
    unknown               a node's network is not known now (not registered)
"""

from __future__ import annotations

from dataclasses import dataclass

from cyphonic_nms.routing import NatMapping, NetworkInfo, Pattern, Reach, cell, pattern_for


@dataclass(frozen=True)
class RouteReason:
    """A stable ``code`` for programs and a ``text`` for people."""

    code: str
    text: str


def _short(fqdn: str) -> str:
    return fqdn.split(".", 1)[0]


def _families(net: NetworkInfo) -> str:
    if net.has_ipv4 and net.has_ipv6:
        return "IPv4 and IPv6"
    if net.has_ipv6:
        return "only IPv6"
    if net.has_ipv4:
        return "only IPv4"
    return "no usable address"


def transport(pattern: int, family: int | None) -> str:
    """How the pair's packets travel: ``QUIC/UDP over IPv4`` (or IPv6), or via the TRS."""
    if pattern == Pattern.RELAY or family is None:
        return "QUIC/UDP via TRS"
    return f"QUIC/UDP over IPv{family}"


def explain(
    *,
    pattern: int,
    family: int | None,
    initiator: str,
    responder: str,
    initiator_net: NetworkInfo | None,
    responder_net: NetworkInfo | None,
) -> RouteReason:
    """Why the route from ``initiator`` to ``responder`` has ``pattern`` (and ``family``)."""
    a, b = _short(initiator), _short(responder)
    if initiator_net is None or responder_net is None:
        missing = a if initiator_net is None else b
        return RouteReason("unknown", f"the network of {missing} is not known now")
    if pattern_for(initiator_net, responder_net).pattern != pattern:
        return RouteReason(
            "outdated",
            "decided on the networks before a move (they now give another pattern): "
            "the NMS re-decides it",
        )
    if pattern == Pattern.DIRECT:
        if family == 6:
            return RouteReason("both_ipv6", "both nodes have IPv6: direct over IPv6")
        return RouteReason(
            "both_global_ipv4", "neither node is behind NAT: direct over public IPv4"
        )
    if pattern == Pattern.NAT_CONNECTS:
        decision = pattern_for(initiator_net, responder_net)
        connecting_net = initiator_net if decision.connector.value == "initiator" else responder_net
        nat, public = (a, b) if connecting_net is initiator_net else (b, a)
        if not connecting_net.behind_nat or family == 6:
            return RouteReason(
                "inbound_blocked",
                f"{nat} has a public address but takes no inbound traffic (firewall), "
                f"{public} does: {nat} connects to {public}",
            )
        return RouteReason(
            "one_side_nat",
            f"{nat} is behind IPv4 NAT, {public} has a reachable IPv4 address: "
            f"{nat} connects to {public}",
        )
    if pattern != Pattern.RELAY:
        return RouteReason("unknown", f"pattern {pattern}")
    blocked = [n for n, net in ((a, initiator_net), (b, responder_net)) if net.relay_only]
    if blocked:
        return RouteReason(
            "udp_blocked",
            f"{' and '.join(blocked)} reach{'es' if len(blocked) == 1 else ''} the overlay "
            "only over TCP 443 (UDP blocked): relayed through the TRS",
        )
    shared_v6 = initiator_net.has_ipv6 and responder_net.has_ipv6
    shared_v4 = initiator_net.has_ipv4 and responder_net.has_ipv4
    if not shared_v4 and not shared_v6:
        return RouteReason(
            "no_common_family",
            f"no address family in common ({a} has {_families(initiator_net)}, "
            f"{b} has {_families(responder_net)}): relayed through the TRS",
        )
    direct_cell = (shared_v6 and cell(Reach.IPV6, Reach.IPV6)[0] is not Pattern.RELAY) or (
        shared_v4
        and cell(initiator_net.ipv4_reach, responder_net.ipv4_reach)[0] is not Pattern.RELAY
    )
    if direct_cell:
        return RouteReason(
            "no_dialable_address",
            "no real address a peer may dial (loopback, link-local or reserved only): "
            "relayed through the TRS",
        )
    if pattern_for(initiator_net, responder_net).punch is not None:
        return RouteReason(
            "hole_punching",
            "both nodes are behind IPv4 NAT with endpoint-independent mapping: relayed "
            "through the TRS first, then direct after hole punching",
        )
    why = [
        f"{name}: {_MAPPING_WORDS[net.nat_mapping]}"
        for name, net in ((a, initiator_net), (b, responder_net))
        if net.ipv4_reach is Reach.NAT_IPV4
        and net.nat_mapping is not NatMapping.ENDPOINT_INDEPENDENT
    ]
    detail = f" ({'; '.join(why)})" if why else ""
    return RouteReason(
        "both_behind_nat",
        f"both nodes are behind IPv4 NAT{detail} and share no IPv6: relayed through the TRS",
    )


_MAPPING_WORDS = {
    NatMapping.UNKNOWN: "NAT mapping not known",
    NatMapping.NONE: "no inbound traffic (firewall)",
    NatMapping.ENDPOINT_INDEPENDENT: "endpoint-independent mapping",
    NatMapping.DEPENDENT: "symmetric mapping",
}
