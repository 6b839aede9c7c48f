"""The TUN device carrying the node's virtual addresses, configured over netlink (pyroute2).

``TunDevice.open(config)`` creates the device (``/dev/net/tun``, ``IFF_TUN | IFF_NO_PI``,
non-blocking), sets MTU and queue length, adds the virtual IPv4/IPv6 addresses (IPv6 without
duplicate address detection, so it is usable at once) and routes for the overlay prefixes,
then brings the link up. ``close()`` removes what it added and closes the descriptor (the
kernel then deletes the device). Needs CAP_NET_ADMIN.

The data path reads and writes raw IP packets with ``read_packets`` / ``write_packets``:
drain until EAGAIN on each wake-up, so one event-loop callback serves a batch of packets
(shared/DESIGN.md "Data path").

Offloads (``TunConfig(offload=True)``): the device is opened with ``IFF_VNET_HDR`` and told
with ``TUNSETOFFLOAD`` that this side takes partial checksums (CSUM) and TCP super-segments
(TSO4/TSO6), and UDP ones (USO4/USO6) where the kernel (>= 6.2) knows them. Every read and
write then carries a 10-byte ``virtio_net_hdr`` (``cyphonic_agent.offload``); a read may be a
64 KB TCP super-segment, a write may be a coalesced one. Where the kernel refuses the offload
flags, the device is reopened plain, as without the option (``TunDevice.offloads`` says what
it took, ``vnet`` whether frames carry the header).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import ipaddress
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from cyphonic.errors import InvalidArgument, PermissionDenied, Unavailable
from cyphonic.log import get_logger
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from cyphonic_agent.offload import PLAIN_HEADER, VNET_HDR_LEN, Write

TUN_DEVICE_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
OFFLOAD_TCP = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
OFFLOAD_ALL = OFFLOAD_TCP | TUN_F_USO4 | TUN_F_USO6
MAX_FRAME = VNET_HDR_LEN + 65535
"""Largest read of a device with offloads: the header and a 64 KB super-segment."""
IFNAMSIZ = 16
DEFAULT_MTU = 1420
"""Fits a 1420-byte packet plus 58 B (QUIC over UDP/IPv4) or 78 B (over IPv6) in 1500."""
READ_BATCH = 128
"""Packets read per wake-up at most, so one busy direction cannot starve the other."""

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class TunConfig:
    """What the TUN device should look like."""

    name: str = "cyphonic0"
    """Interface name (at most 15 bytes); a ``%d`` pattern lets the kernel pick a number."""
    mtu: int = DEFAULT_MTU
    """Largest inner IP packet; chosen so a full packet fits one QUIC datagram on the path."""
    ipv4: ipaddress.IPv4Interface | None = None
    """The node's virtual IPv4 address with its prefix length."""
    ipv6: ipaddress.IPv6Interface | None = None
    """The node's virtual IPv6 address with its prefix length."""
    routes: tuple[IpNetwork, ...] = ()
    """Overlay prefixes routed into the device beyond the addresses' own prefixes."""
    txqueuelen: int = 1000
    """Kernel queue in front of the device (the TUN default of 500 drops bursts)."""
    offload: bool = False
    """Ask for IFF_VNET_HDR with TSO/CSUM (and USO) offloads; plain TUN where refused."""

    def __post_init__(self) -> None:
        if not 0 < len(self.name.encode()) < IFNAMSIZ:
            raise InvalidArgument(f"interface name {self.name!r} must be 1-15 bytes")
        if not 576 <= self.mtu <= 65535:
            raise InvalidArgument(f"MTU {self.mtu} out of range")
        if self.ipv6 is not None and self.mtu < 1280:
            raise InvalidArgument("IPv6 needs an MTU of at least 1280")


@dataclass(slots=True)
class TunStats:
    """Data-path counters of a TUN device."""

    rx_packets: int = 0
    """Packets read from the device (sent by local applications)."""
    tx_packets: int = 0
    """Packets written to the device (delivered to local applications)."""
    tx_errors: int = 0
    """Packets the kernel refused (not IP, truncated) or had no room for."""
    truncated: int = 0
    """Reads that filled the whole buffer (packet may have been cut; dropped)."""
    errors: dict[int, int] = field(default_factory=dict)
    """Write errors by errno."""


