"""``NmsProtocolClient``: a protocol-level NMS test tool, not a node agent.

A real QUIC client with a node certificate (mutual TLS, ALPN ``cyphonic-sig/1``, one UDP
socket) that sends exactly the signalling messages a test hands it and records every push raw.
It has no policy of its own (no reconnect, no tunnels, no route state; the CLI's ``--hold``
sends keepalives only so that the NMS keeps it online):
that is what NMS tests need when they send registrations the agent never would (addresses of
the test's choosing, a node behind a NAT it is not behind, a node that falls silent, a
revoked node registering again) or count pushes one by one, and what ``bench/nms_load.py``
needs to register thousands of nodes. Tests of how a node *behaves* run the real agent with
fake edges (``cyphonic_testing.agent``), as the NMS tests do where a node only registers,
asks for routes and receives directions.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
from collections.abc import Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING

from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import CyphonicError
from cyphonic.pki import (
    CertifiedKey,
    TrustStore,
    certificate_dns_names,
    generate_key,
    load_identity,
    load_trust_store,
    make_csr,
    sign_node_csr,
)
from cyphonic.quic import QuicEndpoint
from cyphonic.session import SignallingSession
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_nms.routing import Endpoint

if TYPE_CHECKING:
    from cyphonic_agent.enroll import AgentState


def issue_node_identity(
    node_ca: CertifiedKey,
    fqdn: str,
    *,
    now: datetime.datetime | None = None,
    valid_for: datetime.timedelta = datetime.timedelta(days=1),
) -> CertifiedKey:
    """A fresh key and node certificate for ``fqdn`` (what enrolment through the AS gives)."""
    key = generate_key()
    cert = sign_node_csr(
        node_ca,
        make_csr(key, fqdn),
        fqdn=fqdn,
        now=now or datetime.datetime.now(datetime.UTC),
        valid_for=valid_for,
    )
    return CertifiedKey(key=key, cert=cert, chain=[node_ca.cert])


def nms_only_state(fqdn: str, name: str, domain: str) -> AgentState:
    """The agent state of a node that talks to the NMS only (no AS login: endpoints given)."""
    from cyphonic_agent.enroll import AgentState

    return AgentState(
        fqdn=fqdn,
        name=name,
        domain=domain,
        as_url="",
        as_endpoints=[],
        as_server_name="",
        serial="",
        not_after="",
        enrolled_at="",
    )


def _env(**body: object) -> pb.Envelope:
    return pb.Envelope(version=pb.PROTOCOL_VERSION_1, **body)  # type: ignore[arg-type]


class NmsProtocolClient:
    """One signalling connection to an NMS, driven message by message by the test."""

    def __init__(
        self,
        *,
        identity: CertifiedKey,
        trust: TrustStore,
        nms: tuple[str, int],
        server_name: str,
        bind_host: str = "127.0.0.1",
    ) -> None:
        self.identity = identity
        self.fqdn = certificate_dns_names(identity.cert)[0]
        self.trust = trust
        self.nms = nms
        self.server_name = server_name
        self.bind_host = bind_host
        self.endpoint: QuicEndpoint | None = None
        self.session: SignallingSession | None = None
        self.pushed: list[pb.Envelope] = []
        self.registration: pb.RegisterResponse | None = None
        self._changed = asyncio.Event()

    @property
    def local(self) -> Endpoint:
        """The address:port of this node's UDP socket."""
        assert self.endpoint is not None
        host, port = self.endpoint.local_address
        return Endpoint(ip_address(host), int(port))

    async def connect(self, *, timeout_s: float = 10.0) -> None:
        """Open the UDP socket and the mutual-TLS QUIC connection to the NMS."""
        self.endpoint = await QuicEndpoint.open(
            host=self.bind_host,
            port=0,
            identity=self.identity,
            trust=self.trust,
            idle_timeout=60.0,
        )
        conn = await self.endpoint.connect(
            self.nms,
            alpn=ALPN_SIGNALLING,
            expect="service",
            expected_name=self.server_name,
            handler_factory=SignallingSession.factory(self._on_message),
            timeout=timeout_s,
        )
        assert isinstance(conn.handler, SignallingSession)
        self.session = conn.handler

    async def _on_message(
        self, message: pb.Envelope, _session: SignallingSession
    ) -> pb.Envelope | None:
        self.pushed.append(message)
        self._changed.set()
        return None

    def of(self, body: str) -> list[pb.Envelope]:
        """Pushed envelopes of one kind (``route_direction``, ``peer_offline``...)."""
        return [e for e in self.pushed if e.WhichOneof("body") == body]

    async def wait_for(self, body: str, *, count: int = 1, within_s: float = 10.0) -> pb.Envelope:
        """Wait for the ``count``-th push of ``body``."""
        async with asyncio.timeout(within_s):
            while len(self.of(body)) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.of(body)[count - 1]

    async def wait_closed(self, *, within_s: float = 10.0) -> CyphonicError | None:
        """Wait until the NMS closes the connection; the error it gave."""
        assert self.session is not None
        async with asyncio.timeout(within_s):
            return await self.session.wait_closed()

    async def request(self, envelope: pb.Envelope, *, timeout_s: float = 10.0) -> pb.Envelope:
        """One request; the peer's Error raises as its ``CyphonicError``."""
        assert self.session is not None
        return await self.session.request(envelope, timeout=timeout_s)

    async def register(
        self, local_addresses: Sequence[Endpoint] | None = None
    ) -> pb.RegisterResponse:
        """Register, reporting ``local_addresses`` (default: the socket's own address)."""
        addresses = [self.local] if local_addresses is None else list(local_addresses)
        answer = await self.request(
            _env(
                register_request=pb.RegisterRequest(
                    local_addresses=[pb.Endpoint(ip=a.ip.packed, port=a.port) for a in addresses]
                )
            )
        )
        self.registration = answer.register_response
        return answer.register_response

    async def keepalive(self, sequence: int = 0) -> pb.KeepaliveAck:
        answer = await self.request(_env(keepalive=pb.Keepalive(sequence=sequence)))
        return answer.keepalive_ack

    async def route(
        self, *, fqdn: str | None = None, virtual_address: bytes | None = None
    ) -> pb.RouteResponse:
        """Ask the NMS for a route to a peer (by FQDN or virtual address)."""
        request = (
            pb.RouteRequest(fqdn=fqdn)
            if fqdn is not None
            else pb.RouteRequest(virtual_address=virtual_address or b"")
        )
        answer = await self.request(_env(route_request=request))
        return answer.route_response

    async def close(self) -> None:
        """Close the connection and the socket."""
        if self.endpoint is not None:
            await self.endpoint.close("node leaving")
            self.endpoint = None


