"""The agent's side of the NMS's reachability probes (``cyphonic.wire.reach``, docs/nms.md).

After each registration that carries a ``ReachProbe``: send the mapping probe from the one
UDP socket to the NMS's probe port a few times (the NMS compares its source with that of
the signalling connection: the NAT's mapping behaviour), and echo the NMS's inbound probe,
if one arrives, back to its source (whether a stranger's datagram gets in). The echo is
only for a probe with this registration's nonce, at most ``MAX_ECHOES`` times, and only
while the probe window is open: the agent never reflects other datagrams.

``ReachResponder`` decides (sans-I/O); ``answer_probes`` is the asyncio glue, which hooks a
datagram filter into the QUIC endpoint for the window only (the data path pays nothing
afterwards).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cyphonic.quic import QuicEndpoint
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.reach import FRAME_LEN, KIND_ECHO, KIND_INBOUND, KIND_MAPPING, frame, parse

MAPPING_SENDS_S = (0.0, 0.1, 0.3)
"""When the mapping probe goes out after the RegisterResponse."""
WINDOW_S = 3.0
"""How long inbound probes are answered after registration."""
MAX_ECHOES = 3


@dataclass
class ReachResponder:
    """One registration's probe: its nonce, and how many echoes went out."""

    nonce: bytes
    echoes: int = 0

    def mapping_frame(self) -> bytes:
        return frame(KIND_MAPPING, self.nonce)

    def on_datagram(self, data: bytes) -> bytes | None:
        """The echo to send back to the datagram's source, or None (not ours / enough)."""
        if len(data) != FRAME_LEN or data[0] != 0:
            return None
        parsed = parse(data)
        if parsed is None or parsed != (KIND_INBOUND, self.nonce) or self.echoes >= MAX_ECHOES:
            return None
        self.echoes += 1
        return frame(KIND_ECHO, self.nonce)


class _Filter:
    """The endpoint's datagram filter for the window: probes here, the rest to ``previous``."""

    def __init__(
        self,
        responder: ReachResponder,
        endpoint: QuicEndpoint,
        previous: Callable[[bytes, Any], bool] | None,
    ) -> None:
        self.responder = responder
        self.endpoint = endpoint
        self.previous = previous
        train = getattr(previous, "train", None)
        self.train: Callable[[bytes, int, Any], bool] = train or (lambda _d, _s, _a: False)

    def __call__(self, data: bytes, addr: Any) -> bool:
        if data and data[0] == 0:
            echo = self.responder.on_datagram(data)
            if echo is not None:
                self.endpoint.send_raw(echo, (addr[0], addr[1]))
                return True
        return self.previous(data, addr) if self.previous is not None else False


async def answer_probes(
    endpoint: QuicEndpoint, probe: pb.ReachProbe, nms_host: str, *, log: Any
) -> None:
    """Send the mapping probes and echo the inbound one, for ``WINDOW_S``."""
    if len(probe.nonce) != 16 or not 0 < probe.target.port < 65536:
        return
    responder = ReachResponder(nonce=bytes(probe.nonce))
    host = (
        _ip_text(probe.target.ip) if len(probe.target.ip) in (4, 16) else nms_host
    )  # empty: the NMS address we reached
    target = (host, int(probe.target.port))
    hook = _Filter(responder, endpoint, endpoint.datagram_filter)
    endpoint.datagram_filter = hook
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        for at in MAPPING_SENDS_S:
            await asyncio.sleep(max(0.0, started + at - loop.time()))
            endpoint.send_raw(responder.mapping_frame(), target)
        await asyncio.sleep(max(0.0, started + WINDOW_S - loop.time()))
    finally:
        with contextlib.suppress(Exception):
            if endpoint.datagram_filter is hook:
                endpoint.datagram_filter = hook.previous
        log.info("reach_probe_answered", target=f"{host}:{target[1]}", echoes=responder.echoes)


def _ip_text(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))
