"""The OutputSinkService servicer: llumlets push outputs here; they go to the requests this frontend tracks.

Who may push what (checked per output, from the caller's certificate identity, on a TLS connection):

- a llumlet pushes as itself (``PushOutputsRequest.instance_id`` is its own id; over its long-lived
  ``StreamOutputs`` stream, or the unary ``PushOutputs`` kept for the scheduler and older llumlets) and, for each
  request this frontend tracks, with the capability token the request's current holder was given
  (``HolderLedger``). An output with a forged, missing or foreign token is refused, and so is one with a genuine but
  outdated token (the request migrated on, or ended): that output is dropped and its id listed as unknown, so the
  llumlet stops that request alone (a bad token is logged and counted in ``refused_outputs``; refusing the whole push
  made an honest llumlet handed one bad token, e.g. by a compromised peer's migration, abort everything it held). A
  push as another instance (``instance_id`` not the caller's) is refused whole (PERMISSION_DENIED);
- only the current scheduler leader (its replica id, read from the etcd election, is the caller's certificate id)
  pushes, and only an "instance lost" notice: token-less ERROR finishes for requests that instance holds, the list
  possibly empty. The notice is about the instance: every request this frontend's ledger has that instance as the
  current holder of ends with the lost-instance error, listed or not (the leader's last load snapshot may predate a
  request's arrival there). Any other scheduler certificate (a follower, a deposed leader) is refused
  PERMISSION_DENIED, as is every scheduler push on a sink that cannot tell the leader. A notice the leader marks
  listed-only (``LOST_SCOPE_METADATA_KEY`` = ``LOST_SCOPE_LISTED``: a new process re-registered under the id, and
  requests placed on it are held by the same id) ends only the listed requests that id still holds; one marked
  ``LOST_SCOPE_INSTANCE`` ends every request the instance holds on a plaintext connection too;
- nobody else (the role table says the same; this holds also where no RoleInterceptor is installed).

A plaintext connection exists only on a frontend started with ``--insecure`` (a TLS server has no plaintext port):
there the checks are skipped with one warning, as there is no identity to check, but for one: an output carrying an
outdated grant of this frontend (an earlier request with a reused id) is dropped as stale, so a reused id gets only
its own outputs there too. ``max_tokens`` is enforced for every pusher by the tracked request itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from pyllumnix.control_plane.frontend.requests import RequestTracker, StaleCapabilityError
from pyllumnix.infra.framed import (
    DEFAULT_MAX_BYTES,
    FramedAbort,
    FramedContext,
    FramedServerStream,
    framed_caller,
    serve_connection,
)
from pyllumnix.infra.security.authz import authenticated_caller
from pyllumnix.infra.security.ca import Identity
from pyllumnix.infra.security.tokens import TokenError
from pyllumnix.protos.llumnix.v1 import admin_pb2, common_pb2, frontend_pb2, frontend_pb2_grpc

if TYPE_CHECKING:
    from pyllumnix.infra.etcd.client import EtcdClient
    from pyllumnix.infra.etcd.keys import KeyLayout

log = logging.getLogger(__name__)

SERVICE_NAME = "llumnix.v1.OutputSinkService"
# The framed push stream is StreamOutputs in other frames: the role table's rule for that method decides its callers.
FRAMED_METHOD = f"/{SERVICE_NAME}/StreamOutputs"
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


# Call metadata on the leader's lost-instance notice: its scope. "listed": end only the listed requests (the id lives
# on in a new process); "instance": end every request the instance holds. A leader's notice without it (an older
# scheduler) counts as "instance" on a TLS connection; a plaintext push ends unlisted requests only when marked
# "instance" (a llumlet's own pushes carry no scope).
LOST_SCOPE_METADATA_KEY = "llumnix-lost-scope"
LOST_SCOPE_LISTED = "listed"
LOST_SCOPE_INSTANCE = "instance"


def lost_scope(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The scope a lost-instance notice's metadata names, None when it names none."""
    for key, value in metadata or ():
        if key == LOST_SCOPE_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return None


