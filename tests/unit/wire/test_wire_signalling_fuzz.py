"""Property test: a peer doing random things on random streams (valid frames of any body,
random bytes, FINs, resets, STOP_SENDING) against a SignallingConnection.

Whatever it does, the signalling side reports only its four event types, raises nothing,
and once every stream has ended on the peer's side and every request it handed out was
answered, it holds no stream state, and neither does its aioquic connection.
"""

from __future__ import annotations

import contextlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cyphonic.errors import CyphonicError
from cyphonic.signalling import (
    TRANSITIONS,
    ErrorReceived,
    Opener,
    ProtocolErrorDetected,
    RequestReceived,
    ResponseReceived,
)
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.framing import encode_frame
from cyphonic.wire.messages import BODY_FIELDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_quic_pair import Pair, Side, server_certificate

BODIES = sorted(BODY_FIELDS.values())
CERT: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] = server_certificate()


def _envelope(name: str) -> pb.Envelope:
    envelope = pb.Envelope(version=pb.PROTOCOL_VERSION_1)
    getattr(envelope, name).SetInParent()
    return envelope


slot = st.integers(0, 5)
actions = st.lists(
    st.one_of(
        st.tuples(st.just("frame"), slot, st.sampled_from(BODIES)),
        st.tuples(st.just("bytes"), slot, st.binary(min_size=1, max_size=12)),
        st.tuples(st.just("fin"), slot),
        st.tuples(st.just("reset"), slot, st.integers(0, 20)),
        st.tuples(st.just("stop"), slot, st.integers(0, 20)),
        st.tuples(st.just("sig_open"), st.integers(0, 20)),
        st.tuples(st.just("answer")),
        st.tuples(st.just("pump")),
    ),
    max_size=30,
)


class Run:
    def __init__(self, *, raw_is_client: bool) -> None:
        self.pair = Pair(
            cert=CERT, client_signalling=not raw_is_client, server_signalling=raw_is_client
        )
        self.raw: Side = self.pair.client if raw_is_client else self.pair.server
        self.sig: Side = self.pair.server if raw_is_client else self.pair.client
        self.streams: list[int] = []  # streams the raw side may write on, in opening order
        self.raw_ended: set[int] = set()
        self.pending: set[int] = set()  # requests handed to the signalling side's owner

    def collect(self) -> None:
        for event in self.sig.take():
            assert isinstance(
                event, RequestReceived | ResponseReceived | ErrorReceived | ProtocolErrorDetected
            )
            if isinstance(event, RequestReceived):
                assert event.message.version == pb.PROTOCOL_VERSION_1
                if not event.pushed:
                    self.pending.add(event.stream_id)
            elif isinstance(event, ErrorReceived | ProtocolErrorDetected):
                assert isinstance(event.error, CyphonicError)
                self.pending.discard(event.stream_id)

    def answer_all(self) -> None:
        for stream_id in sorted(self.pending):
            # an answer may find the stream gone (reset, stopped, refused): then False
            self.sig.sig.send_error(stream_id, CyphonicError("done"))
        self.pending.clear()

    def stream(self, index: int) -> int:
        if index >= len(self.streams):
            stream_id = self.raw.next_stream()
            self.raw.raw_send(stream_id, b"")  # opens it in aioquic, sends nothing yet
            self.streams.append(stream_id)
            return stream_id
        return self.streams[index]

    def act(self, action: tuple[object, ...]) -> None:
        kind = action[0]
        if kind == "pump":
            self.pair.pump()
        elif kind == "answer":
            self.answer_all()
        elif kind == "sig_open":
            openers = sorted(
                name
                for (who, name) in TRANSITIONS
                if (who is Opener.CLIENT) == self.sig.quic.configuration.is_client
            )
            name = openers[int(action[1]) % len(openers)]  # type: ignore[call-overload]
            self.streams.append(self.sig.sig.send_request(_envelope(name)))
        else:
            # the fuzzing peer may misuse its own QUIC streams (gone, not known yet)
            with contextlib.suppress(ValueError, RuntimeError):
                self.raw_act(action)
        self.collect()

    def raw_act(self, action: tuple[object, ...]) -> None:
        kind = action[0]
        stream_id = self.stream(int(action[1]))  # type: ignore[call-overload]
        if stream_id in self.raw_ended:
            return
        if kind == "frame":
            self.raw.raw_send(stream_id, encode_frame(_envelope(str(action[2]))))
        elif kind == "bytes":
            self.raw.raw_send(stream_id, bytes(action[2]))  # type: ignore[call-overload]
        elif kind == "fin":
            self.raw.raw_send(stream_id, b"", end=True)
            self.raw_ended.add(stream_id)
        elif kind == "reset":
            self.raw.quic.reset_stream(stream_id, int(action[2]))  # type: ignore[call-overload]
            self.raw_ended.add(stream_id)
        elif kind == "stop":
            self.raw.quic.stop_stream(stream_id, int(action[2]))  # type: ignore[call-overload]

    def finish(self) -> None:
        self.pair.pump()
        self.collect()
        for stream_id in self.streams:
            if stream_id not in self.raw_ended:
                with contextlib.suppress(ValueError):  # already discarded by aioquic
                    self.raw.quic.reset_stream(stream_id, 0)
        self.pair.pump()
        self.collect()
        self.answer_all()
        self.pair.pump()
        self.collect()
        assert self.sig.sig.open_streams == 0
        assert self.sig.sig.incoming_streams == 0
        assert self.sig.sig._stopped == set()
        assert self.sig.quic._streams == {}, "aioquic still holds streams"


@pytest.mark.parametrize("raw_is_client", [True, False], ids=["raw-client", "raw-server"])
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps=actions)
def test_random_peer(raw_is_client: bool, steps: list[tuple[object, ...]]) -> None:
    run = Run(raw_is_client=raw_is_client)
    for step in steps:
        run.act(step)
    run.finish()
