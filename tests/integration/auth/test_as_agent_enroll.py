"""``cyphonic_agent.enroll`` against the real AS app (in-process transport, real registry)."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from as_harness import AsHarness
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cyphonic.errors import AlreadyExists, PermissionDenied, TokenInvalid, Unavailable
from cyphonic.pki import create_intermediate_ca, create_root_ca, fingerprint, load_identity
from cyphonic_agent.enroll import enroll, is_plaintext_remote, load_node_trust, read_agent_state


def _transport(env: AsHarness) -> httpx.AsyncBaseTransport:
    return env.client._transport  # the ASGI transport of the harness's app


async def test_agent_enrols_and_writes_its_state_directory(
    as_env: AsHarness, tmp_path: Path
) -> None:
    await as_env.create_node("agent1")
    token = await as_env.token("agent1")
    state_dir = tmp_path / "state"
    state = await enroll(
        as_url="http://as.test",
        token=token,
        state_dir=state_dir,
        root_ca_sha256=fingerprint(as_env.material.root_cert),
        transport=_transport(as_env),
        now=as_env.clock(),
    )
    assert state.fqdn == "agent1.cyphonic.internal"
    assert state.as_endpoints == ["192.0.2.1:443"]
    assert state.as_server_name == "as.svc.cyphonic.internal"
    assert stat.S_IMODE((state_dir / "node.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    identity = load_identity(state_dir / "node.crt", state_dir / "node.key")
    assert identity.chain == [as_env.material.node_ca.cert]
    assert x509.load_pem_x509_certificate((state_dir / "root-ca.crt").read_bytes()) == (
        as_env.material.root_cert
    )
    # The service CA is pinned: the node's trust store holds all three CAs.
    assert x509.load_pem_x509_certificate((state_dir / "service-ca.crt").read_bytes()) == (
        as_env.material.service_ca.cert
    )
    trust = load_node_trust(state_dir)
    assert (trust.root, trust.node_ca, trust.service_ca) == (
        as_env.material.root_cert,
        as_env.material.node_ca.cert,
        as_env.material.service_ca.cert,
    )
    assert read_agent_state(state_dir) == state
    assert json.loads((state_dir / "agent.json").read_text())["serial"] == state.serial
    # The AS knows this certificate and lets it log in.
    chain = [identity.cert, *identity.chain]
    assert (await as_env.service.login(as_env.peer(chain))).fqdn == state.fqdn
    # The private key never went to the AS: nothing the AS stored contains it.
    shown = (await as_env.client.get("/v1/nodes/agent1", headers=as_env.admin)).text
    key_text = (state_dir / "node.key").read_text().splitlines()[1]
    assert key_text not in shown


async def test_agent_refuses_to_overwrite_and_reports_used_tokens(
    as_env: AsHarness, tmp_path: Path
) -> None:
    await as_env.create_node("agent2")
    token = await as_env.token("agent2")
    await enroll(
        as_url="http://as.test",
        token=token,
        state_dir=tmp_path,
        transport=_transport(as_env),
        now=as_env.clock(),
    )
    with pytest.raises(AlreadyExists):
        await enroll(
            as_url="http://as.test",
            token=token,
            state_dir=tmp_path,
            transport=_transport(as_env),
            now=as_env.clock(),
        )
    with pytest.raises(TokenInvalid):
        await enroll(
            as_url="http://as.test",
            token=token,
            state_dir=tmp_path / "other",
            transport=_transport(as_env),
            now=as_env.clock(),
        )
    assert not (tmp_path / "other" / "node.key").exists()


async def test_agent_checks_the_pinned_root(as_env: AsHarness, tmp_path: Path) -> None:
    await as_env.create_node("agent3")
    token = await as_env.token("agent3")
    with pytest.raises(PermissionDenied):
        await enroll(
            as_url="http://as.test",
            token=token,
            state_dir=tmp_path,
            root_ca_sha256="00" * 32,
            transport=_transport(as_env),
            now=as_env.clock(),
        )
    assert not (tmp_path / "node.key").exists()


class ForgedServiceCa(httpx.AsyncBaseTransport):
    """The AS's answers, with the service CA swapped for one no root of ours issued."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        if request.url.path != "/v1/enrol" or response.status_code != 201:
            return response
        body = response.json()
        rogue_root = create_root_ca("rogue", now=datetime.now(UTC))
        rogue = create_intermediate_ca(rogue_root, "service-ca", now=datetime.now(UTC))
        body["service_ca_pem"] = rogue.cert.public_bytes(serialization.Encoding.PEM).decode()
        return httpx.Response(201, json=body)


async def test_agent_refuses_a_service_ca_the_root_did_not_issue(
    as_env: AsHarness, tmp_path: Path
) -> None:
    await as_env.create_node("agent4")
    token = await as_env.token("agent4")
    with pytest.raises(PermissionDenied, match="service CA"):
        await enroll(
            as_url="http://as.test",
            token=token,
            state_dir=tmp_path,
            transport=ForgedServiceCa(_transport(as_env)),
            now=as_env.clock(),
        )
    assert not (tmp_path / "node.key").exists() and not (tmp_path / "service-ca.crt").exists()


async def test_the_ca_route_names_the_service_ca(as_env: AsHarness) -> None:
    shown = (await as_env.client.get("/v1/ca")).json()
    assert x509.load_pem_x509_certificate(shown["service_ca_pem"].encode()) == (
        as_env.material.service_ca.cert
    )


async def test_unreachable_as_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        await enroll(
            as_url="http://127.0.0.1:9", token="cye_x", state_dir=tmp_path, request_timeout=5
        )


def test_plaintext_warning_only_for_remote_http() -> None:
    assert is_plaintext_remote("http://as.example.net:8081")
    assert is_plaintext_remote("http://192.0.2.1:8081")
    assert not is_plaintext_remote("http://127.0.0.1:8081")
    assert not is_plaintext_remote("http://[::1]:8081")
    assert not is_plaintext_remote("http://localhost:8081")
    assert not is_plaintext_remote("https://as.example.net")