def open_tun(name: str, *, vnet: bool = False) -> tuple[int, str]:
    """Create a TUN device; return its non-blocking descriptor and the kernel's name for it.

    ``vnet``: with IFF_VNET_HDR (every packet then carries a ``virtio_net_hdr``)."""
    try:
        fd = os.open(TUN_DEVICE_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise Unavailable(f"{TUN_DEVICE_PATH} missing: no TUN support here") from exc
    except PermissionError as exc:
        raise PermissionDenied(f"cannot open {TUN_DEVICE_PATH}: needs CAP_NET_ADMIN") from exc
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
        ifr = struct.pack(f"{IFNAMSIZ}sH", name.encode(), flags)
        answer = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EPERM:
            raise PermissionDenied("creating a TUN device needs CAP_NET_ADMIN") from exc
        if exc.errno == errno.EBUSY:
            raise Unavailable(f"TUN device {name} is in use") from exc
        raise Unavailable(f"cannot create TUN device {name}: {exc.strerror}") from exc
    return fd, answer[:IFNAMSIZ].rstrip(b"\x00").decode()


def open_tun_offload(name: str) -> tuple[int, str, int]:
    """Create a TUN device with the offloads the kernel takes: (fd, name, TUN_F_* flags).

    Tries TSO+CSUM with USO, then without USO (kernels before 6.2); where even that is
    refused (or IFF_VNET_HDR is), the device is made plain and the flags are 0.
    """
    fd, kernel_name = open_tun(name, vnet=True)
    for flags in (OFFLOAD_ALL, OFFLOAD_TCP):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError:
            continue
        return fd, kernel_name, flags
    # IFF_VNET_HDR cannot be taken back on this descriptor: start again without it. The
    # device goes away with its only descriptor (it is not persistent), so the name is free.
    os.close(fd)
    fd, kernel_name = open_tun(name)
    return fd, kernel_name, 0


def read_packets(
    fd: int, *, bufsize: int, limit: int = READ_BATCH, budget: int | None = None
) -> list[bytes]:
    """Read packets until EAGAIN, ``limit`` packets or ``budget`` bytes; each read returns
    exactly one packet (with offloads: one frame)."""
    packets: list[bytes] = []
    read = os.read
    try:
        if budget is None:
            while len(packets) < limit:
                packets.append(read(fd, bufsize))
        else:
            while len(packets) < limit and budget > 0:
                packet = read(fd, bufsize)
                packets.append(packet)
                budget -= len(packet)
    except BlockingIOError:
        pass
    return packets


def write_frames(fd: int, writes: Iterable[Write], stats: TunStats | None = None) -> int:
    """Write gather lists (virtio_net_hdr first) with one ``writev`` each; like
    ``write_packets`` for a device with offloads (a coalesced write counts as one)."""
    written = 0
    writev = os.writev
    for parts in writes:
        try:
            writev(fd, parts)
            written += 1
        except OSError as exc:
            if stats is not None:
                stats.tx_errors += 1
                code = exc.errno or 0
                stats.errors[code] = stats.errors.get(code, 0) + 1
    if stats is not None:
        stats.tx_packets += written
    return written


def write_packets(fd: int, packets: Iterable[bytes], stats: TunStats | None = None) -> int:
    """Write each packet to the device; return how many the kernel took.

    A refused packet (not IP: EINVAL; no buffer: ENOBUFS/EAGAIN) is counted and skipped;
    the data path never stops for one bad packet.
    """
    written = 0
    write = os.write
    for packet in packets:
        try:
            write(fd, packet)
            written += 1
        except OSError as exc:
            if stats is not None:
                stats.tx_errors += 1
                code = exc.errno or 0
                stats.errors[code] = stats.errors.get(code, 0) + 1
    if stats is not None:
        stats.tx_packets += written
    return written


class TunDevice:
    """A configured TUN device; use as a context manager or call ``close()``."""

    def __init__(
        self, *, fd: int, name: str, index: int, config: TunConfig, offloads: int = 0
    ) -> None:
        self.fd = fd
        self.name = name
        self.index = index
        self.config = config
        self.offloads = offloads
        """TUN_F_* flags the kernel took (0: a plain device)."""
        self.vnet = bool(offloads)
        """Whether every read and write carries a virtio_net_hdr."""
        self.stats = TunStats()
        # Reads of a full buffer may be truncated packets; one spare byte detects that.
        self.bufsize = (MAX_FRAME if self.vnet else config.mtu) + 1
        self._added_routes: list[IpNetwork] = []
        self._added_addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
        self._closed = False
        self._log = get_logger("agent.tun", device=name)

    @classmethod
    def open(cls, config: TunConfig) -> TunDevice:
        """Create and configure the device; on any failure nothing is left behind.

        Callable with or without a running asyncio loop (it blocks for the few netlink
        round trips either way).
        """
        return _netlink(lambda: cls._open(config))

    @classmethod
    def _open(cls, config: TunConfig) -> TunDevice:
        offloads = 0
        if config.offload:
            fd, name, offloads = open_tun_offload(config.name)
        else:
            fd, name = open_tun(config.name)
        device: TunDevice | None = None
        try:
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=name)[0]
                device = cls(fd=fd, name=name, index=index, config=config, offloads=offloads)
                device._configure(ipr)
        except NetlinkError as exc:
            if device is not None:
                device._close()
            else:
                os.close(fd)
            raise Unavailable(f"configuring {name} failed: {exc}") from exc
        except BaseException:
            if device is not None:
                device._close()
            else:
                os.close(fd)
            raise
        device._log.info(
            "tun up",
            mtu=config.mtu,
            ipv4=str(config.ipv4) if config.ipv4 else None,
            ipv6=str(config.ipv6) if config.ipv6 else None,
            routes=[str(r) for r in config.routes],
            offloads=_offload_names(offloads) if config.offload else None,
        )
        return device

    def _configure(self, ipr: IPRoute) -> None:
        cfg = self.config
        # No link-local address: nothing on the overlay uses it, and it would make the
        # kernel send router solicitations and MLD reports into the tunnel.
        _write_sysctl(f"net/ipv6/conf/{self.name}/addr_gen_mode", "1")
        ipr.link("set", index=self.index, mtu=cfg.mtu, txqlen=cfg.txqueuelen)
        if cfg.ipv4 is not None:
            ipr.addr(
                "add",
                index=self.index,
                address=str(cfg.ipv4.ip),
                prefixlen=cfg.ipv4.network.prefixlen,
            )
            self._added_addresses.append(cfg.ipv4)
        if cfg.ipv6 is not None:
            ipr.addr(
                "add",
                index=self.index,
                address=str(cfg.ipv6.ip),
                prefixlen=cfg.ipv6.network.prefixlen,
                flags=IFA_F_NODAD,
            )
            self._added_addresses.append(cfg.ipv6)
        ipr.link("set", index=self.index, state="up")
        connected = {a.network for a in self._added_addresses}
        for route in cfg.routes:
            if route in connected:
                continue  # the kernel made this route with the address
            ipr.route("replace", **self._route_args(route))
            self._added_routes.append(route)

    def read(self, limit: int = READ_BATCH, budget: int | None = None) -> list[bytes]:
        """Drain up to ``limit`` packets the kernel routed into the device (with offloads:
        frames, each a virtio_net_hdr and a packet or super-segment), stopping once
        ``budget`` bytes are read if given."""
        packets = read_packets(self.fd, bufsize=self.bufsize, limit=limit, budget=budget)
        if packets:
            full = [p for p in packets if len(p) >= self.bufsize]
            if full:
                self.stats.truncated += len(full)
                packets = [p for p in packets if len(p) < self.bufsize]
            self.stats.rx_packets += len(packets)
        return packets

    def write(self, packets: Iterable[bytes]) -> int:
        """Deliver packets to local applications; returns how many the kernel accepted."""
        if self.vnet:
            return write_frames(self.fd, ([PLAIN_HEADER, p] for p in packets), self.stats)
        return write_packets(self.fd, packets, self.stats)

    def write_frames(self, writes: Iterable[Write]) -> int:
        """Deliver gather lists that start with a virtio_net_hdr (a device with offloads)."""
        return write_frames(self.fd, writes, self.stats)

    def _route_args(self, route: IpNetwork) -> dict[str, Any]:
        # The node's own virtual address as the source of what the route carries, whatever
        # other addresses the host holds (its address is a /32 or /128 with no prefix).
        args: dict[str, Any] = {"dst": str(route), "oif": self.index}
        for iface in self._added_addresses:
            if iface.version == route.version:
                args["prefsrc"] = str(iface.ip)
        return args

    def set_routes(self, routes: Iterable[IpNetwork]) -> None:
        """Make the prefixes routed into the device exactly ``routes`` (added, removed)."""
        wanted = list(dict.fromkeys(routes))
        connected = {a.network for a in self._added_addresses}
        add = [r for r in wanted if r not in self._added_routes and r not in connected]
        remove = [r for r in self._added_routes if r not in wanted]
        if not add and not remove:
            return

        def change() -> None:
            with IPRoute() as ipr:
                for route in add:
                    ipr.route("replace", **self._route_args(route))
                    self._added_routes.append(route)
                for route in remove:
                    _ignore_gone(ipr.route, "del", dst=str(route), oif=self.index)
                    self._added_routes.remove(route)

        _netlink(change)
        self._log.info(
            "tun routes changed", added=[str(r) for r in add], removed=[str(r) for r in remove]
        )

    def set_mtu(self, mtu: int) -> None:
        """Change the device MTU (the path changed)."""

        def change() -> None:
            with IPRoute() as ipr:
                ipr.link("set", index=self.index, mtu=mtu)

        _netlink(change)
        if not self.vnet:
            self.bufsize = mtu + 1
        self._log.info("tun mtu changed", mtu=mtu)

    def close(self) -> None:
        """Remove routes and addresses this object added, then close the device."""
        _netlink(self._close)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with IPRoute() as ipr:
                for route in reversed(self._added_routes):
                    _ignore_gone(ipr.route, "del", dst=str(route), oif=self.index)
                for iface in reversed(self._added_addresses):
                    _ignore_gone(
                        ipr.addr,
                        "del",
                        index=self.index,
                        address=str(iface.ip),
                        prefixlen=iface.network.prefixlen,
                    )
        finally:
            os.close(self.fd)  # a non-persistent TUN device disappears with its last fd
            self._log.info("tun closed")

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _offload_names(flags: int) -> list[str]:
    names = {
        TUN_F_CSUM: "csum",
        TUN_F_TSO4: "tso4",
        TUN_F_TSO6: "tso6",
        TUN_F_USO4: "uso4",
        TUN_F_USO6: "uso6",
    }
    return [name for bit, name in names.items() if flags & bit] or ["refused"]


def run_netlink(fn: Callable[[], _T]) -> _T:
    """Run ``fn``, which uses pyroute2's synchronous ``IPRoute``, from anywhere (below)."""
    return _netlink(fn)


def _netlink(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` (which uses pyroute2's synchronous ``IPRoute``) safely from anywhere.

    That ``IPRoute`` drives an asyncio loop of its own, which cannot run in a thread whose
    loop is already running; there, ``fn`` runs in a short-lived worker thread. Used for
    set-up and tear-down only, never per packet.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


def _ignore_gone(call: Any, *args: Any, **kwargs: Any) -> None:
    try:
        call(*args, **kwargs)
    except NetlinkError as exc:
        # Already gone (someone removed it, or the device went down): nothing to undo.
        if exc.code not in (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV):
            raise


def _write_sysctl(key: str, value: str) -> None:
    # IPv6 disabled or a read-only /proc/sys: not worth failing for.
    with contextlib.suppress(OSError):
        (Path("/proc/sys") / key).write_text(value)
