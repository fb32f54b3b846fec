"""Python client library of a Llumnix cluster: generation and the operator API (channels, retries, errors)."""

from pyllumnix.clients.channel import CallKind, EndpointPool, TlsConfig
from pyllumnix.clients.client import (
    AsyncLlumnixClient,
    GenerationChunk,
    GenerationResult,
    LlumnixClient,
    Usage,
)
from pyllumnix.clients.errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LlumnixError,
    NoLeaderError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "AsyncLlumnixClient",
    "CallKind",
    "CancelledError",
    "DeadlineExceededError",
    "EndpointPool",
    "FailedPreconditionError",
    "GenerationChunk",
    "GenerationResult",
    "InternalError",
    "InvalidArgumentError",
    "LlumnixClient",
    "LlumnixError",
    "NoLeaderError",
    "NotFoundError",
    "ResourceExhaustedError",
    "TlsConfig",
    "UnavailableError",
    "Usage",
]
