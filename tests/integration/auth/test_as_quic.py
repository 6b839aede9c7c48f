"""Login and renewal over the AS's real QUIC endpoint on loopback (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from as_harness import AsHarness
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import (
    CyphonicError,
    InternalError,
    InvalidArgument,
    Revoked,
    UnexpectedMessage,
)
from cyphonic.pki import (
    CertifiedKey,
    TrustStore,
    generate_key,
    issue_service_certificate,
    load_identity,
    make_csr,
)
from cyphonic.quic import QuicEndpoint
from cyphonic.session import SignallingSession
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_agent.enroll import enroll, load_node_identity, renew
from cyphonic_auth.signalling import AsSignallingServer

LOGIN = pb.Envelope(version=pb.PROTOCOL_VERSION_1, login_request=pb.LoginRequest())


@pytest.fixture
async def as_quic(as_env: AsHarness) -> AsyncIterator[AsSignallingServer]:
    settings = as_env.service.settings.model_copy(update={"quic_host": "127.0.0.1", "quic_port": 0})
    server = AsSignallingServer(as_env.service)
    await server.start(settings)
    try:
        yield server
    finally:
        await server.close()


async def _session(
    identity: CertifiedKey,
    trust: TrustStore,
    port: int,
) -> tuple[QuicEndpoint, SignallingSession]:
    endpoint = await QuicEndpoint.open(
        host="127.0.0.1", port=0, identity=identity, trust=trust, idle_timeout=30.0
    )
    try:
        conn = await endpoint.connect(
            ("127.0.0.1", port),
            alpn=ALPN_SIGNALLING,
            expect="service",
            expected_name="as.svc.cyphonic.internal",
            handler_factory=SignallingSession.factory(),
            timeout=10.0,
        )
    except BaseException:
        await endpoint.close()
        raise
    assert isinstance(conn.handler, SignallingSession)
    return endpoint, conn.handler


def _node_trust(state_dir: Path) -> TrustStore:
    # What a node holds: the root and the node CA (from its own chain).
    root = x509.load_pem_x509_certificate((state_dir / "root-ca.crt").read_bytes())
    chain = x509.load_pem_x509_certificates((state_dir / "node.crt").read_bytes())
    return TrustStore(root=root, node_ca=chain[1])


async def _enrolled_state(as_env: AsHarness, name: str, state_dir: Path) -> CertifiedKey:
    await as_env.create_node(name)
    await enroll(
        as_url="http://as.test",
        token=await as_env.token(name),
        state_dir=state_dir,
        transport=as_env.client._transport,
        now=as_env.clock(),
    )
    return load_identity(state_dir / "node.crt", state_dir / "node.key")


async def test_login_over_quic_then_revoked_refused(
    as_env: AsHarness,
    as_quic: AsSignallingServer,
    tmp_path: Path,
) -> None:
    identity = await _enrolled_state(as_env, "quicnode", tmp_path)
    endpoint, session = await _session(identity, _node_trust(tmp_path), as_quic.port)
    try:
        answer = await session.request(LOGIN)
        assert answer.login_response.fqdn == "quicnode.cyphonic.internal"
        assert len(answer.login_response.nms) == 2
        assert answer.login_response.nms_server_name == "nms.svc.cyphonic.internal"
        revoked = await as_env.client.post(
            "/v1/nodes/quicnode/revoke", json={"reason": "key_compromise"}, headers=as_env.admin
        )
        assert revoked.status_code == 200
        with pytest.raises(Revoked):
            await session.request(LOGIN)
    finally:
        await endpoint.close()
    # A new connection with the revoked certificate is refused in the TLS handshake: the
    # AS told its revocation cache at once, no refresh needed.
    with pytest.raises(Revoked, match="TLS handshake refused"):
        await _session(identity, _node_trust(tmp_path), as_quic.port)
    assert await as_env.metric("cyphonic_as_logins_total") == 1
    assert (
        await as_env.metric("cyphonic_as_refusals_total", operation="login", reason="revoked") == 1
    )


async def test_renewal_over_quic_updates_the_state_directory(
    as_env: AsHarness,
    as_quic: AsSignallingServer,
    tmp_path: Path,
) -> None:
    identity = await _enrolled_state(as_env, "renewer", tmp_path)
    endpoint, session = await _session(identity, _node_trust(tmp_path), as_quic.port)
    try:
        state = await renew(session.request, tmp_path, now=as_env.clock())
    finally:
        await endpoint.close()
    renewed = load_identity(tmp_path / "node.crt", tmp_path / "node.key")
    assert renewed.key.public_key() != identity.key.public_key()
    assert state.serial == format(renewed.cert.serial_number, "x")
    endpoint, session = await _session(renewed, _node_trust(tmp_path), as_quic.port)
    try:
        answer = await session.request(LOGIN)
        assert answer.login_response.fqdn == "renewer.cyphonic.internal"
    finally:
        await endpoint.close()


async def test_service_certificates_are_refused_in_the_handshake(
    as_env: AsHarness,
    as_quic: AsSignallingServer,
) -> None:
    nms = issue_service_certificate(
        as_env.material.service_ca, "nms.svc.cyphonic.internal", now=as_env.clock()
    )
    with pytest.raises(CyphonicError) as refused:
        endpoint, _ = await _session(nms, as_env.material.trust, as_quic.port)
        await endpoint.close()
    assert refused.value.code_name in ("unauthenticated", "permission_denied")


async def test_refusals_reach_the_node_as_typed_errors_through_the_session(
    as_env: AsHarness,
    as_quic: AsSignallingServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The session's one error-to-Error mapping, as production runs it."""
    identity = await _enrolled_state(as_env, "refused", tmp_path)
    await as_env.create_node("elsewhere")
    endpoint, session = await _session(identity, _node_trust(tmp_path), as_quic.port)
    try:
        foreign = make_csr(generate_key(), "elsewhere.cyphonic.internal")
        with pytest.raises(InvalidArgument, match=r"does not match|must be exactly"):
            await session.request(
                pb.RenewRequest(csr_der=foreign.public_bytes(serialization.Encoding.DER))
            )
        with pytest.raises(InvalidArgument, match="signing request"):
            await session.request(pb.RenewRequest(csr_der=b"\x30\x03junk"))
        with pytest.raises(UnexpectedMessage, match="does not answer keepalive"):
            await session.request(pb.Keepalive(sequence=1))

        async def broken(peer: object) -> None:
            raise RuntimeError("database driver bug")

        monkeypatch.setattr(as_env.service, "login", broken)
        with pytest.raises(InternalError) as internal:
            await session.request(LOGIN)
        assert "driver" not in internal.value.message  # nothing internal leaks to the node
        monkeypatch.undo()
        # The connection survived every refusal.
        answer = await session.request(LOGIN)
        assert answer.login_response.fqdn == "refused.cyphonic.internal"
    finally:
        await endpoint.close()


