"""The SNI read from a ClientHello without a full parse (``engine.client_hello_server_name``)
agrees with both TLS stacks' own parsers, on hellos both stacks build."""

from __future__ import annotations

from typing import Any

import pytest
from aioquic import tls as atls
from aioquic._buffer import Buffer as ABuffer
from cyphonic.quic.engine import client_hello_server_name, peek_server_name
from qh3 import tls as qtls
from qh3._hazmat import Buffer as QBuffer


def _hello(stack: str, server_name: str | None) -> bytes:
    if stack == "qh3":
        q = qtls.Context(is_client=True, alpn_protocols=["x"], server_name=server_name)
        q.handshake_extensions = [(0x39, bytes(64))]
        qbuf = QBuffer(capacity=8192)
        q._client_send_hello(qbuf)
        return bytes(qbuf.data)
    a = atls.Context(is_client=True, alpn_protocols=["x"], server_name=server_name)
    a.handshake_extensions = [(0x39, bytes(64))]
    abuf = ABuffer(capacity=8192)
    a._client_send_hello(abuf)
    return bytes(abuf.data)


@pytest.mark.parametrize("stack", ["qh3", "aioquic"])
@pytest.mark.parametrize("name", ["nms.svc.cyphonic.internal", "N1.Example.ORG", None])
def test_agrees_with_the_full_parser(stack: str, name: str | None) -> None:
    hello = _hello(stack, name)
    parsed: Any = (qtls if stack == "qh3" else atls).pull_client_hello(
        (QBuffer if stack == "qh3" else ABuffer)(data=hello)
    )
    expected = parsed.server_name.lower() if parsed.server_name else None
    assert client_hello_server_name(hello) == expected
    assert client_hello_server_name(hello + b"next message") == expected  # reads one message


@pytest.mark.parametrize("cut", [0, 1, 4, 40, 80, -3])
def test_a_truncated_hello_is_malformed(cut: int) -> None:
    hello = _hello("qh3", "nms.svc.cyphonic.internal")
    with pytest.raises(ValueError):
        client_hello_server_name(hello[:cut])


def test_not_a_hello() -> None:
    with pytest.raises(ValueError):
        client_hello_server_name(b"\x02" + bytes(60))


def test_peek_leaves_the_buffer_where_it_was() -> None:
    hello = _hello("aioquic", "nms.svc.cyphonic.internal")
    buf = ABuffer(data=hello)
    assert peek_server_name(buf, atls.pull_client_hello) == "nms.svc.cyphonic.internal"
    assert buf.tell() == 0
    broken = ABuffer(data=hello[:50])
    assert peek_server_name(broken, atls.pull_client_hello) is None
    assert broken.tell() == 0
