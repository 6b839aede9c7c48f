"""The CYPHONIC error tree. Every error that can cross the wire has an ErrorCode.

    CyphonicError
    +-- ProtocolError              the peer sent something this side cannot accept
    |   +-- MalformedMessage       ERROR_CODE_MALFORMED
    |   +-- OversizedMessage       ERROR_CODE_OVERSIZED
    |   +-- UnknownMessage         ERROR_CODE_UNKNOWN_MESSAGE
    |   +-- UnexpectedMessage      ERROR_CODE_UNEXPECTED_MESSAGE
    |   +-- UnsupportedVersion     ERROR_CODE_UNSUPPORTED_VERSION
    +-- InvalidArgument            ERROR_CODE_INVALID_ARGUMENT
    +-- AuthError
    |   +-- Unauthenticated        ERROR_CODE_UNAUTHENTICATED (no, foreign or bad certificate)
    |   +-- PermissionDenied       ERROR_CODE_PERMISSION_DENIED
    |   |   +-- PolicyDenied       ERROR_CODE_POLICY_DENIED (the access policy forbids the pair)
    |   +-- Revoked                ERROR_CODE_REVOKED
    |   +-- Expired                ERROR_CODE_EXPIRED
    |   +-- TokenInvalid           ERROR_CODE_TOKEN_INVALID
    +-- NotFound                   ERROR_CODE_NOT_FOUND
    +-- PeerOffline                ERROR_CODE_PEER_OFFLINE
    +-- AlreadyExists              ERROR_CODE_ALREADY_EXISTS
    +-- Exhausted                  ERROR_CODE_EXHAUSTED
    +-- Unavailable                ERROR_CODE_UNAVAILABLE (a dependency is down; retry)
    |   +-- Overloaded             ERROR_CODE_UNAVAILABLE with retry_after_ms (admission
    |                              control: come back after retry_after_s)
    +-- Timeout                    ERROR_CODE_TIMEOUT
    +-- InternalError              ERROR_CODE_INTERNAL
    +-- RemoteError                an Error message received from the peer (keeps its code)

Foreign exceptions are mapped to the most specific of these at the boundary with
``raise ... from exc``; the admin REST layer maps codes to HTTP status codes in one place
(``HTTP_STATUS``), the signalling layer sends ``to_wire()``.
"""

from __future__ import annotations

from typing import ClassVar

from cyphonic.v1 import signalling_pb2 as pb


class CyphonicError(Exception):
    """Base of every CYPHONIC error; ``code`` is the wire code."""

    code: ClassVar[int] = pb.ERROR_CODE_INTERNAL

    def __init__(self, message: str = "") -> None:
        super().__init__(message or type(self).__name__)
        self.message = message or type(self).__name__

    def to_wire(self) -> pb.Error:
        return pb.Error(code=self.code, message=self.message)  # type: ignore[arg-type]

    @property
    def code_name(self) -> str:
        """Short lower-case name of the code, e.g. ``token_invalid``."""
        return pb.ErrorCode.Name(self.code).removeprefix("ERROR_CODE_").lower()  # type: ignore[arg-type]


class ProtocolError(CyphonicError):
    code = pb.ERROR_CODE_MALFORMED


class MalformedMessage(ProtocolError):
    code = pb.ERROR_CODE_MALFORMED


class OversizedMessage(ProtocolError):
    code = pb.ERROR_CODE_OVERSIZED


class UnknownMessage(ProtocolError):
    code = pb.ERROR_CODE_UNKNOWN_MESSAGE


class UnexpectedMessage(ProtocolError):
    code = pb.ERROR_CODE_UNEXPECTED_MESSAGE


class UnsupportedVersion(ProtocolError):
    code = pb.ERROR_CODE_UNSUPPORTED_VERSION


class InvalidArgument(CyphonicError):
    code = pb.ERROR_CODE_INVALID_ARGUMENT


class AuthError(CyphonicError):
    code = pb.ERROR_CODE_UNAUTHENTICATED


class Unauthenticated(AuthError):
    code = pb.ERROR_CODE_UNAUTHENTICATED


class PermissionDenied(AuthError):
    code = pb.ERROR_CODE_PERMISSION_DENIED


class PolicyDenied(PermissionDenied):
    """The access policy allows no traffic between the two nodes."""

    code = pb.ERROR_CODE_POLICY_DENIED


