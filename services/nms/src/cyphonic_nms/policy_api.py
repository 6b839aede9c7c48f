"""NMS admin REST for the access policy (docs/policy.md); included in ``api.router``.

    GET    /v1/policy                    the document in force, its revision, the default
    PUT    /v1/policy                    replace it (422 with every problem and where it is)
    DELETE /v1/policy                    remove it: the NMS default applies again
    GET    /v1/policy/history            who changed it when, old and new documents
    GET    /v1/policy/check?from=&to=&traffic=tcp/22      the dry run
    GET    /v1/nodes/{fqdn}/tags, PUT /v1/nodes/{fqdn}/tags   a node's tags (its groups)

A change made here is applied by this replica at once (filters pushed, routes withdrawn);
other replicas see the new revision within their ``policy_poll_s``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

from cyphonic.admin import AdminAuth
from cyphonic.errors import MalformedMessage, OversizedMessage, Unavailable
from cyphonic.log import get_logger
from cyphonic.policy import MAX_DOCUMENT_BYTES, parse_policy, parse_protocol_port
from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from cyphonic_nms.access import AccessControl
from cyphonic_nms.manager import NodeManager
from cyphonic_nms.policy_store import MAX_HISTORY_PAGE, PolicyStore, StoredPolicy

policy_router = APIRouter(tags=["policy"])
log = get_logger("nms.policy")

_TAG_KEY = r"^[A-Za-z0-9_.@-]{1,63}$"
_TAG_VALUE = r"^[A-Za-z0-9_.@:/, -]{1,253}$"


def _access(request: Request) -> tuple[NodeManager, AccessControl, PolicyStore]:
    manager: NodeManager = request.app.state.manager
    if manager.access is None or manager.policy_store is None:
        raise Unavailable("this NMS has no policy store")
    return manager, manager.access, manager.policy_store


AccessDep = Annotated[tuple[NodeManager, AccessControl, PolicyStore], Depends(_access)]


class PolicyPublic(BaseModel):
    """The access policy as stored, and what is in force."""

    revision: int = Field(description="grows with every change of the policy or of node tags")
    document: dict[str, Any] | None = Field(description="the stored document; null: none set")
    default: str = Field(description="what applies without a document: allow or deny")
    in_force: str = Field(description="document, default-allow or default-deny")
    updated_at: datetime | None
    updated_by: str | None


class PolicyChangePublic(BaseModel):
    id: int
    revision: int
    at: datetime
    actor: str
    old_document: dict[str, Any] | None
    new_document: dict[str, Any] | None


class CheckPublic(BaseModel):
    """The dry run's answer."""

    source: str
    destination: str
    traffic: str
    allowed: bool
    rule: int | None = Field(description="index of the first rule that allows it")
    reason: str
    route_allowed: bool = Field(description="whether a tunnel between the two may exist at all")
    revision: int


class TagsBody(BaseModel):
    tags: dict[
        Annotated[str, Field(pattern=_TAG_KEY)], Annotated[str, Field(pattern=_TAG_VALUE)]
    ] = Field(max_length=32, description="key/value tags; 'group' lists groups, comma-separated")


class TagsPublic(BaseModel):
    fqdn: str
    tags: dict[str, str]


def _public(access: AccessControl, stored: StoredPolicy) -> PolicyPublic:
    default = "deny" if access.default_deny else "allow"
    return PolicyPublic(
        revision=stored.revision,
        document=stored.document,
        default=default,
        in_force="document" if stored.document is not None else f"default-{default}",
        updated_at=stored.updated_at,
        updated_by=stored.updated_by,
    )


async def _applied(manager: NodeManager) -> None:
    # Filters out and forbidden routes withdrawn before the answer (the 1 s promise).
    await manager.sync_policy()


@policy_router.get("/policy", response_model=PolicyPublic, summary="The access policy")
async def get_policy(_actor: AdminAuth, dep: AccessDep) -> PolicyPublic:
    _, access, store = dep
    return _public(access, await store.current())


