"""A real TUN device in a fresh namespace: configuration, packets both ways, PMTU, cleanup."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]


def test_tun_device_end_to_end(agent_netns: Any) -> None:
    facts = json.loads(agent_netns.run("tun_driver.py"))
    assert facts["name"] == "cytest0"
    assert facts["mtu"] == 1400 and facts["txqlen"] == 1000 and facts["up"]
    # exactly our two addresses: no link-local (addr_gen_mode none)
    assert facts["addresses"] == ["100.64.0.1/10", "fd00:c1::1/64"]
    assert facts["routes"] == ["10.99.0.0/16", "100.64.0.0/10", "fd00:c1::/64", "fd00:c2::/48"]
    assert facts["second_open"] == "Unavailable"
    for key, src, dst in (("v4", "100.64.0.1", "100.64.0.2"), ("v6", "fd00:c1::1", "fd00:c1::2")):
        assert facts[f"{key}_read"] == 1
        assert (facts[f"{key}_src"], facts[f"{key}_dst"]) == (src, dst)
        assert facts[f"{key}_payload_ok"]
        assert facts[f"{key}_reply"] == f"answer {key}"
    # the kernel accepted our ICMP answers (checksums, quoting) and learnt the path MTU
    assert facts["v4_emsgsize"] >= 1 and "mtu 1300" in facts["v4_route_get"]
    assert facts["v6_emsgsize"] >= 1 and "mtu 1280" in facts["v6_route_get"]
    assert facts["garbage_errors"] == 2
    assert facts["after_close_links"] == 0 and facts["after_close_routes"] == []
    assert facts["in_loop"] == [1, 0]  # works from inside a running asyncio loop


def test_tun_offloads_taken_partly_taken_or_refused(agent_netns: Any) -> None:
    facts = json.loads(agent_netns.run("tun_offload_driver.py"))
    taken, no_uso, refused = facts["taken"], facts["no_uso"], facts["refused"]
    # This kernel (>= 6.2) takes CSUM, TSO4, TSO6, USO4 and USO6.
    assert taken["offloads"] == 0x01 | 0x02 | 0x04 | 0x20 | 0x40 and taken["vnet"]
    # The local UDP datagram came with its checksum left to the device (NEEDS_CSUM) and was
    # completed by the split.
    assert taken["hdr_flags"] & 1
    # A kernel without USO: TCP offloads only, still with the header.
    assert no_uso["offloads"] == 0x07 and no_uso["vnet"]
    # Nothing taken: a plain TUN, reopened without IFF_VNET_HDR.
    assert refused["offloads"] == 0 and not refused["vnet"]
    for case in (taken, no_uso, refused):
        assert case["first_byte"] == 0x45  # an IPv4 packet, no header left in front
        assert case["checksum_ok"] and case["payload_ok"]
        assert case["written"] == 1 and case["reply"] == "answer"
