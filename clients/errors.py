"""Exceptions of the client library: one class per gRPC status a caller may want to handle, never grpc's own errors.

Callers catch :class:`LlumnixError` (or a subclass) and never need to import grpc; the CLI maps these to exit codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc


class LlumnixError(Exception):
    """Base of every client error; ``code`` is the gRPC status name ("NOT_FOUND", ...) or "" for local errors."""

    code: str = ""

    def __init__(self, message: str, *, details: str = "", endpoint: str = "") -> None:
        super().__init__(message)
        self.details = details or message
        self.endpoint = endpoint


class InvalidArgumentError(LlumnixError):
    code = "INVALID_ARGUMENT"


class NotFoundError(LlumnixError):
    code = "NOT_FOUND"


class AlreadyExistsError(LlumnixError):
    code = "ALREADY_EXISTS"


class FailedPreconditionError(LlumnixError):
    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(LlumnixError):
    code = "RESOURCE_EXHAUSTED"


class AbortedError(LlumnixError):
    """E.g. a config write whose expected revision is stale."""

    code = "ABORTED"


class CancelledError(LlumnixError):
    code = "CANCELLED"


class DeadlineExceededError(LlumnixError):
    """The call's deadline passed; a write may or may not have been applied (``may_have_started``)."""

    code = "DEADLINE_EXCEEDED"

    def __init__(self, message: str, *, details: str = "", endpoint: str = "", may_have_started: bool = True) -> None:
        super().__init__(message, details=details, endpoint=endpoint)
        self.may_have_started = may_have_started


class UnavailableError(LlumnixError):
    """No endpoint could serve the call; ``endpoints`` lists every address tried.

    ``may_have_started`` is True when a non-retried call (a write, a Generate) was sent before the connection broke:
    the server may have acted on it, so the library did not re-send it.
    """

    code = "UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        endpoints: Sequence[str] = (),
        details: str = "",
        endpoint: str = "",
        may_have_started: bool = False,
    ) -> None:
        super().__init__(message, details=details, endpoint=endpoint)
        self.endpoints = list(endpoints)
        self.may_have_started = may_have_started


class NoLeaderError(UnavailableError):
    """Every scheduler replica reached refused the call as a follower and none named a reachable leader."""


class InternalError(LlumnixError):
    code = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[LlumnixError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def from_rpc_error(
    exc: grpc.aio.AioRpcError, *, endpoint: str = "", endpoints: Sequence[str] = (), may_have_started: bool = True
) -> LlumnixError:
    """Maps a gRPC error to the library's exception (the server's details become the message)."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or ""
    where = f" ({endpoint})" if endpoint else ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return UnavailableError(
            f"unavailable{where}: {details}",
            endpoints=endpoints or ([endpoint] if endpoint else []),
            details=details,
            endpoint=endpoint,
            may_have_started=may_have_started,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(
            f"deadline exceeded{where}: {details}",
            details=details,
            endpoint=endpoint,
            may_have_started=may_have_started,
        )
    cls = _BY_CODE.get(code, LlumnixError)
    err = cls(details or code.name, details=details, endpoint=endpoint)
    if cls is LlumnixError:
        err.code = code.name
    return err
