"""Helpers of the AS integration tests (imported by conftest and the tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cyphonic.pki import PeerIdentity, PkiMaterial, generate_key, make_csr, verify_peer
from cyphonic_auth.service import AuthService

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


@dataclass
class Clock:
    """A clock the test moves by hand."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def csr_pem(key: ec.EllipticCurvePrivateKey, fqdn: str) -> str:
    """PEM CSR of ``key`` naming ``fqdn``."""
    return make_csr(key, fqdn).public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class AsHarness:
    """The AS under test and helpers."""

    service: AuthService
    client: httpx.AsyncClient
    clock: Clock
    material: PkiMaterial
    admin: dict[str, str]

    async def create_node(self, name: str, **extra: Any) -> dict[str, Any]:
        response = await self.client.post(
            "/v1/nodes", json={"name": name, **extra}, headers=self.admin
        )
        assert response.status_code == 201, (response.status_code, response.text)
        return dict(response.json())

    async def token(self, name: str, ttl_seconds: int | None = None) -> str:
        body = {"ttl_seconds": ttl_seconds} if ttl_seconds else {}
        response = await self.client.post(
            f"/v1/nodes/{name}/enrolment-tokens", json=body, headers=self.admin
        )
        assert response.status_code == 201, response.text
        return str(response.json()["token"])

    async def enrol(self, token: str, csr: str) -> httpx.Response:
        return await self.client.post("/v1/enrol", json={"token": token, "csr_pem": csr})

    async def enrolled(
        self,
        name: str,
    ) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
        """Create ``name``, enrol it with a fresh key; the key and the issued chain."""
        node = await self.create_node(name)
        key = generate_key()
        response = await self.enrol(await self.token(name), csr_pem(key, node["fqdn"]))
        assert response.status_code == 201, response.text
        chain = x509.load_pem_x509_certificates(response.json()["certificate_chain_pem"].encode())
        return key, chain

    def peer(self, chain: list[x509.Certificate]) -> PeerIdentity:
        """What the QUIC endpoint would hand the AS for a node presenting ``chain``."""
        return verify_peer(
            chain, trust=self.material.trust, expect="node", expected_name=None, now=self.clock()
        )

    async def metric(self, name: str, **labels: str) -> float:
        value = self.service.metrics.registry.get_sample_value(name, labels or None)
        return float(value or 0.0)
