"""The admin REST base every service builds on (FastAPI).

    app = create_admin_app(
        service="nms", title="CYPHONIC NMS", admin_token=settings.admin_token,
        ready_checks=[lambda: ping(engine)], routers=[router], metrics_registry=registry,
    )
    server = AdminServer(app, host=settings.http_host, port=settings.http_port)
    await server.start(); ...; await server.stop()

What every admin API gets from here:

- ``AdminAuth``: a dependency alias that demands ``Authorization: Bearer <admin token>``
  (compared in constant time; the token is never logged). Routes without it are public.
- Errors as JSON ``{"error": {"code": "<code_name>", "message": "..."}}``: a raised
  ``CyphonicError`` gets its status from ``cyphonic.errors.HTTP_STATUS``; a body that is not
  JSON is 400 ``malformed``; a body or query that does not validate is 422
  ``invalid_argument`` (with ``details``, never echoing the input); an oversized body is 413
  ``oversized``; a database that is down is 503 ``unavailable``; anything else is a 500
  ``internal`` whose message says nothing about the cause.
- ``/healthz`` (the process runs), ``/readyz`` (every ready check passes, else 503
  ``unavailable``), ``/metrics`` (Prometheus text of the given registry, plus request counts).
- ``Page``/``PageQuery`` for paginated lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Generic, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cyphonic.errors import (
    HTTP_STATUS,
    CyphonicError,
    InternalError,
    InvalidArgument,
    MalformedMessage,
    NotFound,
    OversizedMessage,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from cyphonic.log import get_logger

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "AdminAuth",
    "AdminServer",
    "Page",
    "PageQuery",
    "ReadyCheck",
    "create_admin_app",
    "error_body",
    "require_admin",
]

DEFAULT_MAX_BODY_BYTES = 256 * 1024
READY_CHECK_TIMEOUT_S = 5.0

ReadyCheck = Callable[[], Awaitable[None]]
T = TypeVar("T")

_bearer = HTTPBearer(auto_error=False, description="the service's admin token")


def error_body(error: CyphonicError, *, details: list[dict[str, Any]] | None = None) -> Any:
    """The JSON body of an error answer."""
    body: dict[str, Any] = {"code": error.code_name, "message": error.message}
    if details:
        body["details"] = details
    return {"error": body}


def _error_response(
    error: CyphonicError,
    *,
    status: int | None = None,
    details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    status = status or HTTP_STATUS.get(error.code, 500)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(error, details=details), status_code=status, headers=headers)


# --------------------------------------------------------------------------- auth


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """Demand the admin bearer token; returns the actor name for the audit trail."""
    expected: SecretStr | None = request.app.state.admin_token
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthenticated("admin bearer token required")
    if expected is None:
        raise PermissionDenied("no admin token is configured on this service")
    given = credentials.credentials.encode()
    if not hmac.compare_digest(given, expected.get_secret_value().encode()):
        raise Unauthenticated("admin bearer token is not valid")
    return "admin"


AdminAuth = Annotated[str, Depends(require_admin)]
"""Dependency alias: the route needs the admin token; the value is the actor ("admin")."""


# --------------------------------------------------------------------------- pagination


class Page(BaseModel, Generic[T]):
    """One page of a list: ``items`` from ``offset``, at most ``limit``, of ``total``."""

    items: list[T]
    total: int
    limit: int
    offset: int


class _PageParams(BaseModel):
    limit: int
    offset: int


def _page_params(
    limit: Annotated[int, Query(ge=1, le=500, description="page size")] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31, description="items to skip")] = 0,
) -> _PageParams:
    return _PageParams(limit=limit, offset=offset)


PageQuery = Annotated[_PageParams, Depends(_page_params)]
"""Dependency alias for ``?limit=&offset=`` (limit 1..500, default 100)."""


# --------------------------------------------------------------------------- middleware


class _BodyLimit:
    """Refuse request bodies above ``max_bytes`` with 413 ``oversized`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = OversizedMessage(f"request body larger than {self.max_bytes} bytes")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await _error_response(too_big)(scope, receive, send)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _error_response(too_big)(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    # An HTTPException so that FastAPI's body parsing re-raises it instead of calling the
    # body malformed; the handler below turns it into 413 "oversized".
    def __init__(self) -> None:
        super().__init__(status_code=413, detail="request body too large")


class _RequestMetrics:
    """Count requests and their latency by route template and status."""

    def __init__(self, app: ASGIApp, *, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.requests.labels(scope.get("method", ""), template, str(status)).inc()
            self.latency.labels(scope.get("method", ""), template).observe(
                time.perf_counter() - start
            )


# --------------------------------------------------------------------------- app factory


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Only where and what; pydantic's "input" could echo a secret (a token) back.
    return [
        {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))}
        for err in exc.errors()
    ]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CyphonicError)
    async def _cyphonic(_request: Request, exc: CyphonicError) -> JSONResponse:
        # Errors that know where the input went wrong (a policy document) say so.
        return _error_response(exc, details=getattr(exc, "details", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            return _error_response(MalformedMessage("request body is not valid JSON"), status=400)
        where = ".".join(details[0]["loc"]) if details else ""
        what = str(details[0]["msg"]) if details else "invalid request"
        return _error_response(
            InvalidArgument(f"{where}: {what}" if where else what),
            status=422,
            details=details,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error: CyphonicError
        if exc.status_code == 413:
            error = OversizedMessage("request body too large")
        elif exc.status_code == 404:
            error = NotFound("no such resource")
        elif exc.status_code == 401:
            error = Unauthenticated(str(exc.detail))
        elif exc.status_code == 403:
            error = PermissionDenied(str(exc.detail))
        elif exc.status_code < 500:
            error = InvalidArgument(str(exc.detail))
        else:
            error = InternalError("internal error")
        return _error_response(error, status=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        from cyphonic.registry.db import map_db_error

        mapped = map_db_error(exc)
        logger = get_logger("admin", path=request.url.path, error=type(exc).__name__)
        if isinstance(mapped, Unavailable):
            logger.warning("dependency_unavailable")
            return _error_response(mapped)
        logger.error("unhandled_error", exc_info=exc)
        return _error_response(InternalError("internal error"))


def create_admin_app(
    *,
    service: str,
    title: str,
    version: str = "1",
    admin_token: SecretStr | str | None,
    ready_checks: Sequence[ReadyCheck] = (),
    routers: Sequence[APIRouter] = (),
    metrics_registry: CollectorRegistry | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    lifespan: Any = None,
    description: str = "",
) -> FastAPI:
    """The admin FastAPI app of ``service`` with auth, errors, health, readiness and metrics.

    ``ready_checks`` are awaited by ``/readyz`` (each should raise, ideally ``Unavailable``,
    when its dependency is down). ``metrics_registry`` is what ``/metrics`` exposes; the
    request counters are added to it (a fresh registry is made when none is given).
    """
    if isinstance(admin_token, str):
        admin_token = SecretStr(admin_token)
    registry = metrics_registry if metrics_registry is not None else CollectorRegistry()
    app = FastAPI(title=title, version=version, description=description, lifespan=lifespan)
    app.state.admin_token = admin_token
    app.state.metrics_registry = registry
    app.state.ready_checks = list(ready_checks)
    _install_error_handlers(app)

    requests = Counter(
        f"cyphonic_{service}_http_requests",
        "Admin REST requests by route and status",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        f"cyphonic_{service}_http_request_seconds",
        "Admin REST request latency",
        ["method", "route"],
        registry=registry,
    )
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(_RequestMetrics, requests=requests, latency=latency)

    @app.get("/healthz", tags=["operations"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Every dependency is reachable",
        responses={503: {"description": "a dependency is down"}},
    )
    async def readyz() -> dict[str, str]:
        for check in app.state.ready_checks:
            try:
                await asyncio.wait_for(check(), READY_CHECK_TIMEOUT_S)
            except Unavailable:
                raise
            except TimeoutError as exc:
                raise Unavailable("readiness check timed out") from exc
            except CyphonicError:
                raise
            except Exception as exc:
                raise Unavailable(f"readiness check failed: {type(exc).__name__}") from exc
        return {"status": "ready"}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)
    return app


# --------------------------------------------------------------------------- serving


class _Server(uvicorn.Server):
    # The service's own loop handles SIGTERM/SIGINT for the QUIC endpoint and this server.
    def capture_signals(self) -> Any:
        return contextlib.nullcontext()


def _bind_tcp(host: str, port: int) -> socket.socket:
    # Made here rather than by uvicorn's Config.bind_socket(): that socket has protocol 0,
    # so asyncio does not set TCP_NODELAY on accepted connections, and every keep-alive
    # request then waits ~40 ms for a delayed ACK.
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class AdminServer:
    """Uvicorn serving an admin app inside the caller's event loop (no signal handling).

    The socket is bound in ``start()`` so that a busy port raises ``OSError`` there and
    port 0 gives an ephemeral port (``port`` tells which).
    """

    def __init__(self, app: FastAPI, *, host: str, port: int, log_level: str = "info") -> None:
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            log_level=log_level.lower(),
            lifespan="on",
            server_header=False,
        )
        self._server = _Server(self._config)
        self._socket: socket.socket | None = None
        self._port: int | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The TCP port actually bound (after ``start``)."""
        if self._port is None:
            raise RuntimeError("AdminServer not started")
        return self._port

    async def start(self) -> None:
        """Bind and start serving; returns once the server accepts connections."""
        self._socket = _bind_tcp(self._config.host, self._config.port)
        self._port = int(self._socket.getsockname()[1])
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError("admin REST server stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Finish in-flight requests and stop."""
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._task = None
            if self._socket is not None:
                self._socket.close()
