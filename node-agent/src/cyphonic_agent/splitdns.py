"""Split DNS: ``cyphonic-agent up`` puts the overlay domain into the host's resolver and
takes it out again on exit (and at the next start after a kill -9).

    systemd-resolved in charge     resolvectl dns <tun> <stub>        per-link DNS server
    (resolv.conf is its stub, or   resolvectl domain <tun> ~<domain>  routing-only domain
     a link into /run/systemd/     resolvectl default-route <tun> no  nothing else goes there
     resolve/, and resolvectl)     exit: resolvectl revert <tun>; after a kill -9 the TUN
                                   link vanishes with the process and resolved forgets it
    otherwise                      /etc/resolv.conf rewritten in place:
                                     # cyphonic-agent: managed ...   (header)
                                     nameserver <stub>                (first: glibc asks it
                                     <the original, unchanged>         first; the stub
                                                                       forwards other names)
                                   the original and a hash of what was written go to a
                                   backup file in the state directory BEFORE the edit;
                                   exit, and the next start, put the original back exactly

Restoring is idempotent and never clobbers someone else's edit (``restore_decision``):
the file still holds exactly what the agent wrote -> the original goes back; it already
holds the original -> only the backup goes; anything else -> the file is left alone, the
backup kept aside (``.stale``) and the agent says so.

glibc's resolver cannot route by domain, has no port in ``nameserver`` and uses at most
three servers, so the resolv.conf way needs the stub on port 53 and every lookup of the
host passes through the stub (which forwards names outside the overlay unchanged); the
original servers stay behind it as fallbacks while the agent is down. ``options rotate``
is dropped from the managed copy (it would send overlay names to the other servers).

The decisions (``choose_manager``, ``managed_resolv_conf``, ``restore_decision``,
``mount_points``) are pure and unit-tested; ``SplitDns`` performs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import ipaddress
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cyphonic.errors import CyphonicError, InvalidArgument, MalformedMessage, Unavailable
from cyphonic.hostport import format_host_port
from cyphonic.log import get_logger

RESOLV_CONF = Path("/etc/resolv.conf")
BACKUP_NAME = "resolv.conf.cyphonic-backup.json"
BACKUP_VERSION = 1
MANAGED_HEADER = "# cyphonic-agent: managed"
RESOLVED_STUB = "127.0.0.53"
RESOLVED_RUN_DIR = "/run/systemd/resolve/"
GLIBC_MAXNS = 3
"""glibc ignores ``nameserver`` lines after the third (MAXNS)."""
RESOLVECTL_TIMEOUT_S = 10.0

MANAGERS = ("auto", "resolved", "resolv.conf")
"""Values of the ``dns_manager`` setting."""


# --- the decisions (pure) ----------------------------------------------------------------


class Manager(enum.Enum):
    """How the overlay domain gets into the host's resolver."""

    RESOLVED = "resolved"
    RESOLV_CONF = "resolv.conf"


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What ``choose_manager`` needs to know about the host."""

    resolv_conf: str | None
    """Its text, None if missing."""
    resolv_conf_link: str | None = None
    """Where /etc/resolv.conf points if it is a symbolic link."""
    resolvectl: bool = False
    """``resolvectl`` is on PATH."""
    private: bool = True
    """/etc/resolv.conf belongs to this network namespace (the host's own namespace, a
    container's, or a file ``ip netns exec`` mounted for it); False when the agent runs in
    another network namespace but sees the host's file, whose 127.0.0.1 is not ours."""


@dataclass(frozen=True, slots=True)
class Skip:
    """Decision: leave the host's resolver alone, and why."""

    reason: str


def choose_manager(mode: str, *, stub: tuple[str, int], facts: HostFacts) -> Manager | Skip:
    """Which way to set the domain up (``mode``: auto, resolved or resolv.conf)."""
    if mode not in MANAGERS:
        raise InvalidArgument(f"dns_manager must be one of {', '.join(MANAGERS)}")
    host, port = stub
    if ipaddress.ip_address(host).is_unspecified:
        return Skip(f"the stub listens on {host}, not on an address a resolver can use")
    resolved = facts.resolvectl and (
        (facts.resolv_conf_link or "").startswith(RESOLVED_RUN_DIR)
        or RESOLVED_STUB in nameservers(facts.resolv_conf or "")
    )
    if mode == "resolved" or (mode == "auto" and resolved):
        if not facts.resolvectl:
            return Skip("resolvectl not found")
        return Manager.RESOLVED
    if port != 53:
        return Skip(f"the stub listens on port {port}; a resolv.conf nameserver is port 53")
    if facts.resolv_conf_link is not None:
        return Skip(
            f"/etc/resolv.conf is a link to {facts.resolv_conf_link}, managed by another "
            "program; configure the overlay domain there (docs/agent.md)"
        )
    if not facts.private:
        return Skip(
            "/etc/resolv.conf is shared with another network namespace (the agent runs in "
            "its own, where the stub is not that file's 127.0.0.1)"
        )
    return Manager.RESOLV_CONF


def nameservers(text: str) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf, in order."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            found.append(fields[1])
    return found


def managed_resolv_conf(original: str | None, *, nameserver: str, domain: str) -> str:
    """What the agent writes: a header, our nameserver first, then the original (minus a
    duplicate of our server and ``options rotate``)."""
    lines = [
        f"{MANAGED_HEADER} for the overlay domain {domain}: the agent's DNS stub first.",
        "# The original comes back when the agent stops (kept in its state directory).",
        f"nameserver {nameserver}",
    ]
    for line in (original or "").splitlines():
        fields = line.split()
        if fields[:2] == ["nameserver", nameserver]:
            continue
        if fields and fields[0] == "options" and "rotate" in fields:
            kept = [f for f in fields[1:] if f != "rotate"]
            if not kept:
                continue
            line = "options " + " ".join(kept)
        lines.append(line)
    return "\n".join(lines) + "\n"


def digest(text: str | None) -> str | None:
    """SHA-256 of a file's text (None for a missing file)."""
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ResolvConfBackup:
    """The backup and marker of one edit of resolv.conf (one JSON file, written first)."""

    path: str
    original: str | None
    """The file's text before the edit (None: there was no file)."""
    managed_sha256: str
    """SHA-256 of what the agent wrote."""
    domain: str
    nameserver: str
    written_at: str
    version: int = BACKUP_VERSION

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "path": self.path,
                "original": self.original,
                "managed_sha256": self.managed_sha256,
                "domain": self.domain,
                "nameserver": self.nameserver,
                "written_at": self.written_at,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> ResolvConfBackup:
        """Parse a backup file; ``MalformedMessage`` if it is not one."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise MalformedMessage("resolv.conf backup is not JSON") from exc
        if not isinstance(data, dict) or data.get("version") != BACKUP_VERSION:
            raise MalformedMessage("resolv.conf backup of an unknown version")
        original = data.get("original")
        strings = ("path", "managed_sha256", "domain", "nameserver", "written_at")
        if not all(isinstance(data.get(k), str) for k in strings) or not (
            original is None or isinstance(original, str)
        ):
            raise MalformedMessage("resolv.conf backup lacks a field")
        return cls(original=original, **{k: data[k] for k in strings})


class Restore(enum.Enum):
    """What to do with a backup, given what the file holds now."""

    PUT_BACK = "put_back"
    """The file holds what the agent wrote: write the original back, drop the backup."""
    ALREADY_BACK = "already_back"
    """The file holds the original already (a restore was interrupted): drop the backup."""
    CHANGED = "changed"
    """Someone else changed the file since: leave it, keep the backup aside, say so."""


def restore_decision(backup: ResolvConfBackup, current: str | None) -> Restore:
    """Decide how to undo the edit recorded in ``backup``; ``current``: the file's text."""
    if current is not None and digest(current) == backup.managed_sha256:
        return Restore.PUT_BACK
    if current == backup.original:
        return Restore.ALREADY_BACK
    return Restore.CHANGED


def resolvectl_commands(*, link: str, stub: tuple[str, int], domain: str) -> list[list[str]]:
    """The ``resolvectl`` calls that route ``domain`` (and only it) to the stub on ``link``."""
    host, port = stub
    server = host if port == 53 else format_host_port(host, port)
    return [
        ["resolvectl", "dns", link, server],
        ["resolvectl", "domain", link, f"~{domain}"],
        ["resolvectl", "default-route", link, "false"],
    ]


def mount_points(mountinfo: str) -> set[str]:
    """Mount points listed in a /proc/<pid>/mountinfo text (octal escapes decoded)."""
    points = set()
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) >= 5:
            points.add(_unescape(fields[4]))
    return points


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


