"""The operator's web console, served by the NMS admin port, and the admin routes it needs.

    GET  /console/                  the console (static HTML, CSS, JS in the package; public)
    GET  /v1/console                what this console can show (replica, domain, revoke, policy)
    GET  /v1/trs                    TRS replicas (the NMS's directory joined with each
                                    replica's own counters) and their relayed sessions
    POST /v1/nodes/{fqdn}/revoke    revoke a node at the AS (the NMS calls the AS admin API)

The pages hold no data and no token: the browser asks for the admin token in a login form,
keeps it in sessionStorage (this tab only) and sends it as ``Authorization: Bearer`` to the
``/v1`` routes of this same origin, which demand it like every admin route. So the token is
never in a URL, a page, or an access log. The pages are sent with a strict
Content-Security-Policy (scripts and styles from this origin only, no inline code, no
framing), and the script writes every value with ``textContent``: node names and addresses
cannot become markup.

Why the NMS forwards revocation instead of the browser calling the AS (docs/console.md):
one origin and one token for the operator, no CORS to open on the AS, and the AS admin port
need not be reachable from operators' browsers at all, only from the NMS.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from importlib import resources
from typing import Annotated, Any

import httpx
from cyphonic.admin import AdminAuth
from cyphonic.errors import CyphonicError, InvalidArgument, NotFound, Unavailable
from cyphonic.log import get_logger
from cyphonic.trs_directory import HEARTBEAT_INTERVAL_S
from fastapi import APIRouter, Path
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cyphonic_nms.api import ManagerDep
from cyphonic_nms.config import NmsSettings
from cyphonic_nms.manager import NodeManager
from cyphonic_nms.upstream import AdminApi

log = get_logger("nms.console")

# The files of the console (package data, cyphonic_nms/web/) and their media types.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
MAX_TRS_SESSIONS = 500  # per replica, one page of its admin API
STALE_AFTER_S = 2 * HEARTBEAT_INTERVAL_S


def asset(name: str) -> bytes:
    """One console file from the package; ``NotFound`` for any other name."""
    if name not in ASSETS:
        raise NotFound("no such console file")
    return resources.files("cyphonic_nms").joinpath("web", name).read_bytes()


# --------------------------------------------------------------------------- schemas


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConsoleInfo(BaseModel):
    """What the console of this NMS replica can show and do."""

    replica_id: str
    domain: str
    revoke_available: bool = Field(description="an AS URL is configured (as_url)")
    trs_admin_apis: int = Field(
        description="TRS admin URLs configured (trs_admin_urls, plus 1 for a URL template)"
    )
    policy_available: bool = Field(
        description="access policy is not part of this version; the console keeps its place"
    )


class TrsCounters(BaseModel):
    """A TRS replica's own counters (its ``GET /v1/replica``)."""

    forwarded_packets: int
    forwarded_bytes: int
    packets_per_s: float
    bits_per_s: float
    drops: dict[str, int]
    last_sync_error: str | None = None


class TrsReplicaView(BaseModel):
    """One TRS replica: in the NMS's directory (relays are handed out from it), and/or
    answering on a configured admin URL."""

    replica_id: str
    in_directory: bool = Field(description="the NMS hands this replica out for relayed routes")
    stale: bool = Field(
        description="its directory entry was not refreshed for two heartbeats (it may be "
        "dying; the entry expires after the directory TTL)"
    )
    endpoints: list[str]
    server_name: str | None
    sessions: int | None = Field(description="relayed sessions (its load)")
    updated_age_s: float | None = Field(description="seconds since its directory refresh")
    admin_url: str | None
    counters: TrsCounters | None = Field(description="from its admin API, when reachable")


class TrsSide(BaseModel):
    fqdn: str
    address: str
    packets: int
    bytes: int


class TrsSessionView(BaseModel):
    """A relayed session (one route) on a TRS replica."""

    replica_id: str
    route_id: str
    pair: tuple[str, str]
    complete: bool
    packets: int
    bytes: int
    age_s: float
    idle_s: float
    sides: list[TrsSide | None]


class TrsProblem(BaseModel):
    """A TRS source the NMS could not read."""

    source: str
    message: str


class TrsOverview(BaseModel):
    """TRS replicas and their relayed sessions, as far as the NMS can see."""

    replicas: list[TrsReplicaView]
    sessions: list[TrsSessionView]
    problems: list[TrsProblem]


