"""Split DNS: the pure decisions, and the resolv.conf edit/restore on temporary files.

Nothing here touches the machine's /etc/resolv.conf: every ``SplitDns`` is given a file in
a temporary directory, and ``host_facts`` is replaced where the namespace check matters.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
from cyphonic.errors import InvalidArgument, MalformedMessage
from cyphonic_agent import splitdns
from cyphonic_agent.splitdns import (
    BACKUP_NAME,
    HostFacts,
    Manager,
    ResolvConfBackup,
    Restore,
    Skip,
    SplitDns,
    choose_manager,
    digest,
    managed_resolv_conf,
    mount_points,
    nameservers,
    resolvectl_commands,
    restore_decision,
)

pytestmark = pytest.mark.timeout(30)

STUB = ("127.0.0.1", 53)
ORIGINAL = "# from DHCP\nsearch example.net\nnameserver 192.0.2.53\noptions rotate ndots:2\n"


def facts(text: str | None = ORIGINAL, **kw: object) -> HostFacts:
    return HostFacts(resolv_conf=text, **kw)  # type: ignore[arg-type]


# --- choose_manager --------------------------------------------------------------------


def test_auto_uses_resolved_when_it_owns_resolv_conf() -> None:
    resolved_stub = "nameserver 127.0.0.53\noptions edns0 trust-ad\n"
    assert choose_manager("auto", stub=STUB, facts=facts(resolved_stub, resolvectl=True)) is (
        Manager.RESOLVED
    )
    linked = facts(
        "nameserver 192.0.2.1\n",
        resolv_conf_link="/run/systemd/resolve/resolv.conf",
        resolvectl=True,
    )
    assert choose_manager("auto", stub=STUB, facts=linked) is Manager.RESOLVED
    # The stub address of resolved but no resolvectl: resolv.conf is all that is left.
    assert choose_manager("auto", stub=STUB, facts=facts(resolved_stub)) is Manager.RESOLV_CONF


def test_auto_falls_back_to_resolv_conf() -> None:
    assert choose_manager("auto", stub=STUB, facts=facts(resolvectl=True)) is Manager.RESOLV_CONF
    assert choose_manager("auto", stub=STUB, facts=facts(None)) is Manager.RESOLV_CONF


def test_reasons_to_leave_the_resolver_alone() -> None:
    cases = [
        (("127.0.0.1", 5353), facts(), "port 5353"),
        (STUB, facts(resolv_conf_link="/run/resolvconf/resolv.conf"), "managed by another"),
        (STUB, facts(private=False), "shared with another network namespace"),
        (("0.0.0.0", 53), facts(), "not on an address"),
    ]
    for stub, host, reason in cases:
        decision = choose_manager("auto", stub=stub, facts=host)
        assert isinstance(decision, Skip) and reason in decision.reason, (stub, host)
    forced = choose_manager("resolved", stub=STUB, facts=facts())
    assert isinstance(forced, Skip) and "resolvectl not found" in forced.reason
    # resolved takes a port; resolv.conf cannot.
    assert (
        choose_manager("resolved", stub=("127.0.0.1", 5353), facts=facts(resolvectl=True))
        is Manager.RESOLVED
    )
    with pytest.raises(InvalidArgument):
        choose_manager("dnsmasq", stub=STUB, facts=facts())


# --- the managed file ------------------------------------------------------------------


def test_managed_file_puts_the_stub_first_and_keeps_the_rest() -> None:
    text = managed_resolv_conf(ORIGINAL, nameserver="127.0.0.1", domain="cyphonic.internal")
    assert text.startswith("# cyphonic-agent: managed for the overlay domain cyphonic.internal")
    assert nameservers(text) == ["127.0.0.1", "192.0.2.53"]
    assert "search example.net" in text and "# from DHCP" in text
    assert "options ndots:2" in text and "rotate" not in text.replace("# ", "")
    # Our own server already listed (a hand-made setup): listed once, first.
    again = managed_resolv_conf(
        "nameserver 192.0.2.1\nnameserver 127.0.0.1\noptions rotate\n",
        nameserver="127.0.0.1",
        domain="d",
    )
    assert nameservers(again) == ["127.0.0.1", "192.0.2.1"] and "options" not in again
    assert nameservers(managed_resolv_conf(None, nameserver="127.0.0.1", domain="d")) == [
        "127.0.0.1"
    ]


def backup_for(original: str | None) -> tuple[ResolvConfBackup, str]:
    managed = managed_resolv_conf(original, nameserver="127.0.0.1", domain="d")
    backup = ResolvConfBackup(
        path="/etc/resolv.conf",
        original=original,
        managed_sha256=digest(managed) or "",
        domain="d",
        nameserver="127.0.0.1",
        written_at="2026-01-01T00:00:00+00:00",
    )
    return backup, managed


def test_restore_decision_table() -> None:
    backup, managed = backup_for(ORIGINAL)
    assert restore_decision(backup, managed) is Restore.PUT_BACK
    assert restore_decision(backup, ORIGINAL) is Restore.ALREADY_BACK
    assert restore_decision(backup, managed + "nameserver 10.0.0.1\n") is Restore.CHANGED
    assert restore_decision(backup, None) is Restore.CHANGED  # someone deleted it
    missing, managed_missing = backup_for(None)
    assert restore_decision(missing, managed_missing) is Restore.PUT_BACK
    assert restore_decision(missing, None) is Restore.ALREADY_BACK


def test_backup_round_trip_and_refusals() -> None:
    backup, _ = backup_for(ORIGINAL)
    assert ResolvConfBackup.from_json(backup.to_json()) == backup
    for bad in ("{", "[]", '{"version": 9}', '{"version": 1, "path": 3}'):
        with pytest.raises(MalformedMessage):
            ResolvConfBackup.from_json(bad)


def test_resolvectl_command_lines() -> None:
    assert resolvectl_commands(link="cyphonic0", stub=STUB, domain="cyphonic.internal") == [
        ["resolvectl", "dns", "cyphonic0", "127.0.0.1"],
        ["resolvectl", "domain", "cyphonic0", "~cyphonic.internal"],
        ["resolvectl", "default-route", "cyphonic0", "false"],
    ]
    assert resolvectl_commands(link="t", stub=("::1", 5353), domain="d")[0][-1] == "[::1]:5353"


def test_mount_points_decodes_escapes() -> None:
    info = (
        "36 35 98:0 /mnt1 /mnt1 rw,noatime master:1 - ext3 /dev/root rw\n"
        "40 35 0:5 /netns/x/resolv.conf /etc/resolv.conf rw - tmpfs tmpfs rw\n"
        "41 35 0:5 / /media/with\\040space rw - tmpfs tmpfs rw\n"
    )
    assert mount_points(info) == {"/mnt1", "/etc/resolv.conf", "/media/with space"}


# --- the glue on temporary files -------------------------------------------------------


@pytest.fixture
def private_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The file under test counts as this namespace's own, whatever namespace pytest runs in."""
    monkeypatch.setattr(splitdns, "resolv_conf_is_private", lambda path=None: True)


