"""Relay allocation control, sans-I/O: who may allocate, and what a side gets.

A node sends ``RelayAllocationRequest(allocation_token, route_id)`` over its own mutual-TLS
control connection. The token is minted by the NMS (``cyphonic.relay_token``) and binds the
route ID, the two FQDNs, an expiry and a nonce. The TRS

1. verifies the token (tag, expiry) and that it names this ``route_id``;
2. checks that the requester's certificate FQDN is one of the two nodes;
3. lets each node use a given token once (the caller claims ``replay_key`` in shared storage,
   so every replica sees the claim);
4. gives the requester's side fresh CIDs, owned by this replica, and records the side's
   address (the control connection's source); the session becomes complete, and packets
   flow, once both sides have allocated.

A node that allocates again on the same route (with a new token) gets new CIDs; its old ones
are released. Errors are typed: ``AllocationTokenError`` (a ``TokenInvalid``) for a forged,
foreign, expired or replayed token, ``WrongReplica`` when the route lives on another replica.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cyphonic.errors import CyphonicError, InvalidArgument, PermissionDenied
from cyphonic.relay_token import MAX_TOKEN_BYTES, RelayTokenClaims
from cyphonic.v1 import signalling_pb2 as pb

from cyphonic_trs.cid import CID_LEN, Rng, issue_cid
from cyphonic_trs.errors import AllocationTokenError, CidError, WrongReplica
from cyphonic_trs.session import HostPort, RelaySession, RelaySide

TokenVerifier = Callable[[bytes, int], RelayTokenClaims]
"""``(token, now_ms) -> claims``; raises ``TokenInvalid`` (e.g. ``cyphonic.relay_token.verify``
with the configured secrets bound)."""

DEFAULT_CIDS_PER_SIDE = 16
"""CIDs per side: aioquic keeps up to 8 active (its active_connection_id_limit) and issues new
ones as the peer retires old ones, so 16 leaves room for eight retirements."""
MAX_CIDS_PER_SIDE = 64
MAX_ROUTE_ID_LEN = 255


@dataclass(frozen=True, slots=True)
class AllocationGrant:
    """A verified right of ``fqdn`` to allocate its side of ``route_id``."""

    route_id: str
    fqdn: str
    peer_fqdn: str
    pair: tuple[str, str]  # both FQDNs, lower-case, sorted
    nonce: bytes
    token_expires_ms: int

    @property
    def replay_key(self) -> str:
        """Identifies this use of the token: one per token and side."""
        return f"{self.nonce.hex()}:{self.fqdn}"


class RelayAllocator:
    """Decides allocations for one TRS replica; no I/O, the clock is passed in."""

    def __init__(
        self,
        *,
        replica_id: int,
        verify_token: TokenVerifier,
        cids_per_side: int = DEFAULT_CIDS_PER_SIDE,
        idle_timeout_s: float = 300.0,
    ) -> None:
        if not 1 <= cids_per_side <= MAX_CIDS_PER_SIDE:
            raise InvalidArgument(f"cids_per_side must be 1..{MAX_CIDS_PER_SIDE}")
        self.replica_id = replica_id
        self.cids_per_side = cids_per_side
        self.idle_timeout_s = idle_timeout_s
        self._verify = verify_token

    def authorize(
        self, *, token: bytes, route_id: str, requester_fqdn: str, now_ms: int
    ) -> AllocationGrant:
        """Check the token against the request and the requester's certificate FQDN."""
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise AllocationTokenError("allocation token missing or of a wrong length")
        if not route_id or len(route_id) > MAX_ROUTE_ID_LEN:
            raise InvalidArgument("route_id missing or too long")
        try:
            claims = self._verify(token, now_ms)
        except CyphonicError as exc:
            raise AllocationTokenError(exc.message) from exc
        if claims.route_id != route_id:
            raise AllocationTokenError("allocation token is for another route")
        fqdn = requester_fqdn.lower()
        if not claims.involves(fqdn):
            raise AllocationTokenError("allocation token is for another pair of nodes")
        first, second = claims.initiator_fqdn.lower(), claims.responder_fqdn.lower()
        if first == second:
            raise AllocationTokenError("allocation token names the same node twice")
        peer = second if fqdn == first else first
        return AllocationGrant(
            route_id=route_id,
            fqdn=fqdn,
            peer_fqdn=peer,
            pair=(min(first, second), max(first, second)),
            nonce=claims.nonce,
            token_expires_ms=claims.expires_ms,
        )

    def new_cids(self, rng: Rng, *, avoid: Sequence[bytes] = ()) -> list[bytes]:
        """``cids_per_side`` fresh CIDs of this replica, none in ``avoid`` or repeated.

        Uniqueness across the replica's table is the storage's job (``reserve_cids``).
        """
        taken = set(avoid)
        out: list[bytes] = []
        for _ in range(self.cids_per_side * 4):
            cid = issue_cid(self.replica_id, rng)
            if cid not in taken:
                taken.add(cid)
                out.append(cid)
                if len(out) == self.cids_per_side:
                    return out
        raise CidError("random source keeps repeating itself")

    def allocate(
        self,
        grant: AllocationGrant,
        *,
        current: RelaySession | None,
        addr: HostPort,
        cids: Sequence[bytes],
        now_ms: int,
    ) -> tuple[RelaySession, RelaySide]:
        """The session after ``grant``'s side allocates with ``cids`` from ``addr``."""
        if len(cids) != self.cids_per_side or any(len(c) != CID_LEN for c in cids):
            raise CidError("wrong number or length of CIDs for a side")
        if current is None:
            current = RelaySession(
                route_id=grant.route_id,
                replica_id=self.replica_id,
                pair=grant.pair,
                sides=(None, None),
                created_ms=now_ms,
                version=0,
            )
        elif current.replica_id != self.replica_id:
            raise WrongReplica(
                f"route {grant.route_id} is relayed by TRS replica {current.replica_id}"
            )
        elif current.pair != grant.pair:
            raise PermissionDenied(f"route {grant.route_id} is relayed for another pair")
        side = RelaySide(fqdn=grant.fqdn, addr=addr, cids=tuple(cids), allocated_ms=now_ms)
        return current.with_side(side), side

    def answer(self, session: RelaySession, side: RelaySide, *, now_ms: int) -> pb.RelayAllocation:
        """The ``RelayAllocation`` for ``side``: its CIDs, and when an unused one lapses."""
        return pb.RelayAllocation(
            route_id=session.route_id,
            connection_ids=list(side.cids),
            expires_ms=now_ms + int(self.idle_timeout_s * 1000),
        )