def _holder_error_notice(out: common_pb2.RequestOutput) -> bool:
    """A token-less final ERROR/ABORT without tokens (what a llumlet's pusher queues when it gives up)."""
    ended = out.finish_reason in (common_pb2.FINISH_REASON_ERROR, common_pb2.FINISH_REASON_ABORT)
    return out.finished and ended and not out.token_ids


# Who leads the schedulers now: the leader's replica id (None: no leader); raises when it cannot be told.
LeaderLookup: TypeAlias = Callable[[], Awaitable[str | None]]


class ElectionLeader:
    """The scheduler leader as the etcd election names it (the replica id its key's value proclaims), read on each
    call: lost-instance notices are rare, and a cached answer would let a just-deposed leader through."""

    def __init__(self, client: EtcdClient, layout: KeyLayout) -> None:
        from pyllumnix.infra.etcd.election import Election

        self.election = Election(client, layout.election_prefix())

    async def __call__(self) -> str | None:
        info = await self.election.leader()
        if info is None:
            return None
        replica = admin_pb2.SchedulerReplica()
        replica.ParseFromString(info.value)
        return replica.replica_id or None


def lost_error(instance_id: str) -> str:
    """What a request held by a lost instance ends with when the leader's notice did not list it."""
    return f"instance {instance_id} was lost; the request failed"


# Pushers whose last applied batch a sink remembers (a llumlet that restarted often leaves old entries behind).
MAX_REMEMBERED_PUSHERS = 4096


async def serve_output_stream(
    request_iterator: AsyncIterator[frontend_pb2.StreamOutputsRequest],
    apply: Callable[[frontend_pb2.PushOutputsRequest], Awaitable[Sequence[str]]],
    applied: dict[tuple[str, int], int],
    pusher: str | None = None,
) -> AsyncIterator[frontend_pb2.StreamOutputsResponse]:
    """The sink side of ``StreamOutputs`` (the frontend's and the test sinks'): applies batches in order with
    ``apply`` (which returns the request ids the pusher should stop), answers when a batch asks or named such
    requests, and answers a new stream's question (``seq`` 0) with the last batch of that pusher applied, which
    ``applied`` remembers across its streams. ``pusher``: the caller's verified instance id (None: plaintext, the
    batch's own instance_id is taken)."""
    async for message in request_iterator:
        key = (pusher if pusher is not None else message.batch.instance_id, message.pusher_id)
        if message.seq == 0:
            yield frontend_pb2.StreamOutputsResponse(acked_seq=applied.get(key, 0))
            continue
        unknown = await apply(message.batch)
        if key not in applied and len(applied) >= MAX_REMEMBERED_PUSHERS:
            del applied[next(iter(applied))]
        applied[key] = message.seq
        if message.ack_requested or unknown:
            yield frontend_pb2.StreamOutputsResponse(acked_seq=message.seq, unknown_request_ids=unknown)


