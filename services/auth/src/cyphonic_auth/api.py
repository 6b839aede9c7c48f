"""Admin REST API of the AS (FastAPI; OpenAPI at /docs).

Admin routes need ``Authorization: Bearer <admin token>``. Public routes: enrolment (the
token in the body is the credential), the revocation list and CRL, the CA certificates.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from cyphonic.admin import AdminAuth, Page, PageQuery, create_admin_app
from cyphonic.hostport import format_host_port
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cyphonic_auth.enrolment import MAX_CSR_BYTES, MAX_TOKEN_LENGTH, validate_node_name
from cyphonic_auth.service import AuthService, IssuedCertificate
from cyphonic_auth.storage import AuditRecord, CertificateRecord, NodeRecord, RevocationRecord

JsonScalar = str | int | float | bool | None


def _service(request: Request) -> AuthService:
    service: AuthService = request.app.state.auth
    return service


ServiceDep = Annotated[AuthService, Depends(_service)]
NodeName = Annotated[str, Path(min_length=1, max_length=63, description="node name (a DNS label)")]
Serial = Annotated[str, Path(min_length=1, max_length=64, description="serial, hex")]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- schemas


class NodeCreate(_Input):
    """A node to register; its FQDN becomes ``<name>.<domain>``."""

    name: str = Field(min_length=1, max_length=63, description="a DNS label: a-z, 0-9, '-'")
    tags: dict[Annotated[str, Field(max_length=63)], Annotated[str, Field(max_length=253)]] = Field(
        default_factory=dict, max_length=32, description="owner/group tags"
    )
    device_info: dict[Annotated[str, Field(max_length=63)], JsonScalar] = Field(
        default_factory=dict, max_length=32, description="free-form device facts"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return validate_node_name(value)
        except Exception as exc:  # InvalidArgument -> a 422 with the field's location
            raise ValueError(str(exc)) from exc


class CertificatePublic(BaseModel):
    """A node certificate."""

    serial: str
    name: str
    fqdn: str
    status: str
    not_before: datetime
    not_after: datetime
    pem: str

    @classmethod
    def of(cls, record: CertificateRecord) -> CertificatePublic:
        return cls(
            serial=record.serial,
            name=record.node_name,
            fqdn=record.fqdn,
            status=record.status,
            not_before=record.not_before,
            not_after=record.not_after,
            pem=record.pem,
        )


class NodePublic(BaseModel):
    """A node (``certificates`` only when showing one node)."""

    name: str
    fqdn: str
    state: str
    tags: dict[str, Any]
    device_info: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    certificates: list[CertificatePublic] | None = None

    @classmethod
    def of(
        cls, node: NodeRecord, certificates: list[CertificateRecord] | None = None
    ) -> NodePublic:
        return cls(
            name=node.name,
            fqdn=node.fqdn,
            state=node.state,
            tags=node.tags,
            device_info=node.device_info,
            created_at=node.created_at,
            updated_at=node.updated_at,
            certificates=None
            if certificates is None
            else [CertificatePublic.of(c) for c in certificates],
        )


class TokenCreate(_Input):
    """Options of a new enrolment token."""

    ttl_seconds: int | None = Field(
        default=None, ge=60, le=30 * 86_400, description="lifetime (default from the AS settings)"
    )


class TokenPublic(BaseModel):
    """A one-time enrolment token; shown only in this answer."""

    token: str
    name: str
    fqdn: str
    expires_at: datetime


class TokenBody(_Input):
    """An enrolment token."""

    token: str = Field(min_length=1, max_length=MAX_TOKEN_LENGTH)


class EnrolInfo(BaseModel):
    """What a node needs to make its CSR."""

    name: str
    fqdn: str


class EnrolRequest(_Input):
    """A token and a CSR whose key was made on the node."""

    token: str = Field(min_length=1, max_length=MAX_TOKEN_LENGTH)
    csr_pem: str = Field(
        min_length=1,
        max_length=MAX_CSR_BYTES,
        description="PKCS#10 PEM naming exactly the node FQDN",
    )


class CsrSign(_Input):
    """A CSR an admin has the AS sign for a node."""

    csr_pem: str = Field(min_length=1, max_length=MAX_CSR_BYTES)
    valid_days: int | None = Field(default=None, ge=1, le=397)


class CertificateIssued(BaseModel):
    """A signed node certificate and everything the node needs to use it."""

    name: str
    fqdn: str
    serial: str
    not_before: datetime
    not_after: datetime
    certificate_chain_pem: str = Field(description="leaf then node CA")
    root_ca_pem: str
    service_ca_pem: str | None = Field(
        description="the service CA (issuer of the AS, NMS and TRS certificates), for nodes to pin"
    )
    as_endpoints: list[str] = Field(description="AS QUIC endpoints, host:port")
    as_server_name: str = Field(description="name in the AS certificate")
    domain: str


class RevokeRequest(_Input):
    """Why a node or certificate is revoked (RFC 5280 names like key_compromise are kept)."""

    reason: str = Field(default="unspecified", min_length=1, max_length=200)


class RevocationPublic(BaseModel):
    """A revocation."""

    id: int
    name: str
    fqdn: str
    serial: str | None
    reason: str
    revoked_at: datetime

    @classmethod
    def of(cls, record: RevocationRecord) -> RevocationPublic:
        return cls(
            id=record.id,
            name=record.node_name,
            fqdn=record.fqdn,
            serial=record.serial,
            reason=record.reason,
            revoked_at=record.revoked_at,
        )


class AuditPublic(BaseModel):
    """An audit trail entry."""

    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]

    @classmethod
    def of(cls, record: AuditRecord) -> AuditPublic:
        return cls(
            id=record.id,
            at=record.at,
            actor=record.actor,
            action=record.action,
            subject=record.subject,
            detail=record.detail,
        )


class CaPublic(BaseModel):
    """The CA certificates nodes and services trust."""

    root_ca_pem: str
    root_ca_sha256: str
    node_ca_pem: str
    service_ca_pem: str | None = Field(description="issuer of the AS, NMS and TRS certificates")


def _as_endpoints(service: AuthService, request: Request) -> list[str]:
    configured = service.settings.published_as_endpoints
    if configured or not request.url.hostname:
        return configured
    # Not configured: the node reached this REST API by some name; the QUIC endpoint is
    # most likely on the same host.
    return [format_host_port(request.url.hostname, service.settings.quic_port)]


def _issued(
    service: AuthService,
    issued: IssuedCertificate,
    request: Request,
) -> CertificateIssued:
    return CertificateIssued(
        name=issued.node.name,
        fqdn=issued.node.fqdn,
        serial=issued.certificate.serial,
        not_before=issued.certificate.not_before,
        not_after=issued.certificate.not_after,
        certificate_chain_pem=issued.chain_pem,
        root_ca_pem=issued.root_pem,
        service_ca_pem=issued.service_ca_pem,
        as_endpoints=_as_endpoints(service, request),
        as_server_name=service.settings.as_server_name,
        domain=service.settings.domain,
    )


# --------------------------------------------------------------------------- admin routes

nodes = APIRouter(prefix="/v1", tags=["nodes"])


@nodes.post("/nodes", status_code=201, summary="Register a node")
async def create_node(body: NodeCreate, service: ServiceDep, actor: AdminAuth) -> NodePublic:
    node = await service.create_node(
        body.name, tags=dict(body.tags), device_info=dict(body.device_info), actor=actor
    )
    return NodePublic.of(node, [])


@nodes.get("/nodes", summary="List nodes")
async def list_nodes(service: ServiceDep, page: PageQuery, _actor: AdminAuth) -> Page[NodePublic]:
    items, total = await service.registry.list_nodes(limit=page.limit, offset=page.offset)
    return Page[NodePublic](
        items=[NodePublic.of(n) for n in items], total=total, limit=page.limit, offset=page.offset
    )


@nodes.get("/nodes/{name}", summary="Show a node and its certificates")
async def show_node(name: NodeName, service: ServiceDep, _actor: AdminAuth) -> NodePublic:
    details = await service.node_details(name)
    return NodePublic.of(details.node, details.certificates)


@nodes.post(
    "/nodes/{name}/enrolment-tokens", status_code=201, summary="Issue a one-time enrolment token"
)
async def issue_token(
    name: NodeName,
    service: ServiceDep,
    actor: AdminAuth,
    body: TokenCreate | None = None,
) -> TokenPublic:
    ttl = timedelta(seconds=body.ttl_seconds) if body and body.ttl_seconds else None
    issued = await service.issue_token(name, ttl=ttl, actor=actor)
    return TokenPublic(
        token=issued.token,
        name=issued.node.name,
        fqdn=issued.node.fqdn,
        expires_at=issued.expires_at,
    )


@nodes.post(
    "/nodes/{name}/certificates", status_code=201, summary="Sign a CSR for a node (admin, no token)"
)
async def sign_certificate(
    name: NodeName,
    body: CsrSign,
    service: ServiceDep,
    actor: AdminAuth,
    request: Request,
) -> CertificateIssued:
    valid_for = timedelta(days=body.valid_days) if body.valid_days else None
    issued = await service.sign_csr(name, body.csr_pem, valid_for=valid_for, actor=actor)
    return _issued(service, issued, request)


@nodes.post("/nodes/{name}/revoke", summary="Revoke a node and all its certificates")
async def revoke_node(
    name: NodeName,
    service: ServiceDep,
    actor: AdminAuth,
    body: RevokeRequest | None = None,
) -> NodePublic:
    await service.revoke_node(name, reason=(body or RevokeRequest()).reason, actor=actor)
    details = await service.node_details(name)
    return NodePublic.of(details.node, details.certificates)


@nodes.get("/certificates/{serial}", summary="Show a certificate")
async def show_certificate(
    serial: Serial,
    service: ServiceDep,
    _actor: AdminAuth,
) -> CertificatePublic:
    return CertificatePublic.of(await service.certificate(serial))


@nodes.post("/certificates/{serial}/revoke", summary="Revoke one certificate")
async def revoke_certificate(
    serial: Serial,
    service: ServiceDep,
    actor: AdminAuth,
    body: RevokeRequest | None = None,
) -> RevocationPublic:
    record = await service.revoke_certificate(
        serial, reason=(body or RevokeRequest()).reason, actor=actor
    )
    return RevocationPublic.of(record)


@nodes.get("/audit", summary="The audit trail, newest first")
async def audit(service: ServiceDep, page: PageQuery, _actor: AdminAuth) -> Page[AuditPublic]:
    items, total = await service.audit(limit=page.limit, offset=page.offset)
    return Page[AuditPublic](
        items=[AuditPublic.of(a) for a in items], total=total, limit=page.limit, offset=page.offset
    )


# --------------------------------------------------------------------------- public routes

enrolment = APIRouter(prefix="/v1", tags=["enrolment"])


@enrolment.post("/enrol/info", summary="The node a token enrols (the token stays unused)")
async def enrol_info(body: TokenBody, service: ServiceDep) -> EnrolInfo:
    node = await service.token_node(body.token)
    return EnrolInfo(name=node.name, fqdn=node.fqdn)


@enrolment.post("/enrol", status_code=201, summary="Redeem a token with a CSR")
async def enrol(body: EnrolRequest, service: ServiceDep, request: Request) -> CertificateIssued:
    return _issued(service, await service.enrol(body.token, body.csr_pem), request)


revocation = APIRouter(prefix="/v1", tags=["revocation"])


@revocation.get("/revocations", summary="Revocations, oldest first (poll with after_id)")
async def revocations(
    service: ServiceDep,
    page: PageQuery,
    after_id: Annotated[int, Query(ge=0, le=2**62, description="only ids above this")] = 0,
) -> Page[RevocationPublic]:
    items, total = await service.registry.revocations(
        after_id=after_id, limit=page.limit, offset=page.offset
    )
    return Page[RevocationPublic](
        items=[RevocationPublic.of(r) for r in items],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


class RevocationWatchPublic(BaseModel):
    """Answer of the revocation long-poll."""

    newest_id: int = Field(description="id of the newest revocation (the CRL number)")


@revocation.get(
    "/revocations/watch",
    summary="Long-poll: answers once a revocation newer than after_id exists",
)
async def watch_revocations(
    service: ServiceDep,
    after_id: Annotated[int, Query(ge=0, le=2**62, description="answer once an id is above")] = 0,
    wait_s: Annotated[float, Query(ge=0, le=60, description="longest wait (seconds)")] = 25,
) -> RevocationWatchPublic:
    return RevocationWatchPublic(
        newest_id=await service.watch_revocations(after_id=after_id, wait_s=wait_s)
    )


@revocation.get(
    "/crl",
    summary="DER CRL signed by the node CA",
    response_class=Response,
    responses={200: {"content": {"application/pkix-crl": {}}}},
)
async def crl(service: ServiceDep) -> Response:
    return Response(await service.crl(), media_type="application/pkix-crl")


@revocation.get("/ca", summary="Root and node CA certificates")
async def ca(service: ServiceDep) -> CaPublic:
    return CaPublic.model_validate(service.describe_ca())


def create_app(service: AuthService, *, lifespan: Any = None) -> FastAPI:
    """The AS admin app around ``service``."""
    app = create_admin_app(
        service="as",
        title="CYPHONIC Authentication Service",
        description="Node enrolment, certificates and revocation. Admin routes need the "
        "bearer admin token; enrolment routes take the one-time token in the body.",
        admin_token=service.settings.admin_token,
        ready_checks=[service.registry.ping],
        routers=[nodes, enrolment, revocation],
        metrics_registry=service.metrics.registry,
        lifespan=lifespan,
    )
    app.state.auth = service
    return app