def make(tmp_path: Path, mode: str = "auto") -> SplitDns:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    return SplitDns(
        state_dir=state, domain="cyphonic.internal", mode=mode, resolv_conf=tmp_path / "resolv"
    )


def test_install_and_remove_put_the_file_back_exactly(
    tmp_path: Path, private_host: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no resolvectl
    target = tmp_path / "resolv"
    target.write_text(ORIGINAL)
    target.chmod(0o644)
    split = make(tmp_path)

    async def go() -> None:
        await split.install(link="cyphonic0", stub=STUB)
        assert split.manager is Manager.RESOLV_CONF
        assert nameservers(target.read_text())[0] == "127.0.0.1"
        backup = split.backup_path
        assert stat.S_IMODE(backup.stat().st_mode) == 0o600
        assert ResolvConfBackup.from_json(backup.read_text()).original == ORIGINAL
        await split.remove()

    asyncio.run(go())
    assert target.read_text() == ORIGINAL
    assert not split.backup_path.exists()


def test_recover_after_a_kill_is_exact_and_idempotent(tmp_path: Path, private_host: None) -> None:
    target = tmp_path / "resolv"
    target.write_text(ORIGINAL)
    killed = make(tmp_path, "resolv.conf")
    asyncio.run(killed.install(link="t", stub=STUB))  # and never removed: kill -9
    assert target.read_text() != ORIGINAL
    assert make(tmp_path).recover() is Restore.PUT_BACK
    assert target.read_text() == ORIGINAL
    assert make(tmp_path).recover() is None  # nothing left to do


def test_recover_leaves_someone_elses_edit_alone(tmp_path: Path, private_host: None) -> None:
    target = tmp_path / "resolv"
    target.write_text(ORIGINAL)
    asyncio.run(make(tmp_path, "resolv.conf").install(link="t", stub=STUB))
    theirs = "nameserver 198.51.100.1\n"
    target.write_text(theirs)  # NetworkManager rewrote it while the agent was down
    split = make(tmp_path)
    assert split.recover() is Restore.CHANGED
    assert target.read_text() == theirs
    stale = split.backup_path.with_name(BACKUP_NAME + ".stale")
    assert ResolvConfBackup.from_json(stale.read_text()).original == ORIGINAL
    # The next edit starts from their file and puts it back.
    asyncio.run(split.install(link="t", stub=STUB))
    asyncio.run(split.remove())
    assert target.read_text() == theirs


def test_a_missing_file_is_made_and_removed_again(tmp_path: Path, private_host: None) -> None:
    target = tmp_path / "resolv"
    split = make(tmp_path, "resolv.conf")
    asyncio.run(split.install(link="t", stub=STUB))
    assert nameservers(target.read_text()) == ["127.0.0.1"]
    asyncio.run(split.remove())
    assert not target.exists()


def test_a_shared_or_linked_file_is_never_touched(tmp_path: Path) -> None:
    target = tmp_path / "resolv"
    real = tmp_path / "elsewhere"
    real.write_text(ORIGINAL)
    target.symlink_to(real)
    split = make(tmp_path, "resolv.conf")
    asyncio.run(split.install(link="t", stub=STUB))
    assert split.manager is None and "link" in split.detail
    assert real.read_text() == ORIGINAL and not split.backup_path.exists()
    target.unlink()
    target.write_text(ORIGINAL)
    # The real check: a temporary file is no mount of this namespace; unless we share PID
    # 1's network namespace (and may read it), it counts as shared.
    shared = not splitdns.resolv_conf_is_private(target)
    assert shared is (not _same_netns_as_init())


def _same_netns_as_init() -> bool:
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


def test_resolvectl_calls_on_up_and_revert_on_exit(tmp_path: Path) -> None:
    """The command lines only (a recording fake ``resolvectl``): systemd-resolved does not
    run on the test machines, so what it makes of them is checked by hand (docs/agent.md)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "resolvectl"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}:{old_path}"
    try:
        split = make(tmp_path, "resolved")
        asyncio.run(split.install(link="cyphonic0", stub=STUB))
        assert split.manager is Manager.RESOLVED
        asyncio.run(split.remove())
    finally:
        os.environ["PATH"] = old_path
    assert calls.read_text().splitlines() == [
        "dns cyphonic0 127.0.0.1",
        "domain cyphonic0 ~cyphonic.internal",
        "default-route cyphonic0 false",
        "revert cyphonic0",
    ]
    assert not (tmp_path / "resolv").exists()


def test_a_failing_resolvectl_is_reverted_and_reported(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "resolvectl"
    fake.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n[ "$1" = domain ] && echo nope >&2 && exit 1\nexit 0\n'
    )
    fake.chmod(0o755)
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}:{old_path}"
    try:
        split = make(tmp_path, "resolved")
        asyncio.run(split.install(link="cyphonic0", stub=STUB))
    finally:
        os.environ["PATH"] = old_path
    assert split.manager is None and "nope" in split.detail
    assert calls.read_text().splitlines()[-1] == "revert cyphonic0"
