"""The AS and TRS admin REST APIs as the NMS calls them (for the console).

    as_api = AdminApi("as", settings.as_url, token, timeout_s=5)
    await as_api.post("/v1/nodes/alice/revoke", {"reason": "lost laptop"})

One short-lived httpx client per call: the console asks rarely, and nothing is left open
when an upstream goes away. Errors are mapped to this project's own, with the upstream's
message when it sent one of ours:

    httpx.HTTPError (refused, timeout, DNS)  -> Unavailable  "... admin API at ... is unreachable"
    401 / 403 from the upstream              -> Unavailable  (the NMS's token is wrong: an
                                               operator's console must not read it as theirs)
    404                                      -> NotFound
    409                                      -> AlreadyExists
    other 4xx                                -> InvalidArgument
    5xx, or an answer that is not JSON       -> Unavailable

The token is sent as a bearer header and never logged; URLs are logged without user info.
"""

from __future__ import annotations

from typing import Any

import httpx
from cyphonic.config import hide_password
from cyphonic.errors import AlreadyExists, CyphonicError, InvalidArgument, NotFound, Unavailable
from pydantic import SecretStr

DEFAULT_TIMEOUT_S = 5.0
MAX_MESSAGE = 300


class AdminApi:
    """One service's admin REST API (``service`` names it in errors: "AS", "TRS")."""

    def __init__(
        self,
        service: str,
        base_url: str,
        token: SecretStr | None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.service = service
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        self._transport = transport

    @property
    def shown_url(self) -> str:
        """The base URL fit for a log line or an error message."""
        return hide_password(self.base_url) or ""

    async def get(self, path: str) -> Any:
        """GET ``path``; the JSON answer."""
        return await self._call("GET", path, None)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST ``body`` as JSON to ``path``; the JSON answer."""
        return await self._call("POST", path, body)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        headers = {"Accept": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        try:
            async with httpx.AsyncClient(
                base_url=self.base_url, timeout=self._timeout_s, transport=self._transport
            ) as client:
                response = await client.request(method, path, headers=headers, json=body)
        except httpx.HTTPError as exc:
            raise Unavailable(
                f"the {self.service} admin API at {self.shown_url} is unreachable "
                f"({type(exc).__name__})"
            ) from exc
        if response.is_success:
            try:
                return response.json()
            except ValueError as exc:
                raise Unavailable(f"the {self.service} admin API answered no JSON") from exc
        raise self._error(response)

    def _error(self, response: httpx.Response) -> CyphonicError:
        status = response.status_code
        message = _upstream_message(response)
        if status in (401, 403):
            return Unavailable(
                f"the {self.service} refused this NMS's admin token "
                f"(check the NMS's {self.service.lower()}_admin_token)"
            )
        if status == 404:
            return NotFound(message or f"not found at the {self.service}")
        if status == 409:
            return AlreadyExists(message or "already exists")
        if 400 <= status < 500:
            return InvalidArgument(message or f"the {self.service} refused the request")
        return Unavailable(
            f"the {self.service} admin API failed (HTTP {status})"
            + (f": {message}" if message else "")
        )


def _upstream_message(response: httpx.Response) -> str:
    """The ``error.message`` of one of our services' JSON errors, shortened; else ""."""
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return str(message)[:MAX_MESSAGE] if message else ""
