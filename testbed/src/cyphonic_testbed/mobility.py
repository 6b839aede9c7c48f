"""Mobility cases: an overlay node moves while a flow runs; shared by tests, bench and demo.

Each case is a topology with a standby uplink (``cyphonic_testbed.patterns``), the host that
moves, the networks it moves onto in turn, and the route pattern ``cyphonic-agent status``
shows before and after each move:

    nat-to-nat   alice moves between two IPv4 NAT networks (each behind NAT + enterprise
                 firewall) and back; bob on a global IPv4 address. Pattern 2 before and
                 after: alice's client-role connection migrates.
    v6-to-nat    alice moves from a global IPv6 network (behind the enterprise firewall) to
                 an IPv4 NAT network and back; bob IPv6 only. Pattern 1, then 3 through the
                 TRS, then 1 again.
    server-move  bob, who accepted alice's tunnel (pattern 2, alice behind NAT connects),
                 moves to another global IPv4 network and back: the tunnel is rebuilt via
                 the NMS.

``start_overlay`` runs AS, NMS and TRS on the embedded default (SQLite registry, in-process
CID table; the NMS is told the TRS) and one agent per end host; ``open_route`` sets up the
route from alice to bob by a DNS lookup and returns bob's virtual IPv4 address.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cyphonic_testbed.errors import TestbedError
from cyphonic_testbed.overlay import (
    AgentProcess,
    OverlayServices,
    first_reply_in,
    start_services,
    start_trs,
    trs_endpoints,
)
from cyphonic_testbed.patterns import move_nat_nat, move_server, move_v6_nat
from cyphonic_testbed.topology import Topology

if TYPE_CHECKING:
    from cyphonic_testbed.bed import NetBed

#: Interruption targets (ms): a new direct path, and one through the relay.
TARGET_DIRECT_MS = 300.0
TARGET_RELAY_MS = 1000.0


@dataclass(frozen=True)
class MoveStep:
    """One move of a case: the network the mover joins and what follows from it."""

    to: str
    #: The pattern alice's status shows for bob once the route settled after this move.
    pattern: str
    #: The interruption target for this move (ms).
    target_ms: float


@dataclass(frozen=True)
class MoveCase:
    name: str
    title: str
    topology: Callable[[], Topology]
    mover: str
    #: The pattern alice's status shows for bob before the first move.
    pattern: str
    steps: tuple[MoveStep, ...]


CASES: dict[str, MoveCase] = {
    case.name: case
    for case in (
        MoveCase(
            name="nat-to-nat",
            title="alice: IPv4 NAT -> other IPv4 NAT -> back (peer global IPv4)",
            topology=move_nat_nat,
            mover="alice",
            pattern="nat_connects",
            steps=(
                MoveStep("lanc", "nat_connects", TARGET_DIRECT_MS),
                MoveStep("lana", "nat_connects", TARGET_DIRECT_MS),
            ),
        ),
        MoveCase(
            name="v6-to-nat",
            title="alice: global IPv6 -> IPv4 NAT -> back (peer IPv6 only)",
            topology=move_v6_nat,
            mover="alice",
            # alice's firewall lets nothing in: the NMS's reachability probe finds it at
            # registration, so she connects out (pattern 2 for IPv6). Back from the NAT, the
            # route is re-decided at once, before the new probe's verdict: pattern 1, alice
            # connecting (docs/nms.md, "Reachability probes").
            pattern="nat_connects",
            steps=(
                MoveStep("lanc", "relay", TARGET_RELAY_MS),
                MoveStep("lana", "direct", TARGET_DIRECT_MS),
            ),
        ),
        MoveCase(
            name="server-move",
            title="bob (accepted the tunnel): global IPv4 -> other global IPv4 -> back",
            topology=move_server,
            mover="bob",
            pattern="nat_connects",
            steps=(
                MoveStep("lanc", "nat_connects", TARGET_DIRECT_MS),
                MoveStep("lanb", "nat_connects", TARGET_DIRECT_MS),
            ),
        ),
    )
}


@dataclass
class MobileOverlay:
    """A bed with AS, NMS and TRS serving and an agent up in alice and bob."""

    bed: NetBed
    services: OverlayServices
    agents: dict[str, AgentProcess]

    @property
    def alice(self) -> AgentProcess:
        return self.agents["alice"]

    @property
    def bob(self) -> AgentProcess:
        return self.agents["bob"]


def start_overlay(
    bed: NetBed,
    *,
    workdir: Path,
    agent_args: tuple[str, ...] = (),
) -> MobileOverlay:
    """AS, NMS and TRS on the embedded default, alice and bob enrolled and up."""
    os.environ["CYPHONIC_TRS_ENDPOINTS"] = json.dumps(trs_endpoints(bed.host("trs")))
    services = start_services(bed, workdir=workdir)
    start_trs(services)
    states = services.enrol_all([bed.host("alice"), bed.host("bob")])
    agents = {
        name: services.start_agent(bed.host(name), states[name], *agent_args)
        for name in ("alice", "bob")
    }
    for agent in agents.values():
        agent.wait_up()
    services.wait_probed([a.fqdn for a in agents.values()])
    return MobileOverlay(bed=bed, services=services, agents=agents)


def open_route(overlay: MobileOverlay) -> str:
    """The route from alice to bob, set up by a DNS lookup at alice's stub and proved by an
    echo reply; bob's virtual IPv4 address."""
    try:
        address: str = first_reply_in(overlay.bed.host("alice"), overlay.bob.fqdn)["address"]
    except TestbedError as exc:
        raise TestbedError(f"no route from alice to bob: {exc}") from exc
    return address


def peer_row(agent: AgentProcess, peer: AgentProcess) -> dict[str, Any] | None:
    """``peer``'s row in ``agent``'s status, or None."""
    for row in agent.status().get("peers", []):
        if row.get("fqdn") == peer.fqdn:
            result: dict[str, Any] = row
            return result
    return None
