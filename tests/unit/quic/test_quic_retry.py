"""Stateless Retry: tokens (validity, expiry, address and CID binding) and when the gate
asks for one, with an explicit clock."""

from __future__ import annotations

import pytest
from cyphonic.errors import Expired, Unauthenticated
from cyphonic.quic.retry import Admit, Drop, RetryGate, RetryTokens, SendRetry

ADDR = ("192.0.2.7", 50000)
ODCID = bytes.fromhex("0102030405060708")
SCID = bytes.fromhex("a1a2a3a4a5a6a7a8")
T0 = 1_800_000_000.0


def test_a_token_names_the_original_dcid() -> None:
    tokens = RetryTokens(lifetime=10)
    token = tokens.issue(addr=ADDR, odcid=ODCID, retry_scid=SCID, now=T0)
    assert tokens.validate(token, addr=ADDR, dcid=SCID, now=T0 + 9.9) == ODCID


def test_a_token_expires() -> None:
    tokens = RetryTokens(lifetime=10)
    token = tokens.issue(addr=ADDR, odcid=ODCID, retry_scid=SCID, now=T0)
    with pytest.raises(Expired):
        tokens.validate(token, addr=ADDR, dcid=SCID, now=T0 + 10.1)
    with pytest.raises(Expired):  # from the future (clock skew beyond a second)
        tokens.validate(token, addr=ADDR, dcid=SCID, now=T0 - 5)


@pytest.mark.parametrize(
    "addr",
    [("192.0.2.8", 50000), ("192.0.2.7", 50001), ("2001:db8::7", 50000)],
    ids=["other_ip", "other_port", "other_family"],
)
def test_a_token_is_bound_to_the_address(addr: tuple[str, int]) -> None:
    tokens = RetryTokens()
    token = tokens.issue(addr=ADDR, odcid=ODCID, retry_scid=SCID, now=T0)
    with pytest.raises(Unauthenticated, match="address"):
        tokens.validate(token, addr=addr, dcid=SCID, now=T0)


def test_an_ipv4_mapped_address_is_the_same_address() -> None:
    tokens = RetryTokens()
    token = tokens.issue(
        addr=("::ffff:192.0.2.7", 50000, 0, 0), odcid=ODCID, retry_scid=SCID, now=T0
    )
    assert tokens.validate(token, addr=ADDR, dcid=SCID, now=T0) == ODCID
    assert tokens.validate(token, addr=("::ffff:c000:207", 50000), dcid=SCID, now=T0) == ODCID
    v6 = tokens.issue(addr=("fe80::1%eth0", 443, 0, 2), odcid=ODCID, retry_scid=SCID, now=T0)
    assert tokens.validate(v6, addr=("fe80::1", 443), dcid=SCID, now=T0) == ODCID


def test_a_token_is_bound_to_the_retry_cid() -> None:
    tokens = RetryTokens()
    token = tokens.issue(addr=ADDR, odcid=ODCID, retry_scid=SCID, now=T0)
    with pytest.raises(Unauthenticated):
        tokens.validate(token, addr=ADDR, dcid=ODCID, now=T0)


def test_forged_and_foreign_tokens_are_refused() -> None:
    tokens = RetryTokens()
    token = bytearray(tokens.issue(addr=ADDR, odcid=ODCID, retry_scid=SCID, now=T0))
    for i in (0, 3, 10, len(token) - 1):  # version, time, odcid, mac
        forged = bytearray(token)
        forged[i] ^= 0x01
        with pytest.raises((Unauthenticated, Expired)):
            tokens.validate(bytes(forged), addr=ADDR, dcid=SCID, now=T0)
    other = RetryTokens()  # another endpoint's key
    with pytest.raises(Unauthenticated):
        other.validate(bytes(token), addr=ADDR, dcid=SCID, now=T0)
    for junk in (b"", b"x", bytes(token[:-1]), bytes(token) + b"\0"):
        with pytest.raises(Unauthenticated):
            tokens.validate(junk, addr=ADDR, dcid=SCID, now=T0)


def test_a_shared_key_lets_replicas_accept_each_others_tokens() -> None:
    key = b"k" * 32
    token = RetryTokens(key=key).issue(addr=ADDR, odcid=ODCID, retry_scid=SCID, now=T0)
    assert RetryTokens(key=key).validate(token, addr=ADDR, dcid=SCID, now=T0 + 1) == ODCID
    with pytest.raises(ValueError):
        RetryTokens(key=b"short")


def test_the_gate_admits_below_the_threshold_and_retries_at_it() -> None:
    gate = RetryGate(threshold=3, new_cid=lambda n: SCID[:n])
    assert gate.on_initial(addr=ADDR, dcid=ODCID, token=b"", handshaking=2, now=T0) == Admit(
        odcid=ODCID
    )
    decision = gate.on_initial(addr=ADDR, dcid=ODCID, token=b"", handshaking=3, now=T0)
    assert isinstance(decision, SendRetry) and decision.scid == SCID
    # The client comes back to the Retry's CID with the token: admitted whatever the load.
    back = gate.on_initial(
        addr=ADDR, dcid=SCID, token=decision.token, handshaking=1000, now=T0 + 0.05
    )
    assert back == Admit(odcid=ODCID, retry_scid=SCID)
    # From elsewhere, or too late, or to another CID: dropped, at any load.
    for kwargs in (
        {"addr": ("198.51.100.1", 50000), "dcid": SCID, "now": T0},
        {"addr": ADDR, "dcid": SCID, "now": T0 + 60},
        {"addr": ADDR, "dcid": ODCID, "now": T0},
    ):
        for handshaking in (0, 1000):
            out = gate.on_initial(token=decision.token, handshaking=handshaking, **kwargs)  # type: ignore[arg-type]
            assert isinstance(out, Drop)


def test_threshold_zero_always_validates() -> None:
    gate = RetryGate(threshold=0)
    assert isinstance(
        gate.on_initial(addr=ADDR, dcid=ODCID, token=b"", handshaking=0, now=T0), SendRetry
    )
