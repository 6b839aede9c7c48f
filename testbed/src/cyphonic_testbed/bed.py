"""Build a planned topology out of real network namespaces, and tear it down whatever happens.

Naming: every namespace of a run is ``cytb<run id>-<node>`` or ``cytb<run id>-net-<network>``,
with a random 6-hex-digit run id. Interfaces are created directly inside namespaces (never in
the root namespace), so their short names (the network name on a node, the node name on a
bridge) cannot collide between runs and always fit the 15-byte limit.

Cleanup, in layers:
- ``NetBed.close()`` (also the context-manager exit and the pytest fixture teardown) kills the
  processes started through the bed, every other process left in its namespaces, and deletes
  the namespaces, the run's state file and its work directory;
- an ``atexit`` hook and a SIGTERM/SIGHUP handler close every bed still open in the process;
- ``cleanup_stale()`` removes what a killed run (SIGKILL, power cut) left behind: each run
  records its owner's PID and start time in ``/run/cyphonic-testbed/<run id>.json``, and any
  ``cytb*`` namespace whose owner is gone is removed. Live runs of other processes are left
  alone, so parallel test sessions do not disturb each other.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cyphonic_testbed.errors import CommandError, PreflightError, TestbedError, TestbedTimeout
from cyphonic_testbed.topology import Family, InterfacePlan, NodePlan, Plan, Topology, plan
from cyphonic_testbed.wait import wait_for

if TYPE_CHECKING:
    from cyphonic_testbed.capture import Capture
    from cyphonic_testbed.probes import Listener, UdpExchange
    from cyphonic_testbed.services import RedisServer

PREFIX = "cytb"
RUN_ID_RE = re.compile(rf"^{PREFIX}([0-9a-f]{{6}})-")
STATE_DIR = Path("/run/cyphonic-testbed")
BRIDGE = "br0"
#: Interface indexes: node ends from 10 on, bridge ports from 1000 on (never equal).
NODE_IFINDEX = 10
PORT_IFINDEX = 1000

#: Seconds any single setup command may take; everything is bounded.
COMMAND_TIMEOUT = 30.0
#: Seconds to wait for links to come up and addresses to leave the tentative state.
READY_TIMEOUT = 5.0
#: Seconds a tracked process gets between SIGTERM and SIGKILL at teardown.
TERM_GRACE = 2.0

_SYSCTL_NODE = {
    # Addresses usable at once: no duplicate address detection, optimistic if any.
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.all.optimistic_dad": "1",
    "net.ipv6.conf.default.optimistic_dad": "1",
    # Static routing only: no router advertisements taken or asked for.
    "net.ipv6.conf.all.accept_ra": "0",
    "net.ipv6.conf.default.accept_ra": "0",
    "net.ipv6.conf.default.router_solicitations": "0",
    # Asymmetric paths are normal here (NAT, several routers).
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}
_SYSCTL_ROUTER = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
}
_SYSCTL_SEGMENT = {
    # The bridge namespace only switches frames; it must not talk itself.
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
}


# ---------------------------------------------------------------------------------------------
# Commands


def run_command(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = COMMAND_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the current namespace, bounded by ``timeout``; raise on failure."""
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise TestbedTimeout(f"command {' '.join(argv)!r} took over {timeout:.0f}s") from exc
    except FileNotFoundError as exc:
        raise PreflightError(f"{argv[0]} not found: install it (see scripts/setup.sh)") from exc
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def _ip_batch(netns: str | None, lines: Iterable[str], *, force: bool = False) -> None:
    argv = ["ip"]
    if netns is not None:
        argv += ["-n", netns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    text = "".join(f"{line}\n" for line in lines)
    if text:
        run_command(argv, input=text, check=not force)


def _sysctl(netns: str, settings: Mapping[str, str]) -> None:
    # -e: a key this kernel lacks (e.g. optimistic_dad) is not fatal.
    argv = ["ip", "netns", "exec", netns, "sysctl", "-q", "-e", "-w"]
    run_command(argv + [f"{key}={value}" for key, value in settings.items()])


def preflight() -> None:
    """Raise ``PreflightError`` with a clear reason when this process cannot build beds."""
    reason = preflight_reason()
    if reason:
        raise PreflightError(reason)


def preflight_reason() -> str | None:
    """Why beds cannot be built here (not root, ``ip``/``nft``/``sysctl`` missing), or None."""
    if os.geteuid() != 0:
        return "network-namespace tests need root (ip netns, nftables); run them as root"
    missing = [tool for tool in ("ip", "nft", "sysctl") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}: install iproute2, nftables and procps"
    try:
        run_command(["ip", "netns", "list"], timeout=10.0)
    except TestbedError as exc:
        return f"'ip netns' does not work here: {exc}"
    return None


# ---------------------------------------------------------------------------------------------
# Namespaces and stale runs


def list_namespaces() -> list[str]:
    """Names of all network namespaces known to ``ip netns``."""
    out = run_command(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    proc = run_command(["ip", "netns", "pids", netns], check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def destroy_namespaces(names: Sequence[str]) -> None:
    """Kill every process in the namespaces ``names`` and delete them (missing ones ignored)."""
    existing = set(list_namespaces())
    names = [n for n in names if n in existing]
    # A namespace lives on while a process holds it: kill them all first.
    for _ in range(3):
        pids = {pid for ns in names for pid in _netns_pids(ns)} - {os.getpid()}
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    _ip_batch(None, (f"netns delete {ns}" for ns in names), force=True)


def _process_start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counted after the parenthesised command name.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _run_alive(run_id: str) -> bool:
    if run_id in _LIVE:
        return True
    try:
        state = json.loads((STATE_DIR / f"{run_id}.json").read_text())
        pid, started = int(state["pid"]), int(state["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return _process_start_time(pid) == started


def _workdir_for(run_id: str) -> Path:
    return Path(tempfile.gettempdir()) / f"{PREFIX}{run_id}"


def cleanup_stale() -> list[str]:
    """Remove namespaces, state files and work directories of runs whose process is gone.

    Returns the names of the namespaces removed. Runs whose owner is alive are untouched.
    """
    by_run: dict[str, list[str]] = {}
    for ns in list_namespaces():
        match = RUN_ID_RE.match(ns)
        if match:
            by_run.setdefault(match.group(1), []).append(ns)
    removed: list[str] = []
    for run_id, names in by_run.items():
        if not _run_alive(run_id):
            destroy_namespaces(names)
            removed.extend(names)
    if STATE_DIR.is_dir():
        for state in STATE_DIR.glob("*.json"):
            if not _run_alive(state.stem):
                state.unlink(missing_ok=True)
    for workdir in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        run_id = workdir.name.removeprefix(PREFIX)
        if re.fullmatch(r"[0-9a-f]{6}", run_id) and not _run_alive(run_id):
            shutil.rmtree(workdir, ignore_errors=True)
    return removed


# ---------------------------------------------------------------------------------------------
# Live beds of this process, closed at exit and on SIGTERM/SIGHUP

_LIVE: dict[str, NetBed] = {}
_STARTED_RUNS: list[str] = []
_LIVE_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False
_PREVIOUS_HANDLERS: dict[int, Any] = {}


def close_all() -> None:
    """Close every bed this process has open (not those inherited across ``fork``)."""
    with _LIVE_LOCK:
        beds = [bed for bed in _LIVE.values() if bed.owner_pid == os.getpid()]
    for bed in reversed(beds):
        with contextlib.suppress(Exception):
            bed.close()


def _on_signal(signum: int, frame: types.FrameType | None) -> None:
    close_all()
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        # Die of the same signal, as the default disposition would have.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def leftovers() -> list[str]:
    """Namespaces of runs started by this process that still exist (should be none once
    every bed is closed)."""
    ours = {f"{PREFIX}{run_id}-" for run_id in _STARTED_RUNS if run_id not in _LIVE}
    return [ns for ns in list_namespaces() if ns[: len(PREFIX) + 7] in ours]


def _install_handlers() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(close_all)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still holds
    for signum in (signal.SIGTERM, signal.SIGHUP):
        _PREVIOUS_HANDLERS[signum] = signal.getsignal(signum)
        signal.signal(signum, _on_signal)


# ---------------------------------------------------------------------------------------------
# Nodes


class Node:
    """A host, router or network segment of a bed: its namespace and helpers to use it."""

    def __init__(
        self,
        *,
        bed: NetBed,
        name: str,
        kind: Literal["host", "router", "network"],
        netns: str,
        node_plan: NodePlan | None,
    ) -> None:
        self.bed = bed
        self.name = name
        self.kind = kind
        self.netns = netns
        self.plan = node_plan
        #: Networks the node is attached to now (a move changes them).
        self._up: list[str] = list(node_plan.networks_up) if node_plan is not None else []

    def __repr__(self) -> str:
        return f"<Node {self.kind} {self.name} netns={self.netns}>"

    def _argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *[str(a) for a in argv]]

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = False,
        input: str | bytes | None = None,
        text: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside this namespace and return the CompletedProcess (output captured).

        Raises ``TestbedTimeout`` after ``timeout`` seconds (the command is killed), and
        ``CommandError`` on a non-zero exit when ``check`` is true.
        """
        full = self._argv(argv)
        try:
            proc = subprocess.run(
                full,
                input=input,
                capture_output=True,
                text=text,
                timeout=timeout,
                env=None if env is None else dict(env),
                cwd=cwd,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TestbedTimeout(
                f"{self.name}: {' '.join(full[4:])!r} took over {timeout:.1f}s"
            ) from exc
        if check and proc.returncode != 0:
            out = proc.stdout if text else proc.stdout.decode(errors="replace")
            err = proc.stderr if text else proc.stderr.decode(errors="replace")
            raise CommandError(full, proc.returncode, out, err)
        return proc

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this namespace; the process is killed when the bed closes.

        Keyword arguments go to ``subprocess.Popen``; the process always gets its own session
        so that teardown can kill it together with its children.
        """
        kwargs["start_new_session"] = True
        proc: subprocess.Popen[Any] = subprocess.Popen(self._argv(argv), **kwargs)
        self.bed._track(proc)
        return proc

    # -- addressing ------------------------------------------------------------------------

    def _require_plan(self) -> NodePlan:
        if self.plan is None:
            raise TestbedError(f"{self.name} is a network segment; it has no addresses")
        return self.plan

    def interface(self, network: str) -> str:
        """Name of this node's interface on ``network``."""
        return self._require_plan().interface(network).ifname

    @property
    def networks_up(self) -> tuple[str, ...]:
        """The networks this node is attached to now (standby uplinks excluded; a
        ``NetBed.move`` changes them)."""
        return tuple(self._up)

    def address(self, network: str | None = None, family: Family = 4) -> str:
        """This node's address (no prefix length) on ``network`` in ``family`` (4 or 6).

        Without ``network``: the address of that family on the first network the node is
        attached to now that has one. With ``network``: the planned address there, also for
        a standby uplink (where the node will be once it moves there).
        """
        node_plan = self._require_plan()
        for iface in node_plan.interfaces:
            if network is not None and iface.network != network:
                continue
            if network is None and iface.network not in self._up:
                continue
            addr = iface.address(family)
            if addr is not None:
                return str(addr.ip)
            if network is not None:
                break
        where = f" on {network}" if network else ""
        raise TestbedError(f"{self.name} has no IPv{family} address{where}")

    def addresses(self, family: Family) -> list[str]:
        """All of this node's addresses in ``family`` on the networks it is attached to now."""
        found = (
            iface.address(family)
            for iface in self._require_plan().interfaces
            if iface.network in self._up
        )
        return [str(a.ip) for a in found if a is not None]

    def has_family(self, family: Family) -> bool:
        """True when this node has at least one address of ``family``."""
        return bool(self.addresses(family))

    # -- probes, thin delegations ----------------------------------------------------------

    def ping(self, destination: str, *, count: int = 1, timeout: float = 2.0) -> bool:
        """True when ``destination`` answers an ICMP echo request within ``timeout``."""
        from cyphonic_testbed.probes import ping

        return ping(self, destination, count=count, timeout=timeout)

    def udp_echo(
        self,
        port: int,
        *,
        echo: bool = True,
        bind: str = "::",
        hello: Sequence[tuple[str, int]] = (),
    ) -> Listener:
        """Start a UDP receiver on ``port`` (echoing when ``echo``); ``hello`` targets get a
        datagram from its socket first. See ``cyphonic_testbed.probes.start_udp_echo``."""
        from cyphonic_testbed.probes import start_udp_echo

        return start_udp_echo(self, port, echo=echo, bind=bind, hello=hello)

    def tcp_listen(self, port: int, *, echo: bool = True, bind: str = "::") -> Listener:
        """Start a TCP listener on ``port`` that logs each connection (and echoes)."""
        from cyphonic_testbed.probes import start_tcp_listener

        return start_tcp_listener(self, port, echo=echo, bind=bind)

    def tcp_connect(self, host: str, port: int, *, timeout: float = 2.0) -> bytes | None:
        """Connect to ``host``:``port``; the echoed bytes, or None when it failed."""
        from cyphonic_testbed.probes import tcp_connect

        return tcp_connect(self, host, port, timeout=timeout)

    def udp_send(
        self,
        targets: Sequence[tuple[str, int]],
        payload: bytes = b"cytb-probe",
        *,
        sport: int | None = None,
        wait: float = 1.0,
    ) -> UdpExchange:
        """Send ``payload`` to each target from one socket; collect replies for ``wait`` s."""
        from cyphonic_testbed.probes import udp_send

        return udp_send(self, targets, payload, sport=sport, wait=wait)

    def capture(
        self, interface: str, bpf_filter: str = ""
    ) -> contextlib.AbstractContextManager[Capture]:
        """``with node.capture("wana", "udp") as cap:``; see ``cyphonic_testbed.capture``."""
        from cyphonic_testbed.capture import capture

        return capture(self, interface, bpf_filter)


# ---------------------------------------------------------------------------------------------
# The bed


class NetBed:
    """A topology built out of namespaces. Use as a context manager, or call ``close()``."""

    __test__ = False  # not a pytest test class

    def __init__(self, topology: Topology, *, run_id: str | None = None) -> None:
        self.topology = topology
        self.plan: Plan = plan(topology)  # validates before anything is built
        self.run_id = run_id or secrets.token_hex(3)
        if not re.fullmatch(r"[0-9a-f]{6}", self.run_id):
            raise TestbedError(f"run id must be 6 hex digits, not {self.run_id!r}")
        self.prefix = f"{PREFIX}{self.run_id}-"
        self.owner_pid = os.getpid()
        self.workdir = _workdir_for(self.run_id)
        self._nodes: dict[str, Node] = {}
        self._segments: dict[str, Node] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._built = False
        self._closed = False
        for name, node_plan in self.plan.nodes.items():
            self._nodes[name] = Node(
                bed=self,
                name=name,
                kind=node_plan.kind,
                netns=self.prefix + name,
                node_plan=node_plan,
            )
        for name in self.plan.networks:
            self._segments[name] = Node(
                bed=self,
                name=name,
                kind="network",
                netns=f"{self.prefix}net-{name}",
                node_plan=None,
            )

    def __repr__(self) -> str:
        return f"<NetBed {self.topology.name} run={self.run_id}>"

    # -- lookup ----------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        """The host or router called ``name``."""
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"no host or router {name!r} in {self.topology.name}") from None

    def host(self, name: str) -> Node:
        """The host called ``name``."""
        node = self.node(name)
        if node.kind != "host":
            raise KeyError(f"{name} is a {node.kind}, not a host")
        return node

    def router(self, name: str) -> Node:
        """The router called ``name``."""
        node = self.node(name)
        if node.kind != "router":
            raise KeyError(f"{name} is a {node.kind}, not a router")
        return node

    def network(self, name: str) -> Node:
        """The L2 segment ``name``: its namespace holds the bridge ``br0`` (capture there)."""
        try:
            return self._segments[name]
        except KeyError:
            raise KeyError(f"no network {name!r} in {self.topology.name}") from None

    @property
    def hosts(self) -> list[Node]:
        return [n for n in self._nodes.values() if n.kind == "host"]

    @property
    def routers(self) -> list[Node]:
        return [n for n in self._nodes.values() if n.kind == "router"]

    @property
    def namespaces(self) -> list[str]:
        """Every namespace name of this bed (nodes and segments)."""
        return [n.netns for n in (*self._segments.values(), *self._nodes.values())]

    # -- services --------------------------------------------------------------------------

    def start_redis(self, host: str = "redis", *, port: int = 6379) -> RedisServer:
        """Start a private ``redis-server`` inside ``host``; stopped when the bed closes."""
        from cyphonic_testbed.services import start_redis

        return start_redis(self.host(host), port=port)

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> NetBed:
        if not self._built:
            self.build()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def build(self) -> NetBed:
        """Create every namespace, link, address, route and ruleset; wait until usable."""
        if self._built or self._closed:
            raise TestbedError(f"{self!r} was already built")
        preflight()
        state_file = STATE_DIR / f"{self.run_id}.json"
        taken = set(self.namespaces) & set(list_namespaces())
        if self.run_id in _LIVE or state_file.exists() or taken:
            # Never adopt (and later delete) another run's namespaces or state.
            raise TestbedError(f"run id {self.run_id} is in use")
        self._built = True
        _STARTED_RUNS.append(self.run_id)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {
            "pid": self.owner_pid,
            "start_time": _process_start_time(self.owner_pid),
            "topology": self.topology.name,
            "created": time.time(),
        }
        # The state file exists before the first namespace, so cleanup_stale() never races us.
        state_file.write_text(json.dumps(state))
        with _LIVE_LOCK:
            _LIVE[self.run_id] = self
        _install_handlers()
        try:
            self.workdir.mkdir(mode=0o700)
            self._create()
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        self._created = self.namespaces
        _ip_batch(None, (f"netns add {ns}" for ns in self._created))

        for seg in self._segments.values():
            _sysctl(seg.netns, _SYSCTL_SEGMENT)
            _ip_batch(
                seg.netns,
                [
                    "link set dev lo up",
                    f"link add name {BRIDGE} type bridge forward_delay 0 stp_state 0 "
                    "mcast_snooping 0",
                    f"link set dev {BRIDGE} up",
                ],
            )
        for node in self._nodes.values():
            assert node.plan is not None
            settings = dict(_SYSCTL_NODE)
            if node.kind == "router":
                settings.update(_SYSCTL_ROUTER)
            _sysctl(node.netns, settings)
            _ip_batch(node.netns, self._node_lines(node))
        for name, seg in self._segments.items():
            lines = []
            for member in self.plan.members(name):
                lines += [f"link set dev {member} master {BRIDGE}", f"link set dev {member} up"]
            _ip_batch(seg.netns, lines)
        for node in self._nodes.values():
            assert node.plan is not None
            if node.plan.ruleset:
                run_command(
                    ["ip", "netns", "exec", node.netns, "nft", "-f", "-"],
                    input=node.plan.ruleset,
                )

    def _node_lines(self, node: Node) -> list[str]:
        assert node.plan is not None
        lines = ["link set dev lo up"]
        for position, iface in enumerate(node.plan.interfaces):
            seg = self._segments[iface.network]
            port = self.plan.members(iface.network).index(node.name)
            # Distinct ifindexes on the two ends: the kernel activates a veth whose ifindex
            # equals its peer's only after a batched link-watch delay of up to one second.
            lines.append(
                f"link add name {iface.ifname} index {NODE_IFINDEX + position} type veth "
                f"peer name {node.name} netns {seg.netns} index {PORT_IFINDEX + port}"
            )
            if iface.ipv6 is None:
                # IPv4-only network: not even a link-local IPv6 address.
                lines.append(f"link set dev {iface.ifname} addrgenmode none")
            if iface.up:  # a standby uplink stays down, bare, until the host moves there
                lines += _attach_lines(iface)
        for route in node.plan.routes:
            lines.append(f"route add {route.destination} via {route.via} dev {route.dev}")
        return lines

    def _wait_ready(self) -> None:
        """Wait (bounded) until every veth end is operationally up with its queue active."""
        expected: dict[str, set[str]] = {}
        standby: dict[str, set[str]] = {}  # network -> bridge ports of standby links
        for node in self._nodes.values():
            assert node.plan is not None
            expected[node.netns] = {i.ifname for i in node.plan.interfaces if i.up}
            for iface in node.plan.interfaces:
                if not iface.up:
                    standby.setdefault(iface.network, set()).add(node.name)
        for name, seg in self._segments.items():
            expected[seg.netns] = set(self.plan.members(name)) - standby.get(name, set())
        for netns, ifnames in expected.items():
            self._wait_links(netns, ifnames)

    def _wait_links(self, netns: str, ifnames: set[str], timeout: float = READY_TIMEOUT) -> None:
        """Wait (bounded) until ``ifnames`` in ``netns`` are up with no tentative address."""
        if not ifnames:
            return

        def ready() -> bool:
            links = run_command(["ip", "-n", netns, "-o", "link", "show"]).stdout
            up = {
                line.split(":")[1].strip().split("@")[0]
                for line in links.splitlines()
                if " state UP " in line and " qdisc noop " not in line
            }
            if not ifnames <= up:
                return False
            tentative = run_command(["ip", "-n", netns, "-o", "addr", "show", "tentative"])
            return not tentative.stdout.strip()

        wait_for(ready, timeout, interval=0.01, message=f"links and addresses in {netns}")

    # -- mobility --------------------------------------------------------------------------

    def move(self, host: str, to: str, *, gap: float = 0.0) -> Move:
        """Move ``host`` onto network ``to`` as a real move looks to programs on it.

        Every uplink the host is attached to now loses its addresses and goes down (its
        routes go with it); after ``gap`` seconds (a radio handover, a cable being
        replugged) the interface on ``to`` comes up with its planned addresses, and the
        default routes point at the router there. ``to`` must be one of the host's links
        (a standby one, ``Link(network, up=False)``, or one it left earlier). Returns when
        the new link is up with its addresses and routes, with the times of each step.
        """
        node = self.host(host)
        assert node.plan is not None
        try:
            target = node.plan.interface(to)
        except KeyError:
            raise TestbedError(f"{host} has no link to network {to}") from None
        if node._up == [to]:
            raise TestbedError(f"{host} is already on {to} (and only there)")
        leaving = [n for n in node._up if n != to]
        routes = self.plan.host_routes(host, [to])
        started_wall, started = time.time(), time.monotonic()
        down: list[str] = []
        for network in leaving:
            ifname = node.plan.interface(network).ifname
            down += [f"addr flush dev {ifname}", f"link set dev {ifname} down"]
        _ip_batch(node.netns, down)
        node._up = [n for n in node._up if n not in leaving]
        detached = time.monotonic()
        if gap > 0:
            time.sleep(gap)
        _ip_batch(node.netns, _attach_lines(target))
        self._wait_links(node.netns, {target.ifname})
        _ip_batch(
            node.netns,
            (f"route replace {r.destination} via {r.via} dev {r.dev}" for r in routes),
        )
        node._up = [to]
        attached = time.monotonic()
        return Move(
            host=host,
            left=tuple(leaving),
            joined=to,
            started_at=started_wall,
            detached_s=detached - started,
            attached_s=attached - started,
        )

    def _track(self, proc: subprocess.Popen[Any]) -> None:
        if self._closed:
            _stop_process(proc, grace=0.0)
            raise TestbedError(f"{self!r} is closed")
        self._procs.append(proc)

    def close(self) -> None:
        """Kill every process of the bed and delete its namespaces and files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            deadline = time.monotonic() + TERM_GRACE
            for proc in self._procs:
                _signal_group(proc, signal.SIGTERM)
            for proc in self._procs:
                _stop_process(proc, grace=max(0.0, deadline - time.monotonic()))
            if self._created:
                destroy_namespaces(self._created)
        finally:
            with _LIVE_LOCK:
                _LIVE.pop(self.run_id, None)
            (STATE_DIR / f"{self.run_id}.json").unlink(missing_ok=True)
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass(frozen=True)
class Move:
    """What ``NetBed.move`` did, and when."""

    host: str
    left: tuple[str, ...]
    joined: str
    #: Wall-clock time (``time.time()``) the old uplinks started going down.
    started_at: float
    #: Seconds from the start until the old uplinks were down and bare.
    detached_s: float
    #: Seconds from the start until the new uplink carried its addresses and routes.
    attached_s: float


def _attach_lines(iface: InterfacePlan) -> list[str]:
    """``ip`` lines bringing ``iface`` up with its planned addresses."""
    lines = [f"link set dev {iface.ifname} up"]
    if iface.ipv4 is not None:
        lines.append(f"addr add {iface.ipv4} dev {iface.ifname}")
    if iface.ipv6 is not None:
        lines.append(f"addr add {iface.ipv6} dev {iface.ifname} nodad")
    return lines


def _signal_group(proc: subprocess.Popen[Any], signum: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)


def _stop_process(proc: subprocess.Popen[Any], *, grace: float) -> None:
    """Stop ``proc`` and its process group: SIGTERM, ``grace`` seconds, then SIGKILL."""
    _signal_group(proc, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    # Children of the group may outlive the leader: kill the group either way.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def build(topology: Topology, *, run_id: str | None = None) -> NetBed:
    """Build ``topology`` and return the bed (use it as a context manager to tear it down)."""
    return NetBed(topology, run_id=run_id).build()


__all__ = [
    "Move",
    "NetBed",
    "Node",
    "build",
    "cleanup_stale",
    "close_all",
    "destroy_namespaces",
    "leftovers",
    "list_namespaces",
    "preflight",
    "preflight_reason",
    "run_command",
]