class ConsoleRevoke(_Input):
    """Why the node is revoked (kept in the AS's revocation list and audit trail)."""

    reason: str = Field(default="unspecified", min_length=1, max_length=200)


class RevokedNode(BaseModel):
    """The node after revocation, as the AS answered."""

    fqdn: str
    state: str
    revoked_certificates: int


# Upstream answers (validated, extra fields ignored).


class _UpstreamStatus(BaseModel):
    replica: int
    forwarded_packets: int
    forwarded_bytes: int
    packets_per_s: float
    bits_per_s: float
    drops: dict[str, int]
    last_sync_error: str | None = None


class _UpstreamSession(BaseModel):
    route_id: str
    pair: tuple[str, str]
    complete: bool
    packets: int
    bytes: int
    age_s: float
    idle_s: float
    sides: list[TrsSide | None]


class _UpstreamSessions(BaseModel):
    items: list[_UpstreamSession]


class _UpstreamCertificate(BaseModel):
    status: str


class _UpstreamNode(BaseModel):
    fqdn: str
    state: str
    certificates: list[_UpstreamCertificate] | None = None


# --------------------------------------------------------------------------- logic


async def _read_trs(api: AdminApi) -> tuple[_UpstreamStatus, list[_UpstreamSession]]:
    status = await api.get("/v1/replica")
    sessions = await api.get(f"/v1/sessions?limit={MAX_TRS_SESSIONS}")
    try:
        return (
            _UpstreamStatus.model_validate(status),
            _UpstreamSessions.model_validate(sessions).items,
        )
    except ValidationError as exc:
        raise Unavailable(f"the TRS at {api.shown_url} answered an unexpected form") from exc


async def trs_overview(
    manager: NodeManager,
    apis: list[AdminApi],
    api_of: Callable[[str], AdminApi | None] = lambda _replica_id: None,
) -> TrsOverview:
    """The directory the NMS relays with, joined by replica id with each TRS admin API:
    ``apis`` (configured URLs) and ``api_of(replica_id)`` for each directory entry whose
    URL is not among them (a URL template)."""
    problems: list[TrsProblem] = []
    now_ms = time.time() * 1000
    replicas: dict[str, TrsReplicaView] = {}
    apis = list(apis)
    try:
        for entry in await manager.trs.live():
            age_s = max(0.0, now_ms - entry.updated_ms) / 1000 if entry.updated_ms else None
            replicas[entry.replica_id] = TrsReplicaView(
                replica_id=entry.replica_id,
                in_directory=True,
                stale=age_s is not None and age_s > STALE_AFTER_S,
                endpoints=[str(ep) for ep in entry.endpoints],
                server_name=entry.server_name,
                sessions=entry.load,
                updated_age_s=round(age_s, 1) if age_s is not None else None,
                admin_url=None,
                counters=None,
            )
            derived = api_of(entry.replica_id)
            if derived is not None and all(a.base_url != derived.base_url for a in apis):
                apis.append(derived)
    except CyphonicError as exc:
        problems.append(TrsProblem(source="TRS directory", message=exc.message))
    sessions: list[TrsSessionView] = []
    read: set[str] = set()  # replicas already read (two URLs may reach the same one)
    answers = await asyncio.gather(*(_read_trs(api) for api in apis), return_exceptions=True)
    for api, answer in zip(apis, answers, strict=True):
        if isinstance(answer, CyphonicError):
            problems.append(TrsProblem(source=api.shown_url, message=answer.message))
            continue
        if isinstance(answer, BaseException):
            raise answer
        status, items = answer
        # The name a TRS registers under in the directory (cyphonic_trs.storage.replica_name).
        replica_id = f"trs-{status.replica}"
        if replica_id in read:
            continue
        read.add(replica_id)
        counters = TrsCounters.model_validate(status.model_dump())
        known = replicas.get(replica_id)
        if known is not None:
            known.admin_url, known.counters = api.shown_url, counters
            known.sessions = len(items)
        else:
            replicas[replica_id] = TrsReplicaView(
                replica_id=replica_id,
                in_directory=False,
                stale=False,
                endpoints=[],
                server_name=None,
                sessions=len(items),
                updated_age_s=None,
                admin_url=api.shown_url,
                counters=counters,
            )
        sessions.extend(
            TrsSessionView(
                replica_id=replica_id, **item.model_dump(exclude={"sides"}), sides=item.sides
            )
            for item in items
        )
    return TrsOverview(
        replicas=sorted(replicas.values(), key=lambda r: r.replica_id),
        sessions=sorted(sessions, key=lambda s: (s.replica_id, s.route_id)),
        problems=problems,
    )


