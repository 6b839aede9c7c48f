"""Relay allocation tokens: round trip, tampering, expiry, rotation, foreign secrets."""

from __future__ import annotations

import pytest
from cyphonic import relay_token
from cyphonic.errors import InvalidArgument, TokenInvalid
from hypothesis import given
from hypothesis import strategies as st

SECRET = b"s" * 32
NOW = 1_700_000_000_000


def _token(**kw: object) -> bytes:
    args: dict[str, object] = {
        "route_id": "r-1",
        "initiator_fqdn": "a.cyphonic.internal",
        "responder_fqdn": "b.cyphonic.internal",
        "secret": SECRET,
        "now_ms": NOW,
    }
    args.update(kw)
    return relay_token.issue(**args)  # type: ignore[arg-type]


def test_round_trip() -> None:
    claims = relay_token.verify(_token(), SECRET, now_ms=NOW + 1)
    assert claims.route_id == "r-1"
    assert claims.initiator_fqdn == "a.cyphonic.internal"
    assert claims.responder_fqdn == "b.cyphonic.internal"
    assert claims.expires_ms == NOW + relay_token.DEFAULT_LIFETIME_MS
    assert claims.involves("B.cyphonic.internal") and not claims.involves("c.cyphonic.internal")
    assert claims.peer_of("a.cyphonic.internal") == "b.cyphonic.internal"
    with pytest.raises(TokenInvalid):
        claims.peer_of("c.cyphonic.internal")


def test_nonce_makes_tokens_distinct() -> None:
    assert _token() != _token()


def test_expired_token_is_refused() -> None:
    token = _token(lifetime_ms=1000)
    relay_token.verify(token, SECRET, now_ms=NOW + 999)
    with pytest.raises(TokenInvalid, match="expired"):
        relay_token.verify(token, SECRET, now_ms=NOW + 1000)


def test_foreign_secret_is_refused() -> None:
    with pytest.raises(TokenInvalid, match="signature"):
        relay_token.verify(_token(), b"x" * 32, now_ms=NOW)


def test_rotation_accepts_old_and_new() -> None:
    old = _token(secret=b"o" * 32)
    assert relay_token.verify(old, [SECRET, b"o" * 32], now_ms=NOW).route_id == "r-1"


@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_is_refused(position: int, bit: int) -> None:
    token = bytearray(_token())
    token[position % len(token)] ^= 1 << bit
    with pytest.raises(TokenInvalid):
        relay_token.verify(bytes(token), SECRET, now_ms=NOW)


@given(st.binary(max_size=200))
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(TokenInvalid):
        relay_token.verify(data, SECRET, now_ms=NOW)


def test_truncated_is_refused() -> None:
    token = _token()
    for cut in (1, 10, 33, len(token) - 1):
        with pytest.raises(TokenInvalid):
            relay_token.verify(token[:cut], SECRET, now_ms=NOW)


def test_short_secret_and_long_names_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        _token(secret=b"short")
    with pytest.raises(InvalidArgument):
        _token(route_id="x" * 256)


def test_secret_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(relay_token.ENV_SECRET, raising=False)
    assert relay_token.secret_from_env("local") == relay_token.LOCAL_SECRET
    with pytest.raises(InvalidArgument):
        relay_token.secret_from_env("production")
    monkeypatch.setenv(relay_token.ENV_SECRET, "k" * 20)
    assert relay_token.secret_from_env("production") == b"k" * 20
    with pytest.raises(InvalidArgument):
        relay_token.secret_from_env("production", "tooshort")
