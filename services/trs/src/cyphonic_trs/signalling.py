"""QUIC request handlers of the TRS: relay allocation over a node's control connection.

The handlers are independent of the QUIC endpoint: the endpoint's signalling session calls
``handle(envelope, fqdn=..., is_node=..., addr=...)`` with the verified certificate FQDN of the
peer and the connection's current (authenticated) remote address, and sends back the answer.

Allocation, in order: the sans-I/O ``RelayAllocator`` checks the token against the request and
the certificate FQDN; the token's use by this node is claimed in the shared ``CidTable`` (a
second use is a replay, refused on every replica); fresh CIDs are reserved; the session is
written with compare-and-set (two sides allocating at once both succeed, one retrying); the
in-memory ``RelayCore`` is updated last, so packets flow only once Redis has the session.
When anything before the session write fails (wrong replica, Redis down, endless concurrent
updates), the CIDs and the token claim are released again: the token stays usable.

Address changes: ``observe_control_address`` moves a node's sides to the address its control
connection now uses. The endpoint calls it when the connection migrates, and every request
calls it too (a node's control connection and its relayed traffic share one UDP socket, so a
new NAT mapping shows on both). Nothing on the data path ever changes an address.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from typing import Any

from cyphonic.errors import (
    CyphonicError,
    InternalError,
    PermissionDenied,
    Unavailable,
    UnexpectedMessage,
)
from cyphonic.hostport import plain_address
from cyphonic.log import get_logger
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import wrap

from cyphonic_trs.allocation import AllocationGrant, RelayAllocator
from cyphonic_trs.cid import Rng
from cyphonic_trs.errors import AllocationTokenError, CidError, ConcurrentUpdate
from cyphonic_trs.relay import RelayCore
from cyphonic_trs.session import HostPort, RelaySession, RelaySide
from cyphonic_trs.storage import CidTable


def _log() -> Any:
    # Looked up at call time: a logger bound at import would miss ``log.configure``.
    return get_logger("trs.signalling")


CAS_ATTEMPTS = 5
RESERVE_ATTEMPTS = 4


def wall_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


class RelayAllocationService:
    """Allocation and address updates for one replica (glue: storage, core, allocator)."""

    def __init__(
        self,
        *,
        allocator: RelayAllocator,
        core: RelayCore,
        table: CidTable,
        session_ttl_s: float,
        rng: Rng = os.urandom,
        clock_ms: Callable[[], int] = wall_ms,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allocator = allocator
        self.core = core
        self.table = table
        self.session_ttl_s = session_ttl_s
        self.rng = rng
        self.clock_ms = clock_ms
        self.monotonic = monotonic
        self.allocations: collections.Counter[str] = collections.Counter()

    async def handle(
        self, envelope: pb.Envelope, *, fqdn: str, is_node: bool, addr: Any | None
    ) -> pb.Envelope:
        """Answer one request envelope; errors become an ``Error`` envelope.

        ``addr`` is the control connection's validated address (None while QUIC is still
        validating a new path: then nothing moves and allocation waits for a retry).
        """
        try:
            if addr is not None:
                await self.observe_control_address(fqdn, addr)
            body = envelope.WhichOneof("body")
            if body == "relay_allocation_request":
                if addr is None:
                    raise Unavailable("control connection path not validated yet; retry")
                answer = await self.allocate(
                    envelope.relay_allocation_request, fqdn=fqdn, is_node=is_node, addr=addr
                )
                return wrap(answer)
            if body == "keepalive":
                return wrap(pb.KeepaliveAck(sequence=envelope.keepalive.sequence))
            raise UnexpectedMessage(f"the TRS does not answer {body or 'an empty envelope'}")
        except CyphonicError as exc:
            return wrap(exc.to_wire())
        except Exception:
            _log().exception("request_failed", fqdn=fqdn, body=envelope.WhichOneof("body"))
            return wrap(InternalError("internal error").to_wire())

    async def allocate(
        self, request: pb.RelayAllocationRequest, *, fqdn: str, is_node: bool, addr: Any
    ) -> pb.RelayAllocation:
        """Allocate the requester's side of a relayed route (see the module docstring)."""
        log = _log().bind(fqdn=fqdn, route_id=request.route_id)
        try:
            if not is_node:
                raise PermissionDenied("only nodes allocate relays")
            answer = await self._allocate(request, fqdn=fqdn, addr=plain_address(addr))
        except CyphonicError as exc:
            self.allocations[exc.code_name] += 1
            log.info("relay_allocation_refused", code=exc.code_name, reason=exc.message)
            raise
        self.allocations["ok"] += 1
        return answer

    async def _allocate(
        self, request: pb.RelayAllocationRequest, *, fqdn: str, addr: HostPort
    ) -> pb.RelayAllocation:
        now_ms = self.clock_ms()
        grant = self.allocator.authorize(
            token=request.allocation_token,
            route_id=request.route_id,
            requester_fqdn=fqdn,
            now_ms=now_ms,
        )
        claimed = await self.table.claim_token(
            grant.replay_key, expires_ms=grant.token_expires_ms, now_ms=now_ms
        )
        if not claimed:
            raise AllocationTokenError("allocation token already used by this node")
        try:
            cids = await self._reserve_cids(grant.route_id, grant.fqdn)
            try:
                current, session, side = await self._save(
                    grant, addr=addr, cids=cids, now_ms=now_ms
                )
            except BaseException:
                await self.table.release_cids(cids)
                raise
        except BaseException:
            # Nothing was stored: the token is still unused (a retry at the right replica,
            # or after Redis is back, must not be told "already used").
            await self._release_claim(grant.replay_key)
            raise
        replaced = current.side_of(grant.fqdn) if current is not None else None
        if replaced is not None:
            await self.table.release_cids(replaced.cids)
        self.core.install(session, self.monotonic())
        _log().info(
            "relay_allocated",
            fqdn=grant.fqdn,
            route_id=grant.route_id,
            peer=grant.peer_fqdn,
            complete=session.complete,
            cids=len(side.cids),
        )
        return self.allocator.answer(session, side, now_ms=now_ms)

    async def _save(
        self, grant: AllocationGrant, *, addr: HostPort, cids: list[bytes], now_ms: int
    ) -> tuple[RelaySession | None, RelaySession, RelaySide]:
        """Write the session with ``grant``'s side (compare-and-set, retried); the stored
        session before, the session after, and the side."""
        for _ in range(CAS_ATTEMPTS):
            current = await self.table.load_session(grant.route_id)
            session, side = self.allocator.allocate(
                grant, current=current, addr=addr, cids=cids, now_ms=now_ms
            )
            try:
                await self.table.save_session(
                    session,
                    expected_version=None if current is None else current.version,
                    ttl_s=self.session_ttl_s,
                )
            except ConcurrentUpdate:
                continue
            return current, session, side
        raise ConcurrentUpdate(f"route {grant.route_id} keeps changing")

    async def _release_claim(self, key: str) -> None:
        try:
            await self.table.release_token(key)
        except CyphonicError as exc:
            # The claim then lapses with the token; the original error is what matters.
            _log().warning("token_claim_not_released", code=exc.code_name, reason=exc.message)

    async def _reserve_cids(self, route_id: str, fqdn: str) -> list[bytes]:
        cids = self.allocator.new_cids(self.rng)
        for _ in range(RESERVE_ATTEMPTS):
            taken = await self.table.reserve_cids(
                cids,
                route_id=route_id,
                fqdn=fqdn,
                replica_id=self.allocator.replica_id,
                ttl_s=self.session_ttl_s,
            )
            if not taken:
                return cids
            # A 40-bit nonce collided with a live CID: replace just those.
            keep = [c for c in cids if c not in set(taken)]
            fresh = self.allocator.new_cids(self.rng, avoid=cids)[: len(taken)]
            cids = keep + fresh
        await self.table.release_cids(cids)
        raise CidError("could not find unused CIDs")

    async def observe_control_address(self, fqdn: str, addr: Any) -> list[str]:
        """Move ``fqdn``'s sides to ``addr``, the current address of its authenticated
        control connection; the routes changed (normally none)."""
        new = plain_address(addr)
        changed = self.core.update_address(fqdn.lower(), new)
        for route_id in changed:
            for _ in range(CAS_ATTEMPTS):
                current = await self.table.load_session(route_id)
                if current is None or current.side_of(fqdn.lower()) is None:
                    break
                try:
                    await self.table.save_session(
                        current.with_address(fqdn.lower(), new),
                        expected_version=current.version,
                        ttl_s=self.session_ttl_s,
                    )
                except ConcurrentUpdate:
                    continue
                break
            _log().info("relay_address_changed", fqdn=fqdn, route_id=route_id)
        return changed

    async def release(self, route_id: str) -> None:
        """Tear a session down here and in storage (admin action); ``NotFound`` if unknown."""
        self.core.remove(route_id)
        await self.table.delete_session(route_id)

    async def restore(self) -> int:
        """Reload this replica's sessions from storage (at start); how many came back."""
        count = 0
        now = self.monotonic()
        for session in await self.table.sessions_of_replica(self.allocator.replica_id):
            try:
                self.core.install(session, now)
            except CyphonicError as exc:
                _log().warning(
                    "relay_restore_skipped", route_id=session.route_id, code=exc.code_name
                )
                continue
            count += 1
        return count
