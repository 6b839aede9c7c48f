"""Network-namespace test bed: hosts, routers, NATs and firewalls from a short description.

    from cyphonic_testbed import build, pattern2

    with build(pattern2()) as bed:
        alice, bob = bed.host("alice"), bed.host("bob")
        echo = bob.udp_echo(443)
        reply = alice.udp_send([(bob.address(family=4), 443)], b"hi")
        ...

See docs/testbed.md. Needs root, iproute2, nftables (and tcpdump for captures).
"""

from cyphonic_testbed.bed import (
    Move,
    NetBed,
    Node,
    build,
    cleanup_stale,
    close_all,
    list_namespaces,
    preflight,
    preflight_reason,
)
from cyphonic_testbed.capture import Capture, Packet, capture, read_pcap
from cyphonic_testbed.errors import (
    CommandError,
    PreflightError,
    TestbedError,
    TestbedTimeout,
    TopologyError,
)
from cyphonic_testbed.patterns import (
    PATTERNS,
    double_nat,
    move_nat_nat,
    move_server,
    move_v6_nat,
    pattern1,
    pattern2,
    v4_v6,
)
from cyphonic_testbed.probes import Datagram, Listener, UdpExchange, tcp_connect, udp_send
from cyphonic_testbed.services import RedisServer, postgres_url, start_redis
from cyphonic_testbed.topology import (
    FirewallPolicy,
    Host,
    Link,
    NatMapping,
    Network,
    Router,
    Topology,
    plan,
)
from cyphonic_testbed.wait import wait_for

__all__ = [
    "PATTERNS",
    "Capture",
    "CommandError",
    "Datagram",
    "FirewallPolicy",
    "Host",
    "Link",
    "Listener",
    "Move",
    "NatMapping",
    "NetBed",
    "Network",
    "Node",
    "Packet",
    "PreflightError",
    "RedisServer",
    "Router",
    "TestbedError",
    "TestbedTimeout",
    "Topology",
    "TopologyError",
    "UdpExchange",
    "build",
    "capture",
    "cleanup_stale",
    "close_all",
    "double_nat",
    "list_namespaces",
    "move_nat_nat",
    "move_server",
    "move_v6_nat",
    "pattern1",
    "pattern2",
    "plan",
    "postgres_url",
    "preflight",
    "preflight_reason",
    "read_pcap",
    "start_redis",
    "tcp_connect",
    "udp_send",
    "v4_v6",
    "wait_for",
]
