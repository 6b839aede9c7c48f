"""UDP glue: one socket on port 443 for relayed data and the TRS's own QUIC control server.

The socket is non-blocking and watched with ``loop.add_reader``. On each wake-up the
reader drains up to ``max_batch`` datagrams (until ``EAGAIN``), asks the sans-I/O
``RelayCore`` about each with one clock reading for the batch, and

- ``Forward``: ``sendto`` the unchanged datagram at once (a full send buffer drops it, as a
  router would; QUIC retransmits);
- ``ToLocalServer``: hands it to the local QUIC server's ``datagram_received(data, addr)``;
- ``Drop``: nothing (the core counts it).

No asyncio datagram transport and no callback per packet are involved (see DESIGN.md, "Data
path"). The local QUIC server is any ``asyncio.DatagramProtocol``-shaped object: it is given
a ``SocketTransport`` over the same socket through ``connection_made``, so its answers leave
from port 443 too, and a node's control connection and relayed traffic share one NAT mapping.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from cyphonic.log import get_logger

from cyphonic_trs.relay import TO_LOCAL_SERVER, Forward, RelayCore
from cyphonic_trs.session import HostPort

MAX_DATAGRAM = 65535
def _log() -> Any:
    # Looked up at call time: a logger bound at import would miss ``log.configure``.
    return get_logger("trs.server")


class LocalDatagramServer(Protocol):
    """What the TRS's own QUIC server must offer (the ``asyncio.DatagramProtocol`` shape)."""

    def connection_made(self, transport: Any) -> None: ...

    def datagram_received(self, data: bytes, addr: Any) -> None: ...


def open_udp_socket(host: str, port: int, *, buffer_bytes: int = 4 * 1024 * 1024) -> socket.socket:
    """A bound non-blocking UDP socket; ``::`` (or any IPv6 host) is dual-stack."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, buffer_bytes)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def native_addr_for(family: int) -> Callable[[HostPort], Any]:
    """The converter from a stored ``(host, port)`` to what ``recvfrom`` reports on a socket
    of ``family`` (IPv4 hosts become IPv4-mapped on a dual-stack IPv6 socket)."""
    if family == socket.AF_INET:
        return lambda hp: (hp[0], hp[1])

    def to_v6(hp: HostPort) -> Any:
        ip = ipaddress.ip_address(hp[0])
        if ip.version == 4:
            return (f"::ffff:{ip}", hp[1], 0, 0)
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return (f"::ffff:{mapped}", hp[1], 0, 0)
        return (socket.inet_ntop(socket.AF_INET6, ip.packed), hp[1], 0, 0)

    return to_v6


class SocketTransport(asyncio.DatagramTransport):
    """The shared socket seen as an asyncio datagram transport by the local QUIC server."""

    def __init__(self, sock: socket.socket, owner: RelayServer) -> None:
        super().__init__(extra={"socket": sock, "sockname": sock.getsockname()})
        self._sock = sock
        self._owner = owner
        self._closing = False

    def sendto(self, data: Any, addr: Any = None) -> None:
        try:
            self._sock.sendto(data, addr)
        except BlockingIOError:
            self._owner.send_dropped += 1
        except OSError:
            self._owner.send_errors += 1

    def close(self) -> None:
        self._closing = True

    def is_closing(self) -> bool:
        return self._closing

    def abort(self) -> None:
        self._closing = True

    def get_write_buffer_size(self) -> int:
        return 0


class RelayServer:
    """Drives ``core`` from ``sock``; hands non-relay datagrams to ``local``."""

    def __init__(
        self,
        *,
        core: RelayCore,
        sock: socket.socket,
        local: LocalDatagramServer | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_batch: int = 512,
    ) -> None:
        self.core = core
        self.sock = sock
        self.local = local
        self.clock = clock
        self.max_batch = max_batch
        self.transport = SocketTransport(sock, self)
        self.send_dropped = 0  # send buffer full
        self.send_errors = 0  # other send failures (unreachable network, ...)
        self.recv_errors = 0
        self.local_errors = 0
        self.wakeups = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> Any:
        """The bound socket address."""
        return self.sock.getsockname()

    def start(self) -> None:
        """Start reading (in the running loop) and connect the local server."""
        self._loop = asyncio.get_running_loop()
        if self.local is not None:
            self.local.connection_made(self.transport)
        self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def stop(self) -> None:
        """Stop reading; the caller closes the socket."""
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop = None
        self.transport.close()

    def _on_readable(self) -> None:
        self.wakeups += 1
        now = self.clock()
        decide = self.core.datagram_received
        recv = self.sock.recvfrom
        send = self.sock.sendto
        local = self.local
        for _ in range(self.max_batch):
            try:
                data, addr = recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                self.recv_errors += 1
                continue
            action = decide(data, addr, now)
            if action.__class__ is Forward:
                try:
                    send(data, action.to_addr)
                except BlockingIOError:
                    self.send_dropped += 1
                except OSError:
                    self.send_errors += 1
            elif action is TO_LOCAL_SERVER and local is not None:
                try:
                    local.datagram_received(data, addr)
                except Exception as exc:  # a bug in the control plane must not stop relaying
                    self.local_errors += 1
                    _log().error("local_server_error", error=type(exc).__name__, exc_info=exc)
        # Batch limit reached: the socket is still readable, epoll wakes us again after the
        # loop has run its other callbacks (timers of the control connections, admin REST).
