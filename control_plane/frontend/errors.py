"""Typed frontend errors, so the gRPC and HTTP surfaces map one failure to the same status everywhere."""

from __future__ import annotations

import grpc

_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INTERNAL: 500,
}

_OPENAI_TYPE: dict[int, str] = {
    400: "invalid_request_error",
    404: "not_found_error",
    409: "invalid_request_error",
    503: "service_unavailable",
    500: "server_error",
}


class FrontendError(Exception):
    """A request-level failure with the gRPC code it maps to (``param`` names the offending field, if any)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 500)

    @property
    def openai_type(self) -> str:
        return _OPENAI_TYPE.get(self.http_status, "server_error")


class InvalidRequestError(FrontendError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFoundError(FrontendError):
    code = grpc.StatusCode.NOT_FOUND


class RequestNotFoundError(FrontendError):
    code = grpc.StatusCode.NOT_FOUND


class DuplicateRequestError(FrontendError):
    code = grpc.StatusCode.ALREADY_EXISTS


class NoCapacityError(FrontendError):
    """No instance can take the request now (no leader and no bypass candidate, or every candidate refused)."""

    code = grpc.StatusCode.UNAVAILABLE


class RequestFailedError(FrontendError):
    """The request started but failed (instance lost, engine error)."""

    code = grpc.StatusCode.INTERNAL
