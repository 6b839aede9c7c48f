"""Reachability probes through the NMS's request handling and a real ``ReachProber`` on
loopback: a node that asks for probes gets a ReachProbe; its mapping probe and echo (or their
absence) become its NetworkInfo, kept in the registry and used by the next route: a
firewalled public node connects out, two EIM NATs get a HolePunch and a reason in words."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import ip_address

from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.reach import KIND_ECHO, KIND_INBOUND, KIND_MAPPING, frame, parse
from cyphonic_nms.reach import ReachProber
from cyphonic_nms.routing import Endpoint, Inbound, NatMapping
from cyphonic_nms.signalling import handle_request
from cyphonic_testing.nms import InProcessCluster, RecordingLink, add_node


def _env(**body: object) -> pb.Envelope:
    return pb.Envelope(version=pb.PROTOCOL_VERSION_1, **body)  # type: ignore[arg-type]


def _register(ip: str, port: int) -> pb.Envelope:
    return _env(
        register_request=pb.RegisterRequest(
            local_addresses=[pb.Endpoint(ip=ip_address(ip).packed, port=port)],
            reach_probes=True,
        )
    )


class _Node(asyncio.DatagramProtocol):
    """A node's one UDP socket on loopback that answers probes (or not)."""

    def __init__(self, *, echo: bool) -> None:
        self.echo = echo
        self.nonce = b""
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.echo and parse(data) == (KIND_INBOUND, self.nonce) and self.transport:
            self.transport.sendto(frame(KIND_ECHO, self.nonce), addr)


async def _node(echo: bool) -> tuple[_Node, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Node(echo=echo), local_addr=("127.0.0.1", 0), family=socket.AF_INET
    )
    return proto, int(transport.get_extra_info("sockname")[1])


async def test_probe_verdicts_shape_the_routes(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    prober = ReachProber(host="127.0.0.1", port=0, on_verdict=nms.reach_verdict, timeout_s=0.5)
    await prober.start()
    nms.reach = prober
    try:
        open_node, open_port = await _node(echo=True)
        fw_node, fw_port = await _node(echo=False)
        for name in ("open", "fw"):
            await add_node(cluster.sessions, name)
        links = {n: RecordingLink(fqdn=f"{n}.cyphonic.internal") for n in ("open", "fw")}
        for name, proto, port in (("open", open_node, open_port), ("fw", fw_node, fw_port)):
            # Both "public": they report the address the NMS sees.
            answer = await handle_request(
                nms,
                links[name],
                _register("127.0.0.1", port),
                observed=Endpoint.parse(f"127.0.0.1:{port}"),
            )
            probe = answer.register_response.reach_probe
            assert len(probe.nonce) == 16 and probe.target.port == prober.port
            assert not probe.target.ip  # the NMS address the node reached
            proto.nonce = bytes(probe.nonce)
            assert proto.transport is not None
            proto.transport.sendto(frame(KIND_MAPPING, proto.nonce), ("127.0.0.1", prober.port))
        await asyncio.sleep(1.0)
        nets = {n: nms.connected[f"{n}.cyphonic.internal"].network for n in ("open", "fw")}
        assert (nets["open"].inbound, nets["open"].nat_mapping) == (Inbound.OPEN, NatMapping.NONE)
        assert nets["fw"].inbound is Inbound.BLOCKED
        # The firewalled node connects out from the first route on, and the words say why.
        await handle_request(
            nms,
            links["open"],
            _env(route_request=pb.RouteRequest(fqdn="fw.cyphonic.internal")),
            observed=None,
        )
        [direction] = links["fw"].of("route_direction")
        d = direction.route_direction
        assert d.pattern == pb.ROUTE_PATTERN_NAT_CONNECTS and d.role == pb.ROUTE_ROLE_CONNECT
        assert d.reason_code == "inbound_blocked" and "fw connects to open" in d.reason
        # Kept in the registry.
        await asyncio.sleep(0.1)
        view = await nms.nodes.view("fw.cyphonic.internal")
        assert view is not None and view.network is not None
        assert view.network.inbound is Inbound.BLOCKED
    finally:
        await prober.stop()


async def test_registration_without_probes_gets_none(cluster: InProcessCluster) -> None:
    nms = await cluster.replica("r1")
    prober = ReachProber(host="127.0.0.1", port=0, on_verdict=nms.reach_verdict, timeout_s=0.2)
    await prober.start()
    nms.reach = prober
    try:
        await add_node(cluster.sessions, "old")
        link = RecordingLink(fqdn="old.cyphonic.internal")
        request = _env(
            register_request=pb.RegisterRequest(
                local_addresses=[pb.Endpoint(ip=ip_address("127.0.0.1").packed, port=9)]
            )
        )
        answer = await handle_request(nms, link, request, observed=Endpoint.parse("127.0.0.1:9"))
        assert not answer.register_response.HasField("reach_probe")
        await asyncio.sleep(0.4)
        net = nms.connected["old.cyphonic.internal"].network
        assert net.inbound is Inbound.UNKNOWN  # an old agent is never taken for a firewalled one
    finally:
        await prober.stop()