class Revoked(AuthError):
    code = pb.ERROR_CODE_REVOKED


class Expired(AuthError):
    code = pb.ERROR_CODE_EXPIRED


class TokenInvalid(AuthError):
    code = pb.ERROR_CODE_TOKEN_INVALID


class NotFound(CyphonicError):
    code = pb.ERROR_CODE_NOT_FOUND


class PeerOffline(CyphonicError):
    code = pb.ERROR_CODE_PEER_OFFLINE


class AlreadyExists(CyphonicError):
    code = pb.ERROR_CODE_ALREADY_EXISTS


class Exhausted(CyphonicError):
    code = pb.ERROR_CODE_EXHAUSTED


class Unavailable(CyphonicError):
    code = pb.ERROR_CODE_UNAVAILABLE


class Overloaded(Unavailable):
    """The service refuses work for now (admission control); retry after ``retry_after_s``.

    On the wire: ``ERROR_CODE_UNAVAILABLE`` with ``retry_after_ms`` set.
    """

    def __init__(self, message: str = "", *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = max(0.001, retry_after_s)

    def to_wire(self) -> pb.Error:
        return pb.Error(
            code=self.code,
            message=self.message,
            retry_after_ms=max(1, round(self.retry_after_s * 1000)),
        )


class Timeout(CyphonicError):
    code = pb.ERROR_CODE_TIMEOUT


class InternalError(CyphonicError):
    code = pb.ERROR_CODE_INTERNAL


class RemoteError(CyphonicError):
    """An ``Error`` the peer sent; ``code`` is the peer's code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.remote_code = code

    def to_wire(self) -> pb.Error:
        return pb.Error(code=self.remote_code, message=self.message)  # type: ignore[arg-type]

    @property
    def code_name(self) -> str:
        try:
            name = pb.ErrorCode.Name(self.remote_code)  # type: ignore[arg-type]
        except ValueError:
            return f"unknown_{self.remote_code}"
        return name.removeprefix("ERROR_CODE_").lower()


_BY_CODE: dict[int, type[CyphonicError]] = {}
for _cls in (
    MalformedMessage,
    OversizedMessage,
    UnknownMessage,
    UnexpectedMessage,
    UnsupportedVersion,
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    PolicyDenied,
    Revoked,
    Expired,
    TokenInvalid,
    NotFound,
    PeerOffline,
    AlreadyExists,
    Exhausted,
    Unavailable,
    Timeout,
    InternalError,
):
    _BY_CODE[_cls.code] = _cls


def from_wire(error: pb.Error) -> CyphonicError:
    """The local exception for an ``Error`` received from a peer."""
    if error.code == pb.ERROR_CODE_UNAVAILABLE and error.retry_after_ms:
        return Overloaded(error.message, retry_after_s=error.retry_after_ms / 1000)
    cls = _BY_CODE.get(error.code)
    if cls is None:
        return RemoteError(error.code, error.message)
    return cls(error.message)


# HTTP status for each code, used by every admin REST API.
HTTP_STATUS: dict[int, int] = {
    pb.ERROR_CODE_MALFORMED: 400,
    pb.ERROR_CODE_OVERSIZED: 413,
    pb.ERROR_CODE_UNKNOWN_MESSAGE: 400,
    pb.ERROR_CODE_UNEXPECTED_MESSAGE: 409,
    pb.ERROR_CODE_UNSUPPORTED_VERSION: 400,
    pb.ERROR_CODE_INVALID_ARGUMENT: 422,
    pb.ERROR_CODE_UNAUTHENTICATED: 401,
    pb.ERROR_CODE_PERMISSION_DENIED: 403,
    pb.ERROR_CODE_REVOKED: 403,
    pb.ERROR_CODE_EXPIRED: 403,
    pb.ERROR_CODE_TOKEN_INVALID: 403,
    pb.ERROR_CODE_NOT_FOUND: 404,
    pb.ERROR_CODE_PEER_OFFLINE: 409,
    pb.ERROR_CODE_ALREADY_EXISTS: 409,
    pb.ERROR_CODE_EXHAUSTED: 507,
    pb.ERROR_CODE_UNAVAILABLE: 503,
    pb.ERROR_CODE_TIMEOUT: 504,
    pb.ERROR_CODE_INTERNAL: 500,
    pb.ERROR_CODE_POLICY_DENIED: 403,
}
