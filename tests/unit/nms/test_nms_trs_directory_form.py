"""The TRS directory has one definition (``cyphonic.trs_directory``): the TRS writes what the
NMS reads, key names and JSON alike, under the same prefix."""

from __future__ import annotations

import pytest
from cyphonic import trs_directory as directory
from cyphonic.errors import InvalidArgument
from cyphonic_nms.trs_directory import RedisTrsDirectory, TrsReplica
from cyphonic_trs.storage import RedisCidTable, ReplicaInfo


@pytest.mark.parametrize("prefix", ["cyphonic:", "staging:", ""])
def test_trs_and_nms_use_the_same_key_names(prefix: str) -> None:
    trs = RedisCidTable(redis=None, prefix=prefix)
    nms = RedisTrsDirectory(redis=None, prefix=prefix)
    assert trs.replicas_key == nms.replicas_key == directory.replicas_key(prefix)
    assert trs.replica_key(3) == directory.replica_key("trs-3", prefix)
    assert nms.replicas_key.startswith(prefix)


def test_what_the_trs_writes_the_nms_reads_and_back() -> None:
    info = ReplicaInfo(
        replica=3,
        endpoints=("192.0.2.10:443", "[2001:db8::10]:443"),
        server_name="trs.svc.cyphonic.internal",
        load=7,
        updated_ms=99,
        started_ms=5,
        forwarded_packets=11,
        forwarded_bytes=1200,
    )
    parsed = TrsReplica.from_json(info.to_json())
    assert parsed.replica_id == "trs-3" and parsed.load == 7 and parsed.updated_ms == 99
    assert [str(e) for e in parsed.endpoints] == list(info.endpoints)
    assert ReplicaInfo.from_json(info.to_json()) == info
    # A registration written by the NMS-side helper (tests use it) is one the TRS reads too.
    back = ReplicaInfo.from_json(parsed.to_json())
    assert (back.replica, back.endpoints, back.server_name) == (3, info.endpoints, info.server_name)


def test_entry_keeps_operator_fields_and_core_fields_win() -> None:
    entry = directory.DirectoryEntry(
        replica_id="trs-1",
        endpoints=("192.0.2.1:443",),
        server_name="trs.svc.x",
        extra={"load": 999, "zone": "a"},
    )
    again = directory.DirectoryEntry.from_json(entry.to_json())
    assert again.load == 0 and again.extra == {"zone": "a"}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "{}",
        '{"replica_id": "t", "endpoints": "1.2.3.4:1", "server_name": "s"}',
        '{"replica_id": "t", "endpoints": [], "server_name": "s", "load": "many"}',
        "[1]",
    ],
)
def test_malformed_entries_are_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument):
        directory.DirectoryEntry.from_json(text)


def test_nms_refuses_an_entry_with_a_bad_endpoint() -> None:
    bad = directory.DirectoryEntry(
        replica_id="trs-1", endpoints=("nowhere",), server_name="s"
    ).to_json()
    with pytest.raises(InvalidArgument):
        TrsReplica.from_json(bad)