@policy_router.put(
    "/policy",
    response_model=PolicyPublic,
    summary="Replace the access policy (validated; 422 lists every problem and where)",
)
async def put_policy(
    actor: AdminAuth,
    dep: AccessDep,
    request: Request,
    expected_revision: Annotated[
        int | None, Query(ge=0, description="refuse (409) if the revision is not this one")
    ] = None,
) -> PolicyPublic:
    manager, access, store = dep
    document = await _json_body(request)
    parse_policy(document)  # PolicyInvalid: 422 with every problem and where it is
    stored = await store.replace(
        document,
        actor=actor,
        now=datetime.now(UTC),
        expected_revision=expected_revision,
    )
    log.info("policy_replaced", revision=stored.revision, actor=actor)
    await _applied(manager)
    return _public(access, stored)


@policy_router.delete(
    "/policy", response_model=PolicyPublic, summary="Remove the policy: the default applies"
)
async def delete_policy(actor: AdminAuth, dep: AccessDep) -> PolicyPublic:
    manager, access, store = dep
    stored = await store.replace(None, actor=actor, now=datetime.now(UTC))
    log.info("policy_replaced", revision=stored.revision, actor=actor, document=None)
    await _applied(manager)
    return _public(access, stored)


@policy_router.get(
    "/policy/history", response_model=list[PolicyChangePublic], summary="Changes, newest first"
)
async def policy_history(
    _actor: AdminAuth,
    dep: AccessDep,
    limit: Annotated[int, Query(ge=1, le=MAX_HISTORY_PAGE)] = 50,
    before: Annotated[int | None, Query(ge=1, description="changes with a smaller id")] = None,
) -> list[PolicyChangePublic]:
    _, _, store = dep
    return [
        PolicyChangePublic(
            id=c.change_id,
            revision=c.revision,
            at=c.at,
            actor=c.actor,
            old_document=c.old_document,
            new_document=c.new_document,
        )
        for c in await store.history(limit=limit, before=before)
    ]


@policy_router.get(
    "/policy/check", response_model=CheckPublic, summary="Dry run: may A reach B on tcp/22?"
)
async def policy_check(
    _actor: AdminAuth,
    dep: AccessDep,
    source: Annotated[str, Query(alias="from", min_length=1, max_length=253)],
    destination: Annotated[str, Query(alias="to", min_length=1, max_length=253)],
    traffic: Annotated[
        str, Query(max_length=16, description="tcp/22, udp/53, icmp or any")
    ] = "any",
) -> CheckPublic:
    _, access, store = dep
    proto, port = parse_protocol_port(traffic)
    await access.refresh()
    a, b = source.lower().rstrip("."), destination.lower().rstrip(".")
    for fqdn in (a, b):
        await store.tags(fqdn)  # NotFound for an unknown node
    decision = access.can(a, b, proto, port)
    return CheckPublic(
        source=a,
        destination=b,
        traffic=traffic.lower(),
        allowed=decision.allowed,
        rule=decision.rule,
        reason=decision.reason,
        route_allowed=access.route_allowed(a, b),
        revision=access.revision,
    )


@policy_router.get("/nodes/{fqdn}/tags", response_model=TagsPublic, summary="A node's tags")
async def get_tags(
    _actor: AdminAuth, dep: AccessDep, fqdn: Annotated[str, Path(max_length=253)]
) -> TagsPublic:
    _, _, store = dep
    return TagsPublic(fqdn=fqdn.lower(), tags=await store.tags(fqdn))


@policy_router.put("/nodes/{fqdn}/tags", response_model=TagsPublic, summary="Replace a node's tags")
async def put_tags(
    actor: AdminAuth,
    dep: AccessDep,
    body: TagsBody,
    fqdn: Annotated[str, Path(max_length=253)],
) -> TagsPublic:
    manager, _, store = dep
    tags = await store.set_tags(fqdn, dict(body.tags), actor=actor, now=datetime.now(UTC))
    await _applied(manager)
    return TagsPublic(fqdn=fqdn.lower(), tags=tags)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise OversizedMessage(f"a policy document has at most {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage("the policy is not valid JSON") from exc