async def test_renewal_cut_short_between_key_and_certificate_does_not_lock_the_node_out(
    as_env: AsHarness,
    as_quic: AsSignallingServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    identity = await _enrolled_state(as_env, "cutoff", tmp_path)
    endpoint, session = await _session(identity, _node_trust(tmp_path), as_quic.port)
    real_replace = os.replace
    renames: list[str] = []

    def dies_before_the_certificate_is_in_place(src: object, dst: object) -> None:
        if str(dst) == str(tmp_path / "node.crt"):
            raise SystemExit("power cut")  # the new key is already node.key
        renames.append(Path(str(dst)).name)
        real_replace(src, dst)  # type: ignore[arg-type]

    try:
        monkeypatch.setattr(os, "replace", dies_before_the_certificate_is_in_place)
        with pytest.raises(SystemExit):
            await renew(session.request, tmp_path, now=as_env.clock())
        monkeypatch.setattr(os, "replace", real_replace)
    finally:
        await endpoint.close()
    assert "node.key" in renames  # the crash left a new key beside the old certificate
    # What the agent loads at its next start: the renewal, completed.
    renewed = load_node_identity(tmp_path)
    assert renewed.key.public_key() != identity.key.public_key()
    assert load_identity(tmp_path / "node.crt", tmp_path / "node.key").cert == renewed.cert
    endpoint, session = await _session(renewed, _node_trust(tmp_path), as_quic.port)
    try:
        answer = await session.request(LOGIN)
        assert answer.login_response.fqdn == "cutoff.cyphonic.internal"
    finally:
        await endpoint.close()
