#!/usr/bin/env python3
"""One end of a prototype overlay tunnel, for the data-path benchmark (run as root, in a netns).

No AS, no NMS: both ends get their certificates from files and are told each other's
address. What runs is the agent's real data path: a TUN device (``cyphonic_agent.tun``),
the packet pump (``cyphonic_agent.datapath``), the tunnel engine (``TunnelCore``) and the
project's mutual-TLS QUIC endpoint (``cyphonic.quic``) on one UDP socket, ALPN
``cyphonic-tun/1``, each side checking the other's node certificate names the peer.

    overlay_node.py --state DIR --fqdn a.cyphonic.internal --tun-address 100.64.0.1/24 \
        --listen 10.201.0.1 [--connect 10.201.0.2 --peer-fqdn b.cyphonic.internal] \
        --peer-address 100.64.0.2 --ready-file F

DIR holds node.crt (leaf + node CA), node.key and root-ca.crt, like an enrolled agent.
Writes ``--ready-file`` once the tunnel is up (connecting side) or the endpoint listens;
exits cleanly on SIGTERM/SIGINT, removing the TUN device.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import ipaddress
import signal
import sys
from pathlib import Path
from typing import Any

from cyphonic.config import ALPN_TUNNEL
from cyphonic.errors import CyphonicError
from cyphonic.log import configure, get_logger
from cyphonic.pki import TrustStore, load_certificates, load_identity
from cyphonic.quic import Acceptor, Connection, QuicEndpoint
from cyphonic_agent.datapath import DataPath, Tunnel
from cyphonic_agent.status import AgentStatus, StatusServer
from cyphonic_agent.tun import TunConfig, TunDevice
from cyphonic_agent.tunnel import TunnelCore, max_datagram_size_for


class TunnelHandler:
    """Connection handler of a tunnel: nothing but datagrams flows here in the prototype."""

    def __init__(self, conn: Connection, datapath: DataPath, tunnel: Tunnel) -> None:
        self.conn = conn
        self.datapath = datapath
        self.tunnel = tunnel

    def quic_event_received(self, event: Any) -> None:
        pass

    def connection_lost(self, error: CyphonicError | None) -> None:
        self.datapath.remove_tunnel(self.tunnel)


async def run(args: argparse.Namespace) -> None:
    log = get_logger("bench.overlay", fqdn=args.fqdn)
    identity = load_identity(args.state / "node.crt", args.state / "node.key")
    root = load_certificates(args.state / "root-ca.crt")[0]
    trust = TrustStore(root=root, node_ca=identity.chain[0])
    local_iface = ipaddress.IPv4Interface(args.tun_address)
    peer_address = ipaddress.IPv4Address(args.peer_address).packed
    tun = TunDevice.open(
        TunConfig(name=args.tun_name, mtu=args.mtu, ipv4=local_iface, offload=args.offload)
    )
    datapath = DataPath(tun=tun, partial_checksums=args.partial_checksums)

    def attach(conn: Connection) -> TunnelHandler:
        core = TunnelCore(
            conn.quic,
            mtu=args.mtu,
            max_pending=args.max_pending,
            peer_addresses=frozenset({peer_address}),
            local_addresses=frozenset({local_iface.ip.packed}),
            ack_immediately=args.ack_immediately,
        )
        peer = conn.peer.name if conn.peer else "?"
        tunnel = Tunnel(
            core=core, conn=conn, addresses=frozenset({peer_address}), label=peer, pattern="direct"
        )
        datapath.add_tunnel(tunnel)
        return TunnelHandler(conn, datapath, tunnel)

    endpoint = await QuicEndpoint.open(
        host=args.listen,
        port=args.port,
        identity=identity,
        trust=trust,
        accept={ALPN_TUNNEL: Acceptor(handler_factory=attach, expect="node")},
        max_datagram_size=max_datagram_size_for(tun_mtu=args.mtu),
        idle_timeout=30.0,
        engine=args.engine,
    )
    loop_time = asyncio.get_running_loop().time
    t0 = loop_time()

    def snapshot() -> AgentStatus:
        return AgentStatus(
            fqdn=args.fqdn,
            virtual_ipv4=str(local_iface.ip),
            nms_state="disconnected",
            nms_detail="prototype: no NMS",
            tun=tun.name,
            mtu=args.mtu,
            uptime_s=round(loop_time() - t0, 1),
            peers=[t.status() for t in datapath.tunnels()],
        )

    status = (
        await StatusServer.start(path=args.status_socket, snapshot=snapshot)
        if args.status_socket
        else None
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        datapath.start()
        if args.connect:
            await endpoint.connect(
                (args.connect, args.port),
                alpn=ALPN_TUNNEL,
                expect="node",
                expected_name=args.peer_fqdn,
                handler_factory=attach,
            )
        log.info("overlay node ready", listen=endpoint.local_address, engine=endpoint.engine)
        if args.ready_file:
            await asyncio.to_thread(Path(args.ready_file).write_text, "ready\n")
        # Keep idle tunnels alive as the agent does (a benchmark may leave one idle
        # for longer than the idle timeout while it measures other paths).
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=args.keepalive)
            for tunnel in datapath.tunnels():
                conn = tunnel.conn
                if isinstance(conn, Connection) and conn.is_ready:
                    conn.quic.send_ping(0)
                    conn.transmit()
    finally:
        datapath.stop()
        for tunnel in datapath.tunnels():
            s = tunnel.core.stats
            log.info(
                "tunnel stats",
                peer=tunnel.label,
                tx=s.tx_packets,
                rx=s.rx_packets,
                too_big=s.too_big,
                dropped_queue=s.dropped_queue_full,
                spoofed=s.dropped_spoofed,
            )
        log.info("endpoint stats", **vars(endpoint.stats))
        log.info("datapath stats", offloads=tun.offloads, **vars(datapath.stats))
        await endpoint.close()
        if status is not None:
            await status.close()
        tun.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--fqdn", required=True)
    parser.add_argument("--tun-name", default="cyphonic0")
    parser.add_argument("--tun-address", required=True, help="e.g. 100.64.0.1/24")
    parser.add_argument("--peer-address", required=True, help="the peer's virtual IPv4")
    parser.add_argument("--listen", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--connect", help="the peer's real address (this side connects)")
    parser.add_argument("--peer-fqdn", help="name the peer's certificate must carry")
    parser.add_argument("--mtu", type=int, default=1420)
    parser.add_argument("--max-pending", type=int, default=256)
    parser.add_argument(
        "--ack-immediately",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="ACK in the next transmit pass instead of after the engine's 1 ms ACK delay",
    )
    parser.add_argument(
        "--engine",
        choices=["aioquic", "qh3"],
        help="QUIC engine (default: CYPHONIC_QUIC_ENGINE, else qh3)",
    )
    parser.add_argument(
        "--keepalive",
        type=float,
        default=10.0,
        help="seconds between QUIC PINGs on each tunnel (idle timeout 30 s)",
    )
    parser.add_argument(
        "--offload",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="TUN with IFF_VNET_HDR and TSO/CSUM(/USO) offloads (plain where refused)",
    )
    parser.add_argument(
        "--partial-checksums",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --offload: take inner packets with partial checksums from the peer",
    )
    parser.add_argument("--ready-file")
    parser.add_argument("--status-socket", type=Path, help="serve the status API here")
    parser.add_argument("--profile", type=Path, help="write cProfile statistics here at exit")
    args = parser.parse_args()
    configure(level="info")
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    try:
        asyncio.run(run(args))
    except CyphonicError as exc:
        print(f"overlay_node: {exc.code_name}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
