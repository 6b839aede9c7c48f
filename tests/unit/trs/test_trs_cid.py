"""Relay CIDs: layout, round trip, refusal of foreign formats."""

from __future__ import annotations

import os
import random

import pytest
from cyphonic_trs.cid import (
    CID_LEN,
    CONFIG_ID,
    MAX_REPLICA_ID,
    NONCE_LEN,
    UNROUTABLE_CONFIG,
    is_relay_cid,
    issue_cid,
    parse_cid,
    replica_of,
)
from cyphonic_trs.errors import CidError
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(deadline=None)  # a shared machine: no wall-clock deadline
@given(replica=st.integers(0, MAX_REPLICA_ID), seed=st.integers(0, 2**32))
def test_issue_then_parse_round_trips(replica: int, seed: int) -> None:
    rng = random.Random(seed)
    cid = issue_cid(replica, rng.randbytes)
    assert len(cid) == CID_LEN
    assert replica_of(cid) == replica
    fields = parse_cid(cid)
    assert fields.config_id == CONFIG_ID
    assert fields.nonce == random.Random(seed).randbytes(NONCE_LEN)
    assert is_relay_cid(cid)


def test_layout_is_quic_lb_plaintext() -> None:
    cid = issue_cid(0x1234, lambda n: bytes(range(1, n + 1)))
    # CR=0 in the top 3 bits, length self-description CID_LEN-1 in the low 5.
    assert cid[0] == (CONFIG_ID << 5) | (CID_LEN - 1)
    assert cid[1:3] == b"\x12\x34"
    assert cid[3:] == bytes(range(1, NONCE_LEN + 1))


def test_cids_from_os_random_are_distinct() -> None:
    # 40 random bits each: a repeat among 2,000 has odds of about 2e-6 (the issuer checks
    # uniqueness against the table; among 20,000 the odds were 2e-4, and it happened once).
    cids = {issue_cid(7, os.urandom) for _ in range(2000)}
    assert len(cids) == 2000
    assert {replica_of(c) for c in cids} == {7}


@pytest.mark.parametrize("replica", [-1, MAX_REPLICA_ID + 1])
def test_replica_id_out_of_range_is_refused(replica: int) -> None:
    with pytest.raises(CidError):
        issue_cid(replica, os.urandom)


def test_unknown_config_is_not_issued() -> None:
    with pytest.raises(CidError):
        issue_cid(1, os.urandom, config_id=3)


def test_short_random_source_is_refused() -> None:
    with pytest.raises(CidError):
        issue_cid(1, lambda n: b"\x00" * (n - 1))


@pytest.mark.parametrize("length", [0, 1, CID_LEN - 1, CID_LEN + 1, 20])
def test_wrong_length_is_not_a_relay_cid(length: int) -> None:
    with pytest.raises(CidError):
        replica_of(b"\x07" * length)
    assert not is_relay_cid(b"\x07" * length)


def test_unroutable_and_unknown_configs_are_refused() -> None:
    good = issue_cid(5, os.urandom)
    unroutable = bytes((UNROUTABLE_CONFIG << 5 | (CID_LEN - 1),)) + good[1:]
    unknown = bytes((2 << 5 | (CID_LEN - 1),)) + good[1:]
    bad_length_bits = bytes((CONFIG_ID << 5 | 3,)) + good[1:]
    for cid in (unroutable, unknown, bad_length_bits):
        with pytest.raises(CidError):
            parse_cid(cid)
        assert not is_relay_cid(cid)


@settings(deadline=None)  # a shared machine: no wall-clock deadline
@given(st.binary(min_size=0, max_size=24))
def test_parse_never_raises_anything_but_cid_error(data: bytes) -> None:
    try:
        fields = parse_cid(data)
    except CidError:
        return
    assert len(data) == CID_LEN and 0 <= fields.replica_id <= MAX_REPLICA_ID
