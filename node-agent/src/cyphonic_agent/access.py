"""The agent's side of the access policy (docs/policy.md): the filter the NMS pushed, kept
and enforced on packets arriving from tunnels.

``AgentAccess`` takes each ``PolicyFilter`` the NMS pushes (an older revision than the one in
force is ignored; a malformed one is refused and the filter in force stays), owns the
``cyphonic.policy.PacketFilter`` the data path calls per packet, and reports what it did for
``cyphonic-agent status``. Until the first filter arrives, the agent lets everything in, as
agents did before policies existed: the NMS pushes the filter right after registration, and
under deny-by-default it refuses routes anyway.
"""

from __future__ import annotations

from typing import Any

from cyphonic.errors import MalformedMessage
from cyphonic.log import get_logger
from cyphonic.policy import PacketFilter, filter_from_pb
from cyphonic.v1 import signalling_pb2 as pb

log = get_logger("agent.policy")


class AgentAccess:
    """The filter in force and its counters."""

    def __init__(self, packet_filter: PacketFilter | None = None) -> None:
        self.filter = packet_filter or PacketFilter()
        self.received = False
        self.refused = 0

    @property
    def revision(self) -> int:
        return self.filter.compiled.revision

    def apply(self, message: pb.PolicyFilter) -> bool:
        """Install a pushed filter; whether it was taken."""
        if self.received and message.revision < self.revision:
            log.info("policy_filter_stale", revision=message.revision, current=self.revision)
            return False
        try:
            compiled = filter_from_pb(message)
        except MalformedMessage as exc:
            self.refused += 1
            log.warning("policy_filter_refused", error=exc.message)
            return False
        self.filter.install(compiled)
        self.received = True
        log.info(
            "policy_filter",
            revision=compiled.revision,
            allow_all=compiled.allow_all,
            entries=len(compiled.entries),
        )
        return True

    def snapshot(self) -> dict[str, Any]:
        """What ``cyphonic-agent status`` shows under ``policy``."""
        f = self.filter
        return {
            "revision": self.revision if self.received else None,
            "mode": "allow_all" if f.allow_all else "filter",
            "entries": len(f.compiled.entries),
            "flows": f.flows,
            "passed": f.passed,
            "dropped": {reason.value: n for reason, n in f.dropped.items()},
            "evicted_flows": f.evicted,
        }
