"""Test helpers shipped with the TRS: tokens, packets, and relay CIDs inside aioquic.

``use_relay_cids`` shows what a node's QUIC stack must do in pattern 3 (the agent's engine
module does the same): issue only the TRS-assigned CIDs as its own, and, as the client, open
the connection with one of the peer's TRS-assigned CIDs as the Initial's DCID.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cyphonic import relay_token
from cyphonic_trs.cid import CID_LEN
from cyphonic_trs.header import SHORT_MIN_AFTER_DCID

TEST_SECRET = b"trs-test-relay-token-secret-0123456789"


def mint_token(
    *,
    route_id: str,
    a: str,
    b: str,
    now_ms: int,
    lifetime_ms: int = 60_000,
    secret: bytes = TEST_SECRET,
) -> bytes:
    """An allocation token as the NMS mints it."""
    return relay_token.issue(
        route_id=route_id,
        initiator_fqdn=a,
        responder_fqdn=b,
        secret=secret,
        now_ms=now_ms,
        lifetime_ms=lifetime_ms,
    )


def verifier(secret: bytes = TEST_SECRET) -> Any:
    """A ``TokenVerifier`` over ``cyphonic.relay_token.verify``."""
    return lambda token, now_ms: relay_token.verify(token, secret, now_ms=now_ms)


def short_packet(dcid: bytes, payload: bytes | None = None) -> bytes:
    """A datagram shaped like a protected 1-RTT packet addressed to ``dcid``."""
    body = payload if payload is not None else os.urandom(SHORT_MIN_AFTER_DCID + 20)
    return b"\x40" + dcid + body


def random_cid() -> bytes:
    """Eight random octets, as a flood of guessed CIDs would use."""
    return os.urandom(CID_LEN)


def self_signed(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A throwaway certificate for QUIC handshakes in tests (no PKI needed for the relay)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def use_relay_cids(
    connection: Any, own: Iterable[bytes], *, peer_initial: bytes | None = None
) -> None:
    """Make an aioquic ``QuicConnection`` (1.7.x) use only ``own`` as its CIDs.

    Call it before the connection sends anything: right after creating a client (then pass
    ``peer_initial``, one of the peer's TRS CIDs, as the Initial's DCID), or when a server
    creates the connection for an incoming Initial. CIDs replenished later (after the peer
    retires some) come from the same pool; when it is empty no more are issued.
    """
    from aioquic.quic.connection import QuicConnectionId

    pool = iter(list(own))
    first = next(pool)
    connection._host_cids[0].cid = first
    connection.host_cid = first
    connection._local_initial_source_connection_id = first
    if peer_initial is not None:
        connection._peer_cid.cid = peer_initial
        # The client checks the server's echo of this in the transport parameters.
        connection._original_destination_connection_id = peer_initial

    def replenish() -> None:
        while len(connection._host_cids) < min(8, connection._remote_active_connection_id_limit):
            cid = next(pool, None)
            if cid is None:
                return
            connection._host_cids.append(
                QuicConnectionId(
                    cid=cid,
                    sequence_number=connection._host_cid_seq,
                    stateless_reset_token=os.urandom(16),
                )
            )
            connection._host_cid_seq += 1

    connection._replenish_connection_ids = replenish
