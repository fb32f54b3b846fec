"""What the frontend needs from dispatch: the ``Dispatcher`` protocol and its optional hooks, satisfied by the
routing in :mod:`pyllumnix.control_plane.frontend.routing` (LeaderDispatcher, BypassDispatcher, FallbackDispatcher)
and by the fakes in the tests.

Optional hooks, called when a dispatcher has them: ``release(instance_id)`` exactly once per successful ``dispatch``
(when the request ends, or at once when the instance refused it), so a bypass dispatcher's in-flight counts stay right;
``refused(instance_id)`` when the instance refused AddRequest, so the retry can avoid it; ``readiness()`` for the
readiness probe (whether a request could be dispatched now, and why not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from pyllumnix.protos.llumnix.v1 import common_pb2


class Placement(NamedTuple):
    instance_id: str
    grpc_address: str


class Readiness(NamedTuple):
    """Whether a dispatcher can place a request now, and why (or why not), for a readiness probe.

    ``reason`` is answered to anyone (``/health`` needs no key), so it names no address or error text; ``detail``
    (the errors' own words, which name endpoints) is only logged."""

    ready: bool
    reason: str
    detail: str = ""


def public_cause(exc: BaseException) -> str:
    """An error's kind for a public reason: its gRPC status name or its type, never its text (which names hosts)."""
    code = getattr(exc, "code", "")
    return code if isinstance(code, str) and code else type(exc).__name__


@runtime_checkable
class Dispatcher(Protocol):
    async def dispatch(
        self, request_id: str, priority: int, num_prompt_tokens: int, max_tokens: int
    ) -> tuple[str, str]:
        """(instance_id, grpc_address) for a new request; raises when no instance can take it."""
        ...


@runtime_checkable
class Releasing(Protocol):
    def release(self, instance_id: str) -> None: ...


@runtime_checkable
class RefusalAware(Protocol):
    def refused(self, instance_id: str) -> None: ...


@runtime_checkable
class ReadinessAware(Protocol):
    async def readiness(self) -> Readiness: ...


class RegistrySource(Protocol):
    """The registry's current instances (entries of dead instances are gone once their lease expires)."""

    async def instances(self) -> Sequence[common_pb2.InstanceInfo]: ...


class RegistryResolver:
    """Looks up a migration destination's gRPC address in the registry (for aborting a migrated request)."""

    def __init__(self, source: RegistrySource) -> None:
        self.source = source

    async def address_of(self, instance_id: str) -> str | None:
        for info in await self.source.instances():
            if info.instance_id == instance_id and info.grpc_address:
                return info.grpc_address
        return None
