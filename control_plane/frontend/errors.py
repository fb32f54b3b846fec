"""Typed frontend errors, so the gRPC and HTTP surfaces map one failure to the same status everywhere.

``retry_after`` (seconds) is set on errors a client should retry later (overload, no capacity): HTTP answers carry it
as ``Retry-After``, gRPC ones as ``retry-after`` trailing metadata.
"""

from __future__ import annotations

import grpc

_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
}

_OPENAI_TYPE: dict[int, str] = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
    500: "server_error",
}

RETRY_AFTER_METADATA = "retry-after"


class FrontendError(Exception):
    """A request-level failure with the gRPC code it maps to (``param`` names the offending field, if any)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # Overrides the HTTP status derived from ``code`` (413 has no gRPC code of its own).
    status: int | None = None
    retry_after: int | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def http_status(self) -> int:
        return self.status or _HTTP_STATUS.get(self.code, 500)

    @property
    def openai_type(self) -> str:
        return _OPENAI_TYPE.get(self.http_status, "server_error")

    @property
    def openai_code(self) -> str:
        name: str = self.code.name
        return name.lower()

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((RETRY_AFTER_METADATA, str(self.retry_after)),) if self.retry_after is not None else ()


class InvalidRequestError(FrontendError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class PayloadTooLargeError(InvalidRequestError):
    """A body or prompt over the configured size, refused before any parsing or tokenising (HTTP 413)."""

    status = 413

    @property
    def openai_code(self) -> str:
        return "request_too_large"


class ModelNotFoundError(FrontendError):
    code = grpc.StatusCode.NOT_FOUND

    @property
    def openai_code(self) -> str:
        return "model_not_found"


class PermissionDeniedError(FrontendError):
    """The caller's API key may not act on this request (it belongs to another key; HTTP 403)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class RequestNotFoundError(FrontendError):
    code = grpc.StatusCode.NOT_FOUND


class DuplicateRequestError(FrontendError):
    code = grpc.StatusCode.ALREADY_EXISTS


class OverloadedError(FrontendError):
    """This frontend, or every instance tried, has no room for another request now (HTTP 429)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after = 1

    @property
    def openai_code(self) -> str:
        return "rate_limit_exceeded"


class NoCapacityError(FrontendError):
    """No instance can take the request now (no leader and no bypass candidate, the registry unreadable, or every
    candidate refused)."""

    code = grpc.StatusCode.UNAVAILABLE
    retry_after = 2


class RequestTimeoutError(FrontendError):
    """The request got no output in time (idle timeout or deadline) and was aborted."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class RequestFailedError(FrontendError):
    """The request started but failed (instance lost, engine error)."""

    code = grpc.StatusCode.INTERNAL


class BodyTimeoutError(FrontendError):
    """An HTTP request body that did not arrive in time (HTTP 408; the connection is then closed)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    status = 408

    @property
    def openai_code(self) -> str:
        return "request_timeout"
