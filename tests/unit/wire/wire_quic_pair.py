"""Two aioquic QuicConnections joined in memory with a fake clock (aioquic's
``client_and_server`` pattern), each side optionally behind a SignallingConnection.

A side without one is "raw": the test writes frames straight onto its QUIC streams and
reads what arrives, to play a peer that breaks the rules.
"""

from __future__ import annotations

import datetime
import ssl
from collections import defaultdict
from dataclasses import dataclass, field

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cyphonic.config import ALPN_SIGNALLING
from cyphonic.signalling import SignallingConnection, SignallingEvent
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.framing import FrameDecoder

CLIENT_ADDR = ("192.0.2.1", 40000)
SERVER_ADDR = ("192.0.2.2", 443)
SERVER_NAME = "nms.svc.test.internal"


def server_certificate() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A throw-away self-signed ECDSA P-256 certificate for the server side."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


@dataclass
class StreamLog:
    """What a raw side saw on one stream."""

    data: bytearray = field(default_factory=bytearray)
    fin: bool = False
    reset: int | None = None  # the peer's RESET_STREAM code
    stop: int | None = None  # the peer's STOP_SENDING code

    def envelopes(self) -> list[pb.Envelope]:
        return FrameDecoder().feed(self.data)


class Side:
    def __init__(self, quic: QuicConnection, *, signalling: bool) -> None:
        self.quic = quic
        self.signalling = SignallingConnection(quic) if signalling else None
        self.events: list[SignallingEvent] = []
        self.streams: dict[int, StreamLog] = defaultdict(StreamLog)
        self.handshake_done = False
        self.terminated: ConnectionTerminated | None = None

    @property
    def sig(self) -> SignallingConnection:
        assert self.signalling is not None
        return self.signalling

    def deliver(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self.handshake_done = True
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
        elif isinstance(event, StreamDataReceived):
            log = self.streams[event.stream_id]
            log.data += event.data
            log.fin = log.fin or event.end_stream
        elif isinstance(event, StreamReset):
            self.streams[event.stream_id].reset = event.error_code
        elif isinstance(event, StopSendingReceived):
            self.streams[event.stream_id].stop = event.error_code
        if self.signalling is not None:
            self.events += self.signalling.handle_event(event)

    def take(self) -> list[SignallingEvent]:
        events, self.events = self.events, []
        return events

    def raw_send(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        self.quic.send_stream_data(stream_id, data, end_stream=end)

    def next_stream(self) -> int:
        return self.quic.get_next_available_stream_id()


class Pair:
    """A connected client and server and a clock that only moves when ``pump`` says so."""

    def __init__(
        self,
        *,
        client_signalling: bool = True,
        server_signalling: bool = True,
        cert: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    ) -> None:
        self.now = 0.0
        client_conf = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN_SIGNALLING],
            server_name=SERVER_NAME,
            verify_mode=ssl.CERT_NONE,
        )
        server_conf = QuicConfiguration(is_client=False, alpn_protocols=[ALPN_SIGNALLING])
        server_conf.certificate, server_conf.private_key = cert
        client_quic = QuicConnection(configuration=client_conf)
        client_quic.connect(SERVER_ADDR, now=self.now)
        server_quic = QuicConnection(
            configuration=server_conf,
            original_destination_connection_id=client_quic.original_destination_connection_id,
        )
        self.client = Side(client_quic, signalling=client_signalling)
        self.server = Side(server_quic, signalling=server_signalling)
        self.pump()
        assert self.client.handshake_done and self.server.handshake_done

    def drain(self, side: Side) -> None:
        """Hand every queued QUIC event of ``side`` to it."""
        while (event := side.quic.next_event()) is not None:
            side.deliver(event)

    def pump(self, *, max_rounds: int = 500) -> None:
        """Move datagrams both ways and fire near timers (ACK delay, loss detection)
        until both sides are quiet."""
        for _ in range(max_rounds):
            moved = 0
            for src, dst, addr in (
                (self.client, self.server, CLIENT_ADDR),
                (self.server, self.client, SERVER_ADDR),
            ):
                for data, _ in src.quic.datagrams_to_send(now=self.now):
                    dst.quic.receive_datagram(data, addr, now=self.now)
                    moved += 1
            self.drain(self.client)
            self.drain(self.server)
            if moved:
                self.now += 0.001
                continue
            timers = [
                t
                for t in (self.client.quic.get_timer(), self.server.quic.get_timer())
                if t is not None and t - self.now < 1.0
            ]
            if not timers:
                return
            self.now = max(self.now, min(timers))
            for side in (self.client, self.server):
                timer = side.quic.get_timer()
                if timer is not None and timer <= self.now:
                    side.quic.handle_timer(now=self.now)
        raise AssertionError("the connections did not go quiet")
