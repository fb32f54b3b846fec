"""One gRPC channel per peer address, reused across requests (channels are expensive; calls on them are cheap), and
beside it, with ``framed``, the llumlet's framed call listener (``infra.framed_calls``) for AddRequest once a gRPC
reply named it.

A channel whose peer went away retries its connection with gRPC's exponential backoff (by default from 1 s up to
120 s), failing every call at once with UNAVAILABLE meanwhile: a llumlet restarted on the same port would be refused
for as long as the backoff lasts. So the backoff is kept short (RECONNECT_BACKOFF_MS), and a caller that got
UNAVAILABLE ``discard``s the channel: the next call dials afresh. A discarded channel is closed with a grace period,
so calls still in flight on it finish.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from pyllumnix.infra.framed import rpc_error
from pyllumnix.infra.framed_calls import RETRY_AFTER_S, CallRoute
from pyllumnix.infra.security.runtime import open_channel, open_framed_calls
from pyllumnix.protos.llumnix.v1 import llumlet_pb2, llumlet_pb2_grpc

log = logging.getLogger(__name__)

ADD_REQUEST_METHOD = "/llumnix.v1.LlumletService/AddRequest"
# The longest a framed connection attempt may hold an AddRequest (then it goes over gRPC).
FRAMED_CONNECT_S = 0.5

# (initial, max) reconnect backoff of the pool's channels, in ms.
RECONNECT_BACKOFF_MS = (100, 1000)
# Seconds a discarded channel stays open for the calls still on it.
DISCARD_GRACE_S = 5.0

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
    ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
)


def _ambiguous(details: str) -> grpc.aio.AioRpcError:
    """A framed AddRequest whose outcome is unknown (sent, then no answer): the caller handles it as gRPC's
    DEADLINE_EXCEEDED (the instance may still add the request)."""
    return rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, details)


class ChannelPool:
    def __init__(self, *, framed: bool = False) -> None:
        self.framed = framed
        # llumlet gRPC address -> its framed call listener (``AddRequestResponse.call_address``).
        self._routes: dict[str, CallRoute] = {}
        self.framed_adds = 0  # AddRequest calls sent, by transport
        self.grpc_adds = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Discarded channels still closing (with a grace period for their calls), until they are closed.
        self._retired: dict[grpc.aio.Channel, asyncio.Task[None]] = {}
        self.discarded = 0
        # address -> (its channel, a llumlet stub on it): a stub builds a callable per method of the service, which
        # costs more than the call it is made for (AddRequest once per request).
        self._llumlet_stubs: dict[str, tuple[grpc.aio.Channel, llumlet_pb2_grpc.LlumletServiceStub]] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, CHANNEL_OPTIONS, peer="llumlet")
        return channel

    def llumlet(self, address: str) -> llumlet_pb2_grpc.LlumletServiceStub:
        """A stub on ``channel(address)``, the same object while that channel lives."""
        channel = self.channel(address)
        cached = self._llumlet_stubs.get(address)
        if cached is not None and cached[0] is channel:
            return cached[1]
        stub = llumlet_pb2_grpc.LlumletServiceStub(channel)
        self._llumlet_stubs[address] = (channel, stub)
        return stub

    async def add_request(self, address: str, add: llumlet_pb2.AddRequestRequest, timeout: float) -> None:
        """AddRequest at the llumlet at ``address``: over its framed listener once a gRPC reply named it, else over
        gRPC. Raises ``AioRpcError`` as gRPC does, a framed call whose outcome is unknown (the connection broke after
        the request went out, no answer in time) as DEADLINE_EXCEEDED; when no framed connection can be had the
        request goes over gRPC in the time left (nothing went out) and this llumlet's adds stay there for a while."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        route = self._routes.get(address)
        if route is not None and route.address:
            try:
                channel = await route.channel(min(FRAMED_CONNECT_S, timeout / 2))
            except (OSError, TimeoutError) as exc:
                log.info("framed AddRequest at %s: no connection (%r); over gRPC for %gs", address, exc, RETRY_AFTER_S)
                route.unreachable()
            else:
                self.framed_adds += 1
                try:
                    left = max(deadline - loop.time(), 0.001)  # (the connection may have taken some)
                    await channel.call(ADD_REQUEST_METHOD, add, llumlet_pb2.AddRequestResponse, left)
                except TimeoutError:
                    raise _ambiguous("no answer to the framed AddRequest in time") from None
                except OSError as exc:  # the connection broke with the request on its way or there
                    route.broken(channel)
                    raise _ambiguous(f"the framed AddRequest's connection broke: {exc!r}") from None
                return
        self.grpc_adds += 1
        reply = await self.llumlet(address).AddRequest(add, timeout=max(deadline - loop.time(), 0.001))
        if self.framed:
            if route is None:
                route = self._routes[address] = CallRoute(
                    lambda target, left: open_framed_calls(target, peer="llumlet", timeout=left)
                )
            route.learn(reply.call_address)

    def discard(self, address: str, channel: grpc.aio.Channel | None = None) -> None:
        """Forgets the channel to ``address`` (only if it is still ``channel``, when given: one that failed, not a
        fresh one another caller opened since) and closes it once its calls had DISCARD_GRACE_S to finish."""
        current = self._channels.get(address)
        if current is None or (channel is not None and current is not channel):
            return
        del self._channels[address]
        self._llumlet_stubs.pop(address, None)
        self.discarded += 1
        task = asyncio.get_running_loop().create_task(current.close(grace=DISCARD_GRACE_S))
        self._retired[current] = task
        task.add_done_callback(lambda _: self._retired.pop(current, None))

    async def close(self) -> None:
        """Closes every channel now, discarded ones too (their grace ends with the pool)."""
        channels, self._channels = self._channels, {}
        retired, self._retired = self._retired, {}
        for route in self._routes.values():
            route.drop()
        self._routes.clear()
        self._llumlet_stubs.clear()
        for channel in [*channels.values(), *retired]:
            await channel.close()
        for task in retired.values():
            task.cancel()
        await asyncio.gather(*retired.values(), return_exceptions=True)