# --------------------------------------------------------------------------- command line


def _print(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _ep(msg: pb.Endpoint) -> str:
    return str(Endpoint(ip_address(msg.ip), msg.port)) if msg.ip else ""


async def _main(args: argparse.Namespace) -> int:
    identity = load_identity(args.cert, args.key)
    node = NmsProtocolClient(
        identity=identity,
        trust=load_trust_store(args.trust_dir),
        nms=(str(args.nms.ip), args.nms.port),
        server_name=args.server_name,
        bind_host=args.bind,
    )
    try:
        await node.connect()
        reg = await node.register(args.report or None)
        _print(
            "registered",
            fqdn=reg.fqdn,
            local=str(node.local),
            virtual_ipv4=str(ip_address(reg.virtual_ipv4)),
            virtual_ipv6=str(ip_address(reg.virtual_ipv6)),
            behind_nat=reg.network.behind_nat,
            has_ipv4=reg.network.has_ipv4,
            has_ipv6=reg.network.has_ipv6,
            observed_ipv4=_ep(reg.network.observed_ipv4),
            observed_ipv6=_ep(reg.network.observed_ipv6),
        )
        if args.route:
            answer = await node.route(fqdn=args.route)
            _print(
                "route_response",
                route_id=answer.route_id,
                pattern=int(answer.pattern),
                peer_fqdn=answer.peer_fqdn,
            )
        deadline = asyncio.get_running_loop().time() + args.hold
        seen = directions = 0
        while True:
            for env in node.pushed[seen:]:
                if env.WhichOneof("body") == "route_direction":
                    directions += 1
                    d = env.route_direction
                    _print(
                        "route_direction",
                        route_id=d.route_id,
                        pattern=int(d.pattern),
                        role=int(d.role),
                        peer_fqdn=d.peer_fqdn,
                        candidates=[_ep(c) for c in d.peer_candidates],
                    )
                else:
                    _print("push", body=env.WhichOneof("body"))
            seen = len(node.pushed)
            remaining = deadline - asyncio.get_running_loop().time()
            # Only route directions count: a node is also pushed standing notices (its policy
            # filter right after registering), and leaving on those would take it offline.
            if remaining <= 0 or (args.until_directions and directions >= args.until_directions):
                return 0
            await node.keepalive()
            await asyncio.sleep(min(0.2, remaining))
    except CyphonicError as exc:
        _print("error", code=exc.code_name, message=exc.message)
        return 1
    finally:
        await node.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cyphonic_testing.nms_client``: one node registers (and asks for a route)."""
    parser = argparse.ArgumentParser(
        prog="python -m cyphonic_testing.nms_client",
        description="A simulated node: register with an NMS, "
        "optionally ask for a route; JSON lines on stdout.",
    )
    parser.add_argument("--cert", type=Path, required=True, help="node.crt (leaf + node CA)")
    parser.add_argument("--key", type=Path, required=True, help="node.key")
    parser.add_argument("--trust-dir", type=Path, required=True, help="dir with root-ca.crt")
    parser.add_argument("--nms", type=Endpoint.parse, required=True, help="NMS ip:port")
    parser.add_argument("--server-name", default="nms.svc.cyphonic.internal")
    parser.add_argument("--bind", default="0.0.0.0", help="local address of the UDP socket")
    parser.add_argument(
        "--report",
        type=Endpoint.parse,
        action="append",
        help="address to report (repeatable; default: the socket's own)",
    )
    parser.add_argument("--route", help="FQDN to ask a route for after registering")
    parser.add_argument(
        "--hold", type=float, default=0.0, help="seconds to stay connected, printing pushes"
    )
    parser.add_argument(
        "--until-directions",
        type=int,
        default=0,
        help="leave as soon as this many route directions arrived",
    )
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
