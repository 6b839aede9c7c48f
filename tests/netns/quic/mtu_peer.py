"""A QUIC endpoint process for the small-MTU namespace test (run inside a namespace).

mtu_peer.py serve PKI_DIR NAME HOST PORT
    accept tunnel connections and echo every DATAGRAM; prints ``ready``.
mtu_peer.py client PKI_DIR NAME PEER=HOST:PORT ...
    connect to each peer, print ``ready``, then obey stdin, one command a line:
    ``burst PEER COUNT`` sends COUNT full-size datagrams at once and waits (5 s at
    most) for their echoes; ``quit``. Each command answers one JSON line: echoes
    received and the endpoint's counters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from aioquic.quic.events import QuicEvent
from cyphonic import pki
from cyphonic.config import ALPN_TUNNEL
from cyphonic.errors import CyphonicError
from cyphonic.hostport import parse_host_port
from cyphonic.quic import Acceptor, Connection, QuicEndpoint

DOMAIN = "cyphonic.internal"


class Echo:
    def __init__(self, conn: Connection) -> None:
        conn.datagram_handler = lambda data: conn.send_datagram(data) and None

    def quic_event_received(self, event: QuicEvent) -> None:
        pass

    def connection_lost(self, error: CyphonicError | None) -> None:
        pass


class Counter:
    def __init__(self, conn: Connection) -> None:
        self.received = 0
        conn.datagram_handler = self._count

    def _count(self, data: bytes) -> None:
        self.received += 1

    def quic_event_received(self, event: QuicEvent) -> None:
        pass

    def connection_lost(self, error: CyphonicError | None) -> None:
        pass


def _identity(directory: Path, name: str) -> tuple[pki.CertifiedKey, pki.TrustStore]:
    identity = pki.load_identity(directory / f"{name}.crt", directory / f"{name}.key")
    return identity, pki.load_trust_store(directory)


async def serve(directory: Path, name: str, host: str, port: int) -> None:
    identity, trust = _identity(directory, name)
    await QuicEndpoint.open(
        host=host,
        port=port,
        identity=identity,
        trust=trust,
        accept={ALPN_TUNNEL: Acceptor(Echo, expect="node")},
    )
    print("ready", flush=True)
    await asyncio.Event().wait()


async def client(directory: Path, name: str, peers: dict[str, tuple[str, int]]) -> None:
    identity, trust = _identity(directory, name)
    endpoint = await QuicEndpoint.open(host="0.0.0.0", identity=identity, trust=trust)
    conns: dict[str, Connection] = {}
    for peer, address in peers.items():
        conns[peer] = await endpoint.connect(
            address,
            alpn=ALPN_TUNNEL,
            expect="node",
            expected_name=f"{peer}.{DOMAIN}",
            handler_factory=Counter,
        )
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not line or line[0] == "quit":
            break
        _, peer, count = line
        conn = conns[peer]
        counter = conn.handler
        assert isinstance(counter, Counter)
        counter.received = 0
        size = conn.max_datagram_payload()
        for i in range(int(count)):
            assert conn.send_datagram(i.to_bytes(4, "big") * (size // 4))
        endpoint.flush()
        for _ in range(500):
            if counter.received >= int(count):
                break
            await asyncio.sleep(0.01)
        out: dict[str, Any] = {"received": counter.received, "payload": size}
        out.update(dataclasses.asdict(endpoint.stats))
        out["gso"] = endpoint.gso
        print(json.dumps(out), flush=True)
    await endpoint.close()


def main() -> None:
    mode, directory, name, *rest = sys.argv[1:]
    if mode == "serve":
        asyncio.run(serve(Path(directory), name, rest[0], int(rest[1])))
    else:
        peers = {}
        for item in rest:
            peer, _, hostport = item.partition("=")
            peers[peer] = parse_host_port(hostport, require_ip=True)
        asyncio.run(client(Path(directory), name, peers))


if __name__ == "__main__":
    main()
