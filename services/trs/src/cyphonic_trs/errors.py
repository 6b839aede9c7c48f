"""Errors of the TRS, each a subclass of the shared tree in ``cyphonic.errors``.

    cyphonic.errors.MalformedMessage
    +-- HeaderError            a datagram that is not a parseable QUIC header
    cyphonic.errors.InvalidArgument
    +-- CidError               bytes that are not a CID of this relay's format
    cyphonic.errors.TokenInvalid
    +-- AllocationTokenError   allocation token forged, foreign, expired or replayed
    cyphonic.errors.Unavailable
    +-- WrongReplica           the route is relayed by another TRS replica
    +-- ConcurrentUpdate       a session changed under a compare-and-set; retry

Every one keeps the wire code of its parent, so the signalling layer answers it with
``to_wire()`` and the admin REST layer maps it through ``cyphonic.errors.HTTP_STATUS``.
"""

from __future__ import annotations

from cyphonic.errors import InvalidArgument, MalformedMessage, TokenInvalid, Unavailable


class HeaderError(MalformedMessage):
    """The datagram does not start with a QUIC header this relay can read."""


class CidError(InvalidArgument):
    """A connection ID of the wrong length or an unroutable configuration."""


class AllocationTokenError(TokenInvalid):
    """An allocation token that is forged, for another pair, expired or replayed."""


class WrongReplica(Unavailable):
    """The route's session lives on another TRS replica; ask the NMS again."""


class ConcurrentUpdate(Unavailable):
    """A session record changed between read and write (compare-and-set lost)."""
