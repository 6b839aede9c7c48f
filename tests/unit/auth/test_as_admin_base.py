"""The shared admin REST base (cyphonic.admin): auth, error shapes, health, readiness, metrics."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from cyphonic.admin import AdminAuth, AdminServer, Page, PageQuery, create_admin_app
from cyphonic.errors import AlreadyExists, NotFound, Unavailable
from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError

TOKEN = "unit-admin-token"


class Item(BaseModel):
    name: str
    size: int = 0


def _router() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/items", status_code=201)
    async def create(item: Item, actor: AdminAuth) -> dict[str, str]:
        if item.name == "dup":
            raise AlreadyExists("item exists")
        return {"name": item.name, "actor": actor}

    @router.get("/items")
    async def listing(page: PageQuery) -> Page[Item]:
        items = [Item(name=f"i{n}") for n in range(10)]
        return Page[Item](
            items=items[page.offset : page.offset + page.limit],
            total=10,
            limit=page.limit,
            offset=page.offset,
        )

    @router.get("/missing")
    async def missing() -> None:
        raise NotFound("no such thing")

    @router.get("/crash")
    async def crash() -> None:
        raise RuntimeError("password=hunter2")

    @router.get("/db-down")
    async def db_down() -> None:
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))

    return router


class Readiness:
    def __init__(self) -> None:
        self.up = True

    async def __call__(self) -> None:
        if not self.up:
            raise Unavailable("database unreachable")


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
async def client(readiness: Readiness) -> AsyncIterator[httpx.AsyncClient]:
    app = create_admin_app(
        service="unit",
        title="unit",
        admin_token=TOKEN,
        ready_checks=[readiness],
        routers=[_router()],
        max_body_bytes=1024,
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://unit") as c:
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_bearer_token_required(client: httpx.AsyncClient) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        response = await client.post("/v1/items", json={"name": "a"}, headers=headers)
        assert response.status_code == 401
        assert response.json() == {
            "error": {"code": "unauthenticated", "message": response.json()["error"]["message"]}
        }
        assert TOKEN not in response.text
    ok = await client.post("/v1/items", json={"name": "a"}, headers=AUTH)
    assert ok.status_code == 201 and ok.json() == {"name": "a", "actor": "admin"}


async def test_no_configured_token_refuses_everyone() -> None:
    app = create_admin_app(service="unit2", title="u", admin_token=None, routers=[_router()])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://unit") as c:
        response = await c.post(
            "/v1/items", json={"name": "a"}, headers={"Authorization": "Bearer "}
        )
        assert response.status_code in (401, 403)
        response = await c.post(
            "/v1/items", json={"name": "a"}, headers={"Authorization": "Bearer anything"}
        )
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "permission_denied"


async def test_error_shapes(client: httpx.AsyncClient) -> None:
    cases = [
        (
            await client.post(
                "/v1/items", content=b"{bad", headers={**AUTH, "content-type": "application/json"}
            ),
            400,
            "malformed",
        ),
        (
            await client.post("/v1/items", json={"size": "big"}, headers=AUTH),
            422,
            "invalid_argument",
        ),
        (await client.post("/v1/items", json={"name": "dup"}, headers=AUTH), 409, "already_exists"),
        (
            await client.post(
                "/v1/items",
                content=b"x" * 5000,
                headers={**AUTH, "content-type": "application/json"},
            ),
            413,
            "oversized",
        ),
        (await client.get("/v1/missing"), 404, "not_found"),
        (await client.get("/nowhere"), 404, "not_found"),
        (await client.get("/v1/crash"), 500, "internal"),
        (await client.get("/v1/db-down"), 503, "unavailable"),
        (await client.get("/v1/items?limit=0"), 422, "invalid_argument"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
    assert "hunter2" not in cases[6][0].text


async def test_streamed_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 200

    response = await client.post(
        "/v1/items", content=chunks(), headers={**AUTH, "content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "oversized"


async def test_validation_details_do_not_echo_input(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/items", json={"name": "s3cr3t-value", "size": "s3cr3t"}, headers=AUTH
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"] == ["body", "size"]
    assert "s3cr3t" not in response.text


async def test_health_readiness_and_metrics(
    client: httpx.AsyncClient, readiness: Readiness
) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    readiness.up = False
    down = await client.get("/readyz")
    assert down.status_code == 503
    assert down.json()["error"] == {"code": "unavailable", "message": "database unreachable"}
    assert (await client.get("/healthz")).status_code == 200
    metrics = (await client.get("/metrics")).text
    assert 'cyphonic_unit_http_requests_total{method="GET",route="/readyz",status="503"} 1.0' in (
        metrics
    )


async def test_pagination(client: httpx.AsyncClient) -> None:
    page = (await client.get("/v1/items?limit=3&offset=8")).json()
    assert page == {
        "items": [{"name": "i8", "size": 0}, {"name": "i9", "size": 0}],
        "total": 10,
        "limit": 3,
        "offset": 8,
    }


async def test_openapi_documents_bearer_auth(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert (await client.get("/docs")).status_code == 200


async def test_admin_server_serves_on_an_ephemeral_port_and_stops() -> None:
    app = create_admin_app(service="unit3", title="u", admin_token=TOKEN)
    server = AdminServer(app, host="127.0.0.1", port=0, log_level="warning")
    await server.start()
    try:
        async with httpx.AsyncClient() as c:
            response = await c.get(f"http://127.0.0.1:{server.port}/healthz")
        assert response.json() == {"status": "ok"}
    finally:
        await server.stop()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as c:
            await c.get(f"http://127.0.0.1:{server.port}/healthz")


async def test_admin_server_port_in_use_raises() -> None:
    app = create_admin_app(service="unit4", title="u", admin_token=TOKEN)
    first = AdminServer(app, host="127.0.0.1", port=0, log_level="warning")
    await first.start()
    try:
        second = AdminServer(app, host="127.0.0.1", port=first.port, log_level="warning")
        with pytest.raises((OSError, SystemExit)):
            await second.start()
    finally:
        await first.stop()


async def test_admin_server_socket_lets_asyncio_set_nodelay() -> None:
    # asyncio sets TCP_NODELAY on accepted connections only when the listening socket's
    # protocol is IPPROTO_TCP; without it every keep-alive request waited ~40 ms.
    app = create_admin_app(service="unit5", title="u", admin_token=TOKEN)
    server = AdminServer(app, host="127.0.0.1", port=0, log_level="warning")
    await server.start()
    try:
        sock = server._socket
        assert sock is not None
        assert sock.proto == socket.IPPROTO_TCP
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as c:
            start = time.perf_counter()
            for _ in range(10):
                assert (await c.get("/healthz")).status_code == 200
            elapsed = time.perf_counter() - start
        assert elapsed < 0.4, f"10 keep-alive requests took {elapsed:.3f}s"
    finally:
        await server.stop()
