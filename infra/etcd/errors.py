"""Errors raised by the etcd layer; callers catch these, never grpc's own exceptions."""

from __future__ import annotations

from collections.abc import Sequence


class EtcdError(Exception):
    """Base of every error of the etcd layer."""


class EtcdClosedError(EtcdError):
    """The client was closed; nothing more can be sent through it."""


class EtcdUnavailableError(EtcdError):
    """No endpoint answered within the retry budget; the message names every endpoint tried."""

    def __init__(self, what: str, endpoints: Sequence[str], elapsed: float, last_error: str) -> None:
        self.endpoints = list(endpoints)
        self.elapsed = elapsed
        super().__init__(
            f"etcd unavailable: {what} failed on every endpoint [{', '.join(self.endpoints)}] "
            f"for {elapsed:.2f}s (last error: {last_error})"
        )


class EtcdRequestError(EtcdError):
    """etcd answered with a non-transient error (bad request, lease not found, compacted revision, ...)."""

    def __init__(self, what: str, code: str, details: str) -> None:
        self.code = code
        self.details = details
        super().__init__(f"etcd {what} failed: {code}: {details}")


class EtcdLeaseNotFoundError(EtcdRequestError):
    """The lease does not exist (expired or revoked); keys cannot be bound to it any more."""


class EtcdCompactedError(EtcdRequestError):
    """The requested revision was compacted away."""


class ConfigConflictError(EtcdError):
    """A compare-and-swap on the config key lost: someone else wrote it first."""

    def __init__(self, key: str, expected_revision: int, current_revision: int) -> None:
        self.expected_revision = expected_revision
        self.current_revision = current_revision
        super().__init__(
            f"config {key!r} changed concurrently: expected revision {expected_revision}, found {current_revision}"
        )


class UndecodableValueError(EtcdError):
    """A stored value does not parse as the message type expected at its key (written by something else)."""

    def __init__(self, key: str, revision: int, type_name: str, error: str) -> None:
        self.key = key
        self.revision = revision
        super().__init__(f"value of {key!r} at revision {revision} is not a valid {type_name}: {error}")
