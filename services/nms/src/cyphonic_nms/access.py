"""The NMS's view of the access policy: the rules in force, the nodes' tags and addresses,
and the decisions and compiled filters made from them (``cyphonic.policy`` does the logic).

Every replica keeps one ``AccessControl``. ``refresh`` reads the store's revision (one small
query; the manager calls it every ``policy_poll_s`` and right after a change made through this
replica's admin API) and reloads the document and the node list when it moved, or when a
registration marked the node list stale. A stored document that no longer parses (edited by
hand in the database) fails closed: nothing is allowed, and the error is logged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from cyphonic.log import get_logger
from cyphonic.policy import (
    ALLOW_ALL,
    DENY_ALL,
    CompiledFilter,
    Decision,
    NodeInfo,
    PeerInfo,
    Policy,
    PolicyInvalid,
    Protocol,
    can,
    compile_filter,
    parse_policy,
    reachable,
    route_allowed,
)

from cyphonic_nms.policy_store import PolicyNode, PolicyStore, StoredPolicy

log = get_logger("nms.policy")


@dataclass
class AccessControl:
    """Rules in force plus the node list they are applied to."""

    store: PolicyStore
    default_deny: bool = False
    _revision: int = field(default=-1, init=False)
    _stored: StoredPolicy | None = field(default=None, init=False)
    _policy: Policy = field(default=ALLOW_ALL, init=False)
    _nodes: dict[str, PolicyNode] = field(default_factory=dict, init=False)
    _nodes_stale: bool = field(default=True, init=False)

    @property
    def revision(self) -> int:
        return max(self._revision, 0)

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def stored(self) -> StoredPolicy | None:
        return self._stored

    def default_policy(self) -> Policy:
        return DENY_ALL if self.default_deny else ALLOW_ALL

    def nodes_changed(self) -> None:
        """A node registered, got a lease or was revoked: reload the node list next time."""
        self._nodes_stale = True

    async def refresh(self, *, force: bool = False) -> bool:
        """Reload what changed; whether the rules or the node list did."""
        revision = await self.store.revision()
        changed = False
        if force or revision != self._revision:
            stored = await self.store.current()
            self._stored = stored
            self._revision = stored.revision
            if stored.document is None:
                self._policy = self.default_policy()
            else:
                try:
                    self._policy = parse_policy(stored.document)
                except PolicyInvalid as exc:
                    log.error("stored_policy_invalid", revision=stored.revision, error=exc.message)
                    self._policy = DENY_ALL
            self._nodes_stale = True
            changed = True
        if self._nodes_stale and not self._policy.allow_all:
            # Allow-all needs no tags or addresses: the node list (every node of the
            # deployment) is loaded only once a policy names some.
            fresh = {n.fqdn: n for n in await self.store.nodes()}
            self._nodes_stale = False
            if fresh != self._nodes:
                self._nodes = fresh
                changed = True
        return changed

    def knows(self, fqdn: str) -> bool:
        """Whether ``fqdn`` is in the node list as last loaded."""
        return fqdn.lower() in self._nodes

    def info(self, fqdn: str) -> NodeInfo:
        node = self._nodes.get(fqdn.lower())
        return NodeInfo(fqdn.lower(), node.tags if node is not None else {})

    def route_allowed(self, a: str, b: str) -> bool:
        """May a tunnel between ``a`` and ``b`` exist (traffic allowed either way)?"""
        return route_allowed(self._policy, self.info(a), self.info(b))

    def reachable(self, a: str, b: str) -> bool:
        """May ``a`` start any traffic to ``b``?"""
        return reachable(self._policy, self.info(a), self.info(b))

    def can(self, a: str, b: str, proto: Protocol, port: int | None) -> Decision:
        return can(self._policy, self.info(a), self.info(b), proto, port)

    def peers(self) -> Iterable[PeerInfo]:
        for n in self._nodes.values():
            if n.ipv4 is not None and n.ipv6 is not None:
                yield PeerInfo(NodeInfo(n.fqdn, n.tags), n.ipv4, n.ipv6)

    def compile_for(self, fqdn: str) -> CompiledFilter:
        return compile_filter(self._policy, self.info(fqdn), self.peers(), revision=self.revision)