# --- the glue ------------------------------------------------------------------------------


def resolv_conf_is_private(path: Path = RESOLV_CONF) -> bool:
    """Whether ``path`` belongs to this network namespace (see ``HostFacts.private``): we
    share PID 1's network namespace, or ``path`` is mounted for us (``ip netns exec`` and
    container engines bind-mount one). When PID 1's namespace cannot be read (a container
    without ptrace rights), only the mount counts."""
    try:
        if os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino:
            return True
    except OSError:
        pass
    try:
        mounted = mount_points(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return False
    return str(path) in mounted


def host_facts(path: Path = RESOLV_CONF) -> HostFacts:
    """Look at the host: its resolv.conf, resolvectl, the namespaces."""
    link = os.readlink(path) if path.is_symlink() else None
    if link is not None and not link.startswith("/"):
        link = str((path.parent / link).resolve())
    try:
        text: str | None = path.read_text()
    except FileNotFoundError:
        text = None
    except (OSError, UnicodeDecodeError):
        text = ""
    return HostFacts(
        resolv_conf=text,
        resolv_conf_link=link,
        resolvectl=shutil.which("resolvectl") is not None,
        private=resolv_conf_is_private(path),
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _write_in_place(path: Path, text: str | None) -> None:
    """Write ``path`` in place (it may be a bind mount: a rename over it would fail with
    EBUSY, and would break the mount); None removes it."""
    if text is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class SplitDns:
    """Sets the overlay domain up in the host's resolver and puts everything back."""

    def __init__(
        self,
        *,
        state_dir: Path,
        domain: str,
        mode: str = "auto",
        resolv_conf: Path = RESOLV_CONF,
        fqdn: str = "",
    ) -> None:
        self.backup_path = state_dir / BACKUP_NAME
        self.domain = domain
        self.mode = mode
        self.resolv_conf = resolv_conf
        self.manager: Manager | None = None
        """What ``install`` did (None: nothing)."""
        self.link: str | None = None
        self.detail = "off"
        """What the status shows: ``resolved on <link>``, ``/etc/resolv.conf``, or why not."""
        self._log = get_logger("agent.dns", fqdn=fqdn)

    # -- resolv.conf

    def recover(self) -> Restore | None:
        """At start: undo an edit a killed agent left behind (None: there was none)."""
        try:
            text = self.backup_path.read_text()
        except FileNotFoundError:
            return None
        try:
            backup = ResolvConfBackup.from_json(text)
        except MalformedMessage as exc:
            self._log.warning("resolv_conf_backup_unreadable", error=exc.message)
            self._set_aside()
            return Restore.CHANGED
        decision = self._undo(backup)
        self._log.info("resolv_conf_recovered", decision=decision.value, path=backup.path)
        return decision

    def _undo(self, backup: ResolvConfBackup) -> Restore:
        path = Path(backup.path)
        decision = restore_decision(backup, _read(path))
        if decision is Restore.PUT_BACK:
            _write_in_place(path, backup.original)
            self.backup_path.unlink()
        elif decision is Restore.ALREADY_BACK:
            self.backup_path.unlink()
        else:
            kept = self._set_aside()
            self._log.warning(
                "resolv_conf_changed_by_others",
                path=str(path),
                detail="changed since the agent edited it: left as it is",
                original_kept_in=str(kept),
            )
        return decision

    def _set_aside(self) -> Path:
        stale = self.backup_path.with_name(self.backup_path.name + ".stale")
        os.replace(self.backup_path, stale)
        return stale

    def _install_resolv_conf(self, stub: tuple[str, int]) -> None:
        if self.backup_path.exists():  # a recover() that could not finish
            raise Unavailable(f"{self.backup_path} exists: a previous edit is not undone")
        original = _read(self.resolv_conf)
        managed = managed_resolv_conf(original, nameserver=stub[0], domain=self.domain)
        backup = ResolvConfBackup(
            path=str(self.resolv_conf),
            original=original,
            managed_sha256=digest(managed) or "",
            domain=self.domain,
            nameserver=stub[0],
            written_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        _write_atomic(self.backup_path, backup.to_json())  # the marker first, then the edit
        try:
            _write_in_place(self.resolv_conf, managed)
        except OSError:
            self.backup_path.unlink()
            raise
        servers = nameservers(managed)
        if len(servers) > GLIBC_MAXNS:
            self._log.warning(
                "resolv_conf_too_many_servers",
                ignored=servers[GLIBC_MAXNS:],
                detail=f"glibc uses the first {GLIBC_MAXNS}",
            )

    # -- systemd-resolved

    async def _resolvectl(self, argv: Sequence[str]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            async with asyncio.timeout(RESOLVECTL_TIMEOUT_S):
                _, err = await proc.communicate()
        except (OSError, TimeoutError) as exc:
            raise Unavailable(f"{' '.join(argv)}: {exc}") from exc
        if proc.returncode != 0:
            raise Unavailable(f"{' '.join(argv)} failed: {err.decode(errors='replace').strip()}")

    # -- both

    async def install(self, *, link: str, stub: tuple[str, int]) -> None:
        """Set the domain up (never raises: a failure is logged and split DNS stays off)."""
        facts = await asyncio.to_thread(host_facts, self.resolv_conf)
        try:
            decision = choose_manager(self.mode, stub=stub, facts=facts)
        except CyphonicError as exc:
            decision = Skip(exc.message)
        if isinstance(decision, Skip):
            self.detail = f"not set up: {decision.reason}"
            self._log.warning("split_dns_skipped", reason=decision.reason)
            return
        try:
            if decision is Manager.RESOLVED:
                self.link = link
                self.manager = decision
                for argv in resolvectl_commands(link=link, stub=stub, domain=self.domain):
                    await self._resolvectl(argv)
                self.detail = f"systemd-resolved: ~{self.domain} on {link}"
            else:
                await asyncio.to_thread(self._install_resolv_conf, stub)
                self.manager = decision
                self.detail = f"{self.resolv_conf}: nameserver {stub[0]} first"
        except (CyphonicError, OSError) as exc:
            message = exc.message if isinstance(exc, CyphonicError) else str(exc)
            self.detail = f"not set up: {message}"
            self._log.warning("split_dns_failed", manager=decision.value, error=message)
            await self.remove()
            return
        self._log.info("split_dns_up", manager=decision.value, domain=self.domain, stub=stub)

    async def remove(self) -> None:
        """Put the host's resolver back as it was (never raises)."""
        manager, self.manager = self.manager, None
        if manager is Manager.RESOLVED and self.link is not None:
            try:
                await self._resolvectl(["resolvectl", "revert", self.link])
            except CyphonicError as exc:
                self._log.warning("split_dns_revert_failed", error=exc.message)
        elif manager is Manager.RESOLV_CONF:
            try:
                backup = ResolvConfBackup.from_json(self.backup_path.read_text())
                decision = await asyncio.to_thread(self._undo, backup)
            except (CyphonicError, OSError) as exc:
                message = exc.message if isinstance(exc, CyphonicError) else str(exc)
                self._log.warning("resolv_conf_restore_failed", error=message)
                return
            self._log.info("split_dns_down", decision=decision.value)
            return
        else:
            return
        self._log.info("split_dns_down", manager=manager.value)

    def describe(self) -> dict[str, Any]:
        """For the status: the manager in use and the detail line."""
        return {"manager": self.manager.value if self.manager else None, "detail": self.detail}
