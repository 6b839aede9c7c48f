"""End to end: ``cyphonic-as serve`` and ``cyphonic-agent enroll`` as real processes.

The AS runs on loopback (ephemeral TCP and UDP ports) on SQLite and on PostgreSQL; the
agent enrols with a token; the node then logs in over QUIC with what the agent wrote,
is revoked over REST and is refused at its next login; SIGTERM stops the AS cleanly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import Revoked
from cyphonic.pki import TrustStore, fingerprint, load_identity
from cyphonic.quic import QuicEndpoint
from cyphonic.session import SignallingSession
from cyphonic.v1 import signalling_pb2 as pb

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120.0
ADMIN_TOKEN = "e2e-admin-token-0123456789abcdef"


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class AsProcess:
    proc: subprocess.Popen[bytes]
    url: str
    quic_port: int
    pki: Path
    log: Path

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def as_process(registry_url: str, tmp_path: Path) -> Iterator[AsProcess]:
    pki = tmp_path / "pki"
    subprocess.run(
        [BIN / "cyphonic-as", "init-pki", "--pki-dir", str(pki)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    token_file.chmod(0o600)
    http_port, quic_port = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
    env = {
        **os.environ,
        "CYPHONIC_DATABASE_URL": registry_url,
        "CYPHONIC_PKI_DIR": str(pki),
        "CYPHONIC_LOG_FORMAT": "json",
    }
    log = tmp_path / "as.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                BIN / "cyphonic-as",
                "serve",
                "--migrate",
                "--http-port",
                str(http_port),
                "--quic-host",
                "127.0.0.1",
                "--quic-port",
                str(quic_port),
                "--admin-token-file",
                str(token_file),
                "--nms-endpoint",
                "127.0.0.1:4443",
                "--nms-endpoint",
                "[::1]:4443",
                "--as-endpoint",
                f"127.0.0.1:{quic_port}",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = AsProcess(
        proc=proc, url=f"http://127.0.0.1:{http_port}", quic_port=quic_port, pki=pki, log=log
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"cyphonic-as exited {proc.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{running.url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"cyphonic-as not ready in {START_TIMEOUT_S}s:\n{log.read_text()}")
            time.sleep(0.2)
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN / "cyphonic-agent", *args], capture_output=True, text=True, timeout=timeout
    )


async def _login(state_dir: Path, port: int) -> pb.LoginResponse:
    """Log in over QUIC as the node whose state the agent wrote."""
    identity = load_identity(state_dir / "node.crt", state_dir / "node.key")
    root = x509.load_pem_x509_certificate((state_dir / "root-ca.crt").read_bytes())
    trust = TrustStore(root=root, node_ca=identity.chain[0])
    endpoint = await QuicEndpoint.open(host="127.0.0.1", port=0, identity=identity, trust=trust)
    try:
        conn = await endpoint.connect(
            ("127.0.0.1", port),
            alpn=ALPN_SIGNALLING,
            expect="service",
            expected_name="as.svc.cyphonic.internal",
            handler_factory=SignallingSession.factory(),
            timeout=10.0,
        )
        assert isinstance(conn.handler, SignallingSession)
        answer = await conn.handler.request(
            pb.Envelope(
                version=pb.PROTOCOL_VERSION_1, login_request=pb.LoginRequest(agent_version="e2e")
            )
        )
        return answer.login_response
    finally:
        await endpoint.close()


async def test_enrol_with_the_agent_login_over_quic_revoke_refused(
    as_process: AsProcess,
    tmp_path: Path,
) -> None:
    async with httpx.AsyncClient(
        base_url=as_process.url, headers=as_process.admin, timeout=30
    ) as client:
        created = await client.post(
            "/v1/nodes", json={"name": "e2e-node", "tags": {"owner": "ops"}}
        )
        assert created.status_code == 201, created.text
        token = (
            await client.post("/v1/nodes/e2e-node/enrolment-tokens", json={"ttl_seconds": 600})
        ).json()["token"]
        token_file = tmp_path / "token"
        token_file.write_text(token)
        root = x509.load_pem_x509_certificate((as_process.pki / "root-ca.crt").read_bytes())

        state_dir = tmp_path / "agent-state"
        result = _agent(
            "enroll",
            "--as",
            as_process.url,
            "--token-file",
            str(token_file),
            "--state-dir",
            str(state_dir),
            "--root-ca-sha256",
            fingerprint(root),
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "e2e-node.cyphonic.internal"
        assert token not in result.stdout + result.stderr

        again = _agent(
            "enroll",
            "--as",
            as_process.url,
            "--token",
            token,
            "--state-dir",
            str(tmp_path / "second"),
        )
        assert again.returncode == 1
        assert "token_invalid" in again.stderr

        login = await _login(state_dir, as_process.quic_port)
        assert login.fqdn == "e2e-node.cyphonic.internal"
        assert [len(e.ip) for e in login.nms] == [4, 16]
        assert login.nms_server_name == "nms.svc.cyphonic.internal"

        revoked = await client.post("/v1/nodes/e2e-node/revoke", json={"reason": "key_compromise"})
        assert revoked.status_code == 200
        # Refused in the TLS handshake already (the AS's revocation cache): no login runs.
        with pytest.raises(Revoked, match="TLS handshake refused"):
            await _login(state_dir, as_process.quic_port)

        metrics = (await client.get("/metrics")).text
        assert "cyphonic_as_enrolments_total 1.0" in metrics
        assert "cyphonic_as_logins_total 1.0" in metrics
        assert 'cyphonic_as_refusals_total{operation="login"' not in metrics
        assert 'cyphonic_as_refusals_total{operation="enrol",reason="token_used"}' in metrics

    assert as_process.stop() == 0
    log = as_process.log.read_text()
    assert '"as_stopped"' in log
    # Secrets never reach the log.
    assert ADMIN_TOKEN not in log and token not in log
    assert (state_dir / "node.key").read_text().splitlines()[1] not in log
