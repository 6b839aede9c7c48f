"""The TCP 443 transport beds: a node on a network where UDP does not get out.

    cloud  as .10, nms .11, trs .12, redis .13 (192.0.2.0/24, 2001:db8:100::/64)
    lana   alice 192.168.1.10, proxy 192.168.1.11 --- gwa[NAT + firewall: TCP 80/443 out
           only, no UDP at all] --- core --- lanb: bob 203.0.113.10 (global IPv4, UDP fine)

``proxy`` runs Debian's tinyproxy allowing only CONNECT to port 443. ``proxy_only`` adds a
firewall inside alice's namespace so that she reaches nothing but the proxy (and her own
TUN device): the corporate network where the proxy is the only way out (both helpers live
in ``cyphonic_testbed.proxy``, shared with the reachability matrix).
"""

from __future__ import annotations

from cyphonic_testbed import Node
from cyphonic_testbed.patterns import udp_blocked
from cyphonic_testbed.proxy import Tinyproxy, connect_via, proxy_only

__all__ = ["SERVICES", "Tinyproxy", "connect_via", "let_udp_out", "proxy_only", "udp_blocked"]

SERVICES = ("as", "nms", "trs", "redis")


def let_udp_out(gwa: Node) -> None:
    """gwa's firewall lets UDP 443 out again (the hotel fixed its Wi-Fi)."""
    proc = gwa.run(
        ["nft", "insert", "rule", "inet", "cytb_fw", "forward", "udp", "dport", "443", "accept"],
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
