"""Revocation at the node, without the NMS: the AS's CRL over QUIC, refreshed on a timer.

    every crl_refresh_s (RefreshSchedule: sooner after a failure, never later)
      agent ── QUIC, ALPN cyphonic-sig/1, the AS verified by the pinned service CA ──> AS
            CrlRequest{have_number}  ->  CrlResponse{number, crl_der (empty if unchanged)}
      check_crl: signed by the node CA, number not older than the one applied
      -> RevocationCache (in memory)
           -> TrustStore.is_revoked: every tunnel handshake, both roles, refuses a revoked
              peer (TLS alert certificate_revoked)
           -> close_revoked_on(endpoint): live tunnels of a peer revoked since close now

So a revoked peer's tunnel closes within one refresh interval even when the NMS cannot
reach either node (the NMS also cuts it off when it can, sooner). The AS connection is kept
between refreshes when the idle timeout allows and dialled again when it went away. An AS
that cannot be reached leaves the last list in force (logged, retried).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from cryptography import x509
from cyphonic.errors import CyphonicError, MalformedMessage, Timeout, Unavailable
from cyphonic.revocation import RevocationUpdate, check_crl, parse_crl
from cyphonic.session import SignallingSession
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import expect, wrap

__all__ = ["DEFAULT_CRL_REFRESH_S", "AsCrlSource"]

DEFAULT_CRL_REFRESH_S = 30.0
MAX_CRL_BYTES = 16 * 1024 * 1024

Dial = Callable[[], Awaitable[SignallingSession]]
"""Opens a signalling session with the AS (verified as the AS by the pinned service CA)."""


class AsCrlSource:
    """A ``RevocationSource``: the node CA's CRL, asked of the AS over QUIC."""

    name = "as-crl"

    def __init__(self, *, node_ca: x509.Certificate, dial: Dial, timeout: float = 5.0) -> None:
        self.node_ca = node_ca
        self._dial = dial
        self.timeout = timeout
        self.number: int | None = None
        """The CRL number applied (an older list is refused)."""
        self._session: SignallingSession | None = None

    async def fetch(self, *, cursor: int | None) -> RevocationUpdate:
        session = self._session
        if session is None or not session.is_open:
            session = self._session = await self._dial()
        try:
            answer = await session.request(
                wrap(pb.CrlRequest(have_number=self.number or 0)), timeout=self.timeout
            )
            response = expect(answer, pb.CrlResponse)
        except Timeout as exc:
            session.close(exc)
            self._session = None
            raise Unavailable("the AS did not answer the CRL request in time") from exc
        except CyphonicError:
            session.close()
            self._session = None
            raise
        if not response.crl_der:
            if self.number is None or response.number != self.number:
                raise MalformedMessage("the AS answered no CRL for a number the node lacks")
            return RevocationUpdate(serials=frozenset(), cursor=self.number, complete=False)
        if len(response.crl_der) > MAX_CRL_BYTES:
            raise MalformedMessage(f"CRL larger than {MAX_CRL_BYTES} bytes")
        crl = parse_crl(response.crl_der)
        number = check_crl(crl, node_ca=self.node_ca, not_before_number=self.number)
        self.number = number
        return RevocationUpdate(
            serials=frozenset(entry.serial_number for entry in crl), cursor=number, complete=True
        )

    async def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