class OutputSinkServicer(frontend_pb2_grpc.OutputSinkServiceServicer):
    """Unknown request ids go back to the pusher so it aborts them (the client left, or another frontend owns them)."""

    def __init__(self, tracker: RequestTracker, scheduler_leader: LeaderLookup | None = None) -> None:
        self.tracker = tracker
        # Tells the current scheduler leader, whose lost-instance notices alone are taken (None: none are).
        self.scheduler_leader = scheduler_leader
        self.pushes = 0  # batches received (unary pushes and stream messages)
        self.streams = 0  # push streams opened
        # (pusher instance, pusher id) -> the last batch of its streams applied (what a new stream of it asks for)
        self.applied: dict[tuple[str, int], int] = {}
        # Outputs dropped because their capability was outdated, and pushes refused outright.
        self.stale_outputs = 0
        self.refused_pushes = 0
        # Outputs refused one by one: a llumlet's output whose token does not let it push for that request.
        self.refused_outputs = 0
        self._warned_insecure = False
        # The open push streams' handler tasks, and whether the frontend is stopping (see ``end_streams``).
        self._stream_tasks: set[asyncio.Task[Any]] = set()
        # Of those, the ones whose reply grpc is writing (see ``StreamOutputs``): not cancelled, they end after it.
        self._writing: set[asyncio.Task[Any]] = set()
        self._ending = False
        # The framed push stream's address (``DescribeSink``; empty: not offered) and its peers' trust domain (None:
        # a plaintext listener, as on an --insecure frontend).
        self.stream_address = ""
        self.stream_cluster: str | None = None
        self.max_frame_bytes = DEFAULT_MAX_BYTES

    def ending(self) -> bool:
        """True once ``end_streams`` ran: the frontend is stopping."""
        return self._ending

    async def end_streams(self, timeout: float) -> None:
        """Ends every open push stream now, cleanly (the pusher reads the end and reconnects, elsewhere or later),
        and waits up to ``timeout`` for their handlers: a stream left open would be cancelled by the server at the
        end of its grace period, which grpc logs as an error with a traceback, and would hold the stop that long."""
        self._ending = True
        tasks = [t for t in self._stream_tasks if not t.done()]
        for task in tasks:
            if task not in self._writing:
                task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def _caller(self, context: Context, what: str) -> Identity | None:
        identity = await authenticated_caller(context, what)
        if identity is None and not self._warned_insecure:
            self._warned_insecure = True
            log.warning("output sink: plaintext connection (--insecure): pushes are not checked for their sender")
        return identity

    async def _refuse(self, context: Context, message: str) -> None:
        self.refused_pushes += 1
        log.warning("output push refused: %s", message)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    async def PushOutputs(
        self, request: frontend_pb2.PushOutputsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> frontend_pb2.PushOutputsResponse:
        caller = await self._caller(context, "PushOutputs")
        return frontend_pb2.PushOutputsResponse(unknown_request_ids=await self._apply(request, caller, context))

    async def StreamOutputs(
        self, request_iterator: AsyncIterator[frontend_pb2.StreamOutputsRequest], context: Context
    ) -> AsyncIterator[frontend_pb2.StreamOutputsResponse]:
        """A llumlet's long-lived push (see ``serve_output_stream``). The caller's identity is read once: it is the
        stream's TLS peer."""
        caller = await self._caller(context, "StreamOutputs")
        if caller is not None and caller.role != "llumlet":
            await self._refuse(context, f"caller {caller.role} {caller.id} may not stream outputs")

        async def apply(batch: frontend_pb2.PushOutputsRequest) -> list[str]:
            return await self._apply(batch, caller, context)

        task = asyncio.current_task()
        if self.ending() or task is None:
            return
        self.streams += 1  # only the streams served: one ended at once by a stopping frontend is not
        pusher = caller.id if caller else None
        self._stream_tasks.add(task)
        try:
            async for reply in serve_output_stream(request_iterator, apply, self.applied, pusher):
                # grpc writes the reply in its own frames, with this generator suspended: a cancel landing there
                # escapes this handler (grpc swallows it and sends no status, and the server's stop then waits out its
                # whole grace). So ``end_streams`` leaves a writing stream alone, and it ends here once written.
                self._writing.add(task)
                try:
                    yield reply
                finally:
                    self._writing.discard(task)
                if self.ending():
                    return
        except asyncio.CancelledError:
            if not self.ending():
                raise
            task.uncancel()  # ended by ``end_streams``: the stream ends cleanly (status OK)
        finally:
            self._stream_tasks.discard(task)

    async def DescribeSink(
        self, request: frontend_pb2.DescribeSinkRequest, context: Context
    ) -> frontend_pb2.DescribeSinkResponse:
        """Where the framed push stream listens (see ``serve_framed``); empty when this sink offers none."""
        # (a stopping frontend offers none: its framed listener is closed, and a pusher told to go there would take
        # the refused connection for an unreachable port)
        return frontend_pb2.DescribeSinkResponse(stream_address="" if self.ending() else self.stream_address)

    async def serve_framed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One llumlet's push stream over ``infra.framed`` frames: the same exchange and checks as ``StreamOutputs``.
        The caller is the connection's TLS peer, checked once as the role table checks StreamOutputs (cluster, role
        llumlet); a refusal ends the stream with its status, as on gRPC. ``end_streams`` ends it cleanly."""

        async def run(stream: FramedServerStream[frontend_pb2.StreamOutputsRequest]) -> None:
            try:
                caller = framed_caller(writer, self.stream_cluster, FRAMED_METHOD)
            except FramedAbort as exc:
                self.refused_pushes += 1
                log.warning("framed output stream refused: %s", exc.details)
                raise
            if caller is None and not self._warned_insecure:
                self._warned_insecure = True
                log.warning("output sink: plaintext connection (--insecure): pushes are not checked for their sender")
            task = asyncio.current_task()
            if self.ending() or task is None:
                raise FramedAbort(grpc.StatusCode.UNAVAILABLE, "the frontend is stopping")
            self.streams += 1
            self._stream_tasks.add(task)
            context = FramedContext(caller)

            async def apply(batch: frontend_pb2.PushOutputsRequest) -> list[str]:
                return await self._apply(batch, caller, context)

            try:
                pusher = caller.id if caller else None
                async for reply in serve_output_stream(stream.messages(), apply, self.applied, pusher):
                    await stream.send(reply)
            finally:
                self._stream_tasks.discard(task)

        await serve_connection(
            reader,
            writer,
            frontend_pb2.StreamOutputsRequest,
            run,
            max_bytes=self.max_frame_bytes,
            clean_cancel=self.ending,
        )

    async def _apply(
        self, request: frontend_pb2.PushOutputsRequest, caller: Identity | None, context: Context
    ) -> list[str]:
        """Checks a batch against its pusher (see the module docstring) and routes what passes; returns the request
        ids the pusher should stop (unknown here, or its capability is outdated)."""
        self.pushes += 1
        outputs: Sequence[common_pb2.RequestOutput] = request.outputs
        refused: list[str] = []
        if caller is not None:
            if caller.role == "llumlet":
                outputs, refused = await self._from_llumlet(request, caller, context)
            elif caller.role == "scheduler":
                outputs = await self._from_scheduler(request, caller, context)
            else:
                await self._refuse(context, f"caller {caller.role} {caller.id} may not push outputs")
        else:
            outputs, refused = self._current_incarnations(outputs)
            if request.instance_id and lost_scope(context.invocation_metadata()) == LOST_SCOPE_INSTANCE:
                # The leader's lost-instance notice on an --insecure cluster (plaintext trusts its callers): as on
                # TLS, every request the instance holds ends, listed or not.
                self._end_held_by(request.instance_id, outputs)
        unknown = self.tracker.route(request.instance_id, outputs)
        return unknown + refused if refused else unknown

    async def _from_llumlet(
        self, request: frontend_pb2.PushOutputsRequest, caller: Identity, context: Context
    ) -> tuple[list[common_pb2.RequestOutput], list[str]]:
        if request.instance_id != caller.id:
            await self._refuse(context, f"caller llumlet {caller.id} may not push outputs as {request.instance_id!r}")
        accepted: list[common_pb2.RequestOutput] = []
        stale: list[str] = []
        ledger = self.tracker.ledger
        for out in request.outputs:
            tracked = self.tracker.get(out.request_id)
            if tracked is None:
                accepted.append(out)  # answered as unknown: the llumlet aborts it
                continue
            if not out.capability and _holder_error_notice(out):
                if caller.id in ledger.holders(out.request_id):
                    accepted.append(out)  # the pusher's own "gave up" notice: it may end what it holds, never add to it
                    continue
                if caller.id in tracked.revoked:  # the request was taken from it (AddRequest timed out): drop it
                    self.stale_outputs += 1
                    if out.request_id not in stale:
                        stale.append(out.request_id)
                    continue
            try:
                ledger.check(out.capability, request_id=out.request_id, caller_instance_id=caller.id)
            except StaleCapabilityError as exc:
                self.stale_outputs += 1
                log.info("output of %s from %s dropped: %s", out.request_id, caller.id, exc)
                if out.request_id not in stale:
                    stale.append(out.request_id)
                continue
            except TokenError as exc:
                # Only this output is refused (its id goes back, so the pusher stops that request alone). Refusing the
                # whole push ended the stream with PERMISSION_DENIED, which the pusher takes as permanent: an honest
                # llumlet handed one bad token (a compromised peer's migration into it carries any token it likes)
                # gave up on the frontend and aborted every request it held for it.
                self.refused_outputs += 1
                log.warning(
                    "output push refused: llumlet %s may not push outputs for %r: %s", caller.id, out.request_id, exc
                )
                if out.request_id not in stale:
                    stale.append(out.request_id)
                continue
            accepted.append(out)
        return accepted, stale

    def _current_incarnations(
        self, outputs: Sequence[common_pb2.RequestOutput]
    ) -> tuple[Sequence[common_pb2.RequestOutput], list[str]]:
        """Unchecked pushes (plaintext): drops outputs that carry an outdated grant (an earlier request with a reused
        id), returning their ids as stale so the pusher stops that incarnation."""
        ledger = self.tracker.ledger
        for out in outputs:
            if out.capability:
                ledger.promote_unchecked(out.capability, request_id=out.request_id)
        if not any(ledger.outdated(out.capability, request_id=out.request_id) for out in outputs):
            return outputs, []
        kept: list[common_pb2.RequestOutput] = []
        stale: list[str] = []
        for out in outputs:
            if ledger.outdated(out.capability, request_id=out.request_id):
                self.stale_outputs += 1
                if out.request_id not in stale:
                    stale.append(out.request_id)
            else:
                kept.append(out)
        return kept, stale

    async def _check_leader(self, caller: Identity, context: Context) -> None:
        """Refuses a scheduler that is not the current leader (a follower's certificate must not end requests)."""
        if self.scheduler_leader is None:
            await self._refuse(context, f"scheduler {caller.id}: this sink cannot tell the scheduler leader")
            return
        try:
            leader = await self.scheduler_leader()
        except Exception as exc:
            log.warning("lost-instance notice of %s: cannot read the scheduler leader: %s", caller.id, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot tell the scheduler leader now: {exc}")
            return
        if leader != caller.id:
            await self._refuse(context, f"scheduler {caller.id} is not the leader ({leader or 'none'})")

    async def _from_scheduler(
        self, request: frontend_pb2.PushOutputsRequest, caller: Identity, context: Context
    ) -> list[common_pb2.RequestOutput]:
        """The leader's "instance lost" notice: ERROR finishes without tokens for the requests that instance holds,
        listed or not (see the module docstring); returns the listed ones to route, having ended the others."""
        await self._check_leader(caller, context)
        accepted: list[common_pb2.RequestOutput] = []
        for out in request.outputs:
            if not out.finished or out.finish_reason != common_pb2.FINISH_REASON_ERROR or out.token_ids:
                await self._refuse(
                    context,
                    f"the scheduler may push only token-less ERROR finishes (instance lost); not {out.request_id!r}",
                )
            holders = self.tracker.ledger.holders(out.request_id)
            if self.tracker.get(out.request_id) is not None and request.instance_id not in holders:
                log.info("lost-instance notice for %s ignored: held by %s", out.request_id, holders or "nobody")
                continue
            accepted.append(out)
        every = request.instance_id and lost_scope(context.invocation_metadata()) != LOST_SCOPE_LISTED
        ended = self._end_held_by(request.instance_id, accepted) if every else []
        if request.outputs and not accepted and not ended:
            await self._refuse(context, f"no request in this push is held by instance {request.instance_id!r}")
        return accepted

    def _end_held_by(self, instance_id: str, listed: Sequence[common_pb2.RequestOutput]) -> list[str]:
        """Ends every request the lost instance holds but the listed ones (routed next) with the leader's error text
        (its first listed output's, else ``lost_error``); returns their ids."""
        error = listed[0].error if listed and listed[0].error else lost_error(instance_id)
        ended = self.tracker.end_held_by(instance_id, error, [out.request_id for out in listed])
        if ended:
            log.warning("instance %s lost: ended the %d request(s) it held: %s", instance_id, len(ended), ended)
        return ended

    async def HandOver(
        self, request: frontend_pb2.HandOverRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> frontend_pb2.HandOverResponse:
        caller = await self._caller(context, "HandOver")
        tracked = self.tracker.get(request.request_id)
        if tracked is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no request {request.request_id!r} on this frontend")
            raise AssertionError("context.abort raises")  # pragma: no cover
        if caller is None:
            # Insecure mode: pushes are not checked, but the destination still gets a grant of its own, so that once
            # the client reuses the id its late outputs are told apart (``_current_incarnations``); before, it held
            # none and they reached the new request. A destination the request was once taken from (its AddRequest
            # timed out) may hold it again by migration.
            if request.capability and self.tracker.ledger.outdated(request.capability, request_id=request.request_id):
                # A holder the request was taken back (or moved on) from may not pass it on (REVIEW13).
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{request.request_id!r} moved on")
            tracked.revoked.discard(request.new_instance_id)
            token = self.tracker.ledger.hand_over_unchecked(
                request.capability, request_id=request.request_id, new_instance_id=request.new_instance_id
            )
            return frontend_pb2.HandOverResponse(capability=token)
        if caller.role != "llumlet":
            await self._refuse(context, f"caller {caller.role} {caller.id} may not hand requests over")
        try:
            token = self.tracker.ledger.hand_over(
                request.capability,
                request_id=request.request_id,
                caller_instance_id=caller.id,
                new_instance_id=request.new_instance_id,
            )
        except TokenError as exc:
            await self._refuse(context, f"llumlet {caller.id} may not hand over {request.request_id!r}: {exc}")
            raise AssertionError("context.abort raises") from exc  # pragma: no cover
        tracked.revoked.discard(request.new_instance_id)
        log.info("request %s: %s hands over to %s", request.request_id, caller.id, request.new_instance_id)
        return frontend_pb2.HandOverResponse(capability=token)

    async def TakeBack(self, request: frontend_pb2.TakeBackRequest, context: Context) -> frontend_pb2.TakeBackResponse:
        """A migration source whose commit went unanswered keeps the request unless the destination has pushed for
        it (see the proto): who pushed is known only here, so only here can it be decided without a race."""
        caller = await self._caller(context, "TakeBack")
        rid, destination = request.request_id, request.from_instance_id
        tracked = self.tracker.get(rid)
        if tracked is None or tracked.finished:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no request {rid!r} on this frontend")
            raise AssertionError("context.abort raises")  # pragma: no cover
        if not destination or destination == (caller.id if caller else request.instance_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot take {rid!r} back from {destination!r}")
        ledger = self.tracker.ledger
        if caller is None:
            # Insecure mode: the pusher of the latest tokens is who runs the request now, and a token other than the
            # current grant is a holder the request moved on from.
            if tracked.instance_id == destination:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"{destination} pushed for {rid!r}: it holds it"
                )
            if not ledger.take_back_unchecked(request.capability, request_id=rid, from_instance_id=destination):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{rid!r} moved on: the token is not current")
        else:
            if caller.role != "llumlet" or request.instance_id not in ("", caller.id):
                await self._refuse(context, f"caller {caller.role} {caller.id} may not take {rid!r} back")
            try:
                ledger.take_back(
                    request.capability, request_id=rid, caller_instance_id=caller.id, from_instance_id=destination
                )
            except StaleCapabilityError as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            except TokenError as exc:
                await self._refuse(context, f"llumlet {caller.id} may not take {rid!r} back: {exc}")
        tracked.revoke(destination)
        log.warning("request %s: taken back from %s (its commit went unanswered)", rid, destination)
        return frontend_pb2.TakeBackResponse()