# The name a TRS registers under in the directory (cyphonic_trs.storage.replica_name).
_TRS_NAME = re.compile(r"trs-(\d{1,9})")


def node_name(fqdn: str, domain: str) -> str:
    """The AS's node name (first label) of ``fqdn``; ``InvalidArgument`` outside ``domain``."""
    fqdn = fqdn.lower().rstrip(".")
    name, _, rest = fqdn.partition(".")
    if not name or rest != domain.lower().rstrip("."):
        raise InvalidArgument(f"{fqdn} is not a node of {domain}")
    return name


# --------------------------------------------------------------------------- routes


def _page(name: str) -> Response:
    return Response(asset(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


def make_router(
    settings: NmsSettings, *, transport: httpx.AsyncBaseTransport | None = None
) -> APIRouter:
    """The console pages and routes, bound to the replica's settings (``transport``: how
    the AS and TRS admin APIs are reached, for tests; default the network)."""
    router = APIRouter()
    as_api = (
        AdminApi(
            "AS",
            settings.as_url,
            settings.as_admin_token or settings.admin_token,
            transport=transport,
        )
        if settings.as_url
        else None
    )
    trs_token = settings.trs_admin_token or settings.admin_token
    trs_apis = [
        AdminApi("TRS", url, trs_token, transport=transport) for url in settings.trs_admin_urls
    ]
    template = settings.trs_admin_url_template

    def trs_api_of(replica_id: str) -> AdminApi | None:
        number = _TRS_NAME.fullmatch(replica_id)
        if template is None or number is None:
            return None
        url = template.replace("{replica}", number.group(1))
        return AdminApi("TRS", url, trs_token, transport=transport)

    @router.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        # Relative, so that it holds behind a proxy serving the NMS under a path prefix.
        return RedirectResponse("console/", status_code=307)

    @router.get("/console", include_in_schema=False)
    async def console_no_slash() -> RedirectResponse:
        return RedirectResponse("console/", status_code=307)

    @router.get("/console/", tags=["console"], summary="The web console", response_class=Response)
    async def console_index() -> Response:
        return _page("index.html")

    @router.get(
        "/console/{name}",
        tags=["console"],
        summary="A console file",
        response_class=Response,
        responses={404: {"description": "no such file"}},
    )
    async def console_asset(name: Annotated[str, Path(max_length=64)]) -> Response:
        return _page(name)

    @router.get("/v1/console", tags=["console"], summary="What the console can show")
    async def console_info(_actor: AdminAuth, manager: ManagerDep) -> ConsoleInfo:
        return ConsoleInfo(
            replica_id=manager.replica_id,
            domain=settings.domain,
            revoke_available=as_api is not None,
            trs_admin_apis=len(trs_apis) + (template is not None),
            policy_available=False,
        )

    @router.get("/v1/trs", tags=["console"], summary="TRS replicas and relayed sessions")
    async def trs(_actor: AdminAuth, manager: ManagerDep) -> TrsOverview:
        return await trs_overview(manager, trs_apis, trs_api_of)

    @router.post(
        "/v1/nodes/{fqdn}/revoke",
        tags=["console"],
        summary="Revoke a node (forwarded to the AS)",
        responses={
            404: {"description": "no such node at the AS"},
            503: {"description": "no AS configured, or the AS unreachable"},
        },
    )
    async def revoke(
        actor: AdminAuth,
        fqdn: Annotated[str, Path(max_length=253, pattern=r"^[A-Za-z0-9.-]+$")],
        body: ConsoleRevoke | None = None,
    ) -> RevokedNode:
        if as_api is None:
            raise Unavailable("no AS is configured on this NMS (CYPHONIC_AS_URL): revoke there")
        name = node_name(fqdn, settings.domain)
        reason = (body or ConsoleRevoke()).reason
        answer: Any = await as_api.post(f"/v1/nodes/{name}/revoke", {"reason": reason})
        try:
            node = _UpstreamNode.model_validate(answer)
        except ValidationError as exc:
            raise Unavailable("the AS answered an unexpected form") from exc
        revoked = sum(1 for c in node.certificates or [] if c.status == "revoked")
        log.info("console_revoke", fqdn=node.fqdn, actor=actor, reason=reason, state=node.state)
        return RevokedNode(fqdn=node.fqdn, state=node.state, revoked_certificates=revoked)

    return router
