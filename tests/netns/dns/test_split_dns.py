"""Split DNS by itself, driven as a user would: ``cyphonic-agent up`` in alice's namespace
makes plain ``getent hosts bob.<domain>`` work (the glibc resolver, no dig against the stub)
and puts resolv.conf back exactly on exit, and at the next start after a kill -9; an edit
made by someone else meanwhile is left alone; ``--accept-dns=false`` leaves the file alone.

The machine's own /etc/resolv.conf is never touched: ``ip netns exec`` mounts
``/etc/netns/<ns>/resolv.conf`` over /etc/resolv.conf for every process it starts in the
namespace (the agent, getent), so that file, made by this test, is the one the agent
edits. The test checks the mount is there before any agent starts, and that the machine's
file is byte for byte the same at the end. (Without that file the agent would see the
machine's; it refuses to edit a resolv.conf shared with another network namespace, which
is what the agents of the other namespace suites do.)

systemd-resolved does not run on the test machines; its command lines are checked with a
recording fake ``resolvectl`` in tests/unit/agent/test_agent_splitdns.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cyphonic_testbed import Node, pattern2
from cyphonic_testbed.overlay import AgentProcess, OverlayServices, start_services

pytestmark = [pytest.mark.netns, pytest.mark.timeout(420)]

DOMAIN = "cyphonic.internal"
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
# What the namespace's resolver holds before the agent: a TEST-NET server nobody answers
# for (the stub forwards other names there), a search list and options to keep exactly.
ORIGINAL = (
    "# made by test_split_dns\nsearch example.net\nnameserver 192.0.2.253\n"
    "options timeout:2 attempts:1 rotate\n"
)
BACKUP = "resolv.conf.cyphonic-backup.json"


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


@pytest.fixture
def dns_bed(netbed: Any, tmp_path: Path) -> Iterator[tuple[OverlayServices, dict[str, Path]]]:
    """pattern2 with AS and NMS, alice and bob enrolled, alice's namespace given its own
    resolv.conf; the machine's resolv.conf checked unchanged at the end."""
    host_before = _digest(HOST_RESOLV_CONF)
    bed = netbed(pattern2(services=("as", "nms")))
    os.chmod(tmp_path, 0o755)
    etc = Path("/etc/netns") / bed.host("alice").netns
    etc.mkdir(parents=True, exist_ok=False)
    services: OverlayServices | None = None
    try:
        (etc / "resolv.conf").write_text(ORIGINAL)
        services = start_services(bed, workdir=tmp_path / "overlay")
        states = services.enrol_all([bed.host("alice"), bed.host("bob")])
        yield services, states
    finally:
        if services is not None:
            for agent in services.agents:
                sys.stderr.write(f"\n--- agent {agent.name} ---\n{agent.log_text()[-4000:]}\n")
            services.stop()
        shutil.rmtree(etc, ignore_errors=True)
        assert _digest(HOST_RESOLV_CONF) == host_before, "the machine's resolv.conf changed"


def _private_resolv_conf(node: Node) -> Path:
    """The file ``ip netns exec`` mounts for ``node``; fails unless it really is mounted."""
    info = node.run(["cat", "/proc/self/mountinfo"], check=True).stdout
    assert any(line.split()[4] == "/etc/resolv.conf" for line in info.splitlines()), info
    return Path("/etc/netns") / node.netns / "resolv.conf"


def _getent(node: Node, name: str) -> list[str]:
    proc = node.run(["getent", "hosts", name], timeout=30)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _wait_down(agent: AgentProcess) -> None:
    agent.wait_logged("agent_stopped")


def test_getent_resolves_and_resolv_conf_comes_back_exactly(
    dns_bed: tuple[OverlayServices, dict[str, Path]],
) -> None:
    services, states = dns_bed
    alice_node, bob_node = services.bed.host("alice"), services.bed.host("bob")
    path = _private_resolv_conf(alice_node)
    backup = states["alice"] / BACKUP

    bob = services.start_agent(bob_node, states["bob"], "--accept-dns=false")
    alice = services.start_agent(alice_node, states["alice"])
    bob.wait_up()
    alice.wait_up()
    alice.wait_logged("split_dns_up")
    managed = path.read_text()
    assert managed.splitlines()[2] == "nameserver 127.0.0.1", managed
    assert "search example.net" in managed and "rotate" not in managed.split("nameserver")[-1]
    assert backup.exists()
    addresses = _getent(alice_node, bob.fqdn)
    status = bob.status()
    assert addresses and set(addresses) <= {status["virtual_ipv4"], status["virtual_ipv6"]}, (
        addresses
    )
    assert alice.status()["split_dns"]["manager"] == "resolv.conf"
    # An ordinary name still goes to the original server (nobody answers there).
    assert _getent(alice_node, "nothing.example.net") == []

    # Stop: the file is the original byte for byte, the backup gone.
    assert alice.stop() == 0
    assert path.read_text() == ORIGINAL and not backup.exists()
    assert _getent(alice_node, bob.fqdn) == []  # the overlay domain is gone with the agent

    # kill -9: the edit stays behind...
    alice = services.start_agent(alice_node, states["alice"])
    alice.wait_up()
    alice.wait_logged("split_dns_up")
    alice.proc.kill()
    alice.proc.wait(timeout=30)
    assert path.read_text() != ORIGINAL and backup.exists()
    # ...and the next start puts the original back before setting up again.
    alice = services.start_agent(alice_node, states["alice"])
    alice.wait_up()
    alice.wait_logged("split_dns_up")
    assert '"decision": "put_back"' in alice.log_text(), alice.log_text()[-3000:]
    assert _getent(alice_node, bob.fqdn)
    assert alice.stop() == 0
    assert path.read_text() == ORIGINAL and not backup.exists()


def test_someone_elses_edit_is_left_alone_and_accept_dns_false(
    dns_bed: tuple[OverlayServices, dict[str, Path]],
) -> None:
    services, states = dns_bed
    alice_node = services.bed.host("alice")
    path = _private_resolv_conf(alice_node)
    backup = states["alice"] / BACKUP

    alice = services.start_agent(alice_node, states["alice"])
    alice.wait_up()
    alice.wait_logged("split_dns_up")
    alice.proc.kill()
    alice.proc.wait(timeout=30)
    theirs = "# rewritten by the network manager\nnameserver 192.0.2.254\n"
    path.write_text(theirs)

    alice = services.start_agent(alice_node, states["alice"])
    alice.wait_up()
    alice.wait_logged("split_dns_up")
    log = alice.log_text()
    assert "resolv_conf_changed_by_others" in log, log[-3000:]
    assert (states["alice"] / (BACKUP + ".stale")).exists()  # the old original is kept
    managed = path.read_text()
    assert "nameserver 127.0.0.1" in managed and "nameserver 192.0.2.254" in managed
    assert alice.stop() == 0
    assert path.read_text() == theirs and not backup.exists()

    # --accept-dns=false: the file is not touched at all.
    alice = services.start_agent(alice_node, states["alice"], "--accept-dns=false")
    alice.wait_up()
    assert path.read_text() == theirs and not backup.exists()
    assert "split_dns_up" not in alice.log_text()
    assert alice.stop() == 0
    assert path.read_text() == theirs
