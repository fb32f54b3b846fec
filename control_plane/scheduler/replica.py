"""One scheduler replica: every replica watches the registry and the config; the elected leader also takes load
reports, dispatches, runs the pairing loop (migrate-out orders) and the scaling loop (instance provider).

The policy core is pure; this module is its I/O edge: etcd (election, registry, config), gRPC to llumlets and, for a
lost instance, to the frontends of its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf import field_mask_pb2

from pyllumnix.control_plane.etcd.client import EtcdClient
from pyllumnix.control_plane.etcd.config_store import ConfigStore
from pyllumnix.control_plane.etcd.election import Election, Leadership
from pyllumnix.control_plane.etcd.errors import EtcdError
from pyllumnix.control_plane.etcd.keys import KeyLayout
from pyllumnix.control_plane.etcd.registry import InstanceRegistry, RegistryEventType
from pyllumnix.control_plane.policy.config import PolicyConfig
from pyllumnix.control_plane.policy.core import PolicyCore
from pyllumnix.control_plane.policy.pairing import MigrateOrder
from pyllumnix.control_plane.policy.snapshot import DispatchRequestView, InstanceState, normalize_priority
from pyllumnix.control_plane.scheduler.cluster import ClusterState
from pyllumnix.control_plane.scheduler.provider import InstanceProvider
from pyllumnix.protos.llumnix.v1 import (
    admin_pb2,
    common_pb2,
    config_pb2,
    frontend_pb2,
    frontend_pb2_grpc,
    llumlet_pb2,
    llumlet_pb2_grpc,
)

log = logging.getLogger(__name__)

LLUMLET_CALL_TIMEOUT_S = 2.0
MIGRATE_WAIT_TIMEOUT_S = 60.0


class NotLeaderError(Exception):
    """This replica does not lead; ``leader_address`` is where to go (empty when unknown)."""

    def __init__(self, leader_address: str) -> None:
        super().__init__(f"not the leader (leader: {leader_address or 'unknown'})")
        self.leader_address = leader_address


class SchedulingError(Exception):
    """A request the scheduler refuses, with the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class LeaderView:
    replica_id: str = ""
    address: str = ""
    term: int = 0


class SchedulerReplica:
    def __init__(
        self,
        client: EtcdClient,
        layout: KeyLayout,
        replica_id: str,
        grpc_address: str,
        *,
        provider: InstanceProvider | None = None,
        seed: int = 0,
        election_ttl: int = 1,
        stale_after: float = 1.0,
    ) -> None:
        self.client = client
        self.layout = layout
        self.replica_id = replica_id
        self.grpc_address = grpc_address
        self.provider = provider
        self.core = PolicyCore(PolicyConfig(), seed=seed)
        self.cluster = ClusterState(stale_after=stale_after)
        self.registry = InstanceRegistry(client, layout)
        self.election = Election(client, layout.election_prefix(), ttl=election_ttl)
        self.config_store: ConfigStore[config_pb2.ClusterConfig] = ConfigStore(
            client, layout.config_key, config_pb2.ClusterConfig
        )
        self.config_revision = 0
        self.leadership: Leadership | None = None
        self.leader = LeaderView()
        self.leader_changed = asyncio.Event()
        self.migrations_ordered = 0
        self.migration_results: list[llumlet_pb2.MigrationResult] = []
        self.requests_failed = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._leader_tasks: list[asyncio.Task[None]] = []
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._order_in_flight: dict[str, float] = {}
        self._scale_target: int | None = None
        # Hook for metrics: called with each finished migration result.
        self.on_migration: list[Callable[[llumlet_pb2.MigrationResult], None]] = []

    # ------------------------------------------------------------------ lifecycle
    @property
    def is_leader(self) -> bool:
        return self.leadership is not None and self.leadership.is_leader

    def _value(self) -> bytes:
        return admin_pb2.SchedulerReplica(
            replica_id=self.replica_id, grpc_address=self.grpc_address
        ).SerializeToString()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._forever(self._watch_registry), name="registry-watch"),
            loop.create_task(self._forever(self._watch_config), name="config-watch"),
            loop.create_task(self._forever(self._observe_leader), name="leader-observe"),
            loop.create_task(self._forever(self._lead), name="campaign"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self._stop_leader_tasks()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.leadership is not None:
            with contextlib.suppress(EtcdError):
                await self.leadership.resign()
        for channel in self._channels.values():
            await channel.close()

    async def _forever(self, body: Callable[[], Awaitable[None]]) -> None:
        """Runs a watch/loop body again after failures (etcd outages are retried inside the client)."""
        while True:
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: %s failed; restarting", self.replica_id, getattr(body, "__name__", body))
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ watches (every replica)
    async def _watch_registry(self) -> None:
        async with self.registry.watch() as events:
            async for ev in events:
                if ev.type is RegistryEventType.RESYNC:
                    entries = {iid: self._parse_info(v) for iid, v in ev.snapshot.items()}
                    for iid in self.cluster.set_registry(entries):
                        await self._instance_lost(iid, None)
                    for iid in entries:
                        self._registered(iid)
                elif ev.type is RegistryEventType.REMOVE:
                    load = self.cluster.remove(ev.instance_id)
                    await self._instance_lost(ev.instance_id, load)
                else:
                    self.cluster.upsert(self._parse_info(ev.value))
                    self._registered(ev.instance_id)

    @staticmethod
    def _parse_info(value: bytes) -> common_pb2.InstanceInfo:
        info = common_pb2.InstanceInfo()
        info.ParseFromString(value)
        return info

    def _registered(self, instance_id: str) -> None:
        if self.provider is not None:
            self.provider.registered(instance_id)

    async def _watch_config(self) -> None:
        async for message, revision in self.config_store.watch():
            config = PolicyConfig.from_proto(message) if message is not None else PolicyConfig()
            try:
                self.core.reconfigure(config)
            except ValueError as exc:
                log.error("ignoring invalid config at revision %d: %s", revision, exc)
                continue
            self.config_revision = revision if message is not None else 0
            self.cluster.stale_after = max(1.0, 20 * config.load_report_interval_ms / 1000)

    async def _observe_leader(self) -> None:
        async for info in self.election.observe():
            if info is None:
                self.leader = LeaderView()
            else:
                replica = admin_pb2.SchedulerReplica()
                replica.ParseFromString(info.value)
                self.leader = LeaderView(replica.replica_id, replica.grpc_address, info.create_revision)
            self.leader_changed.set()
            self.leader_changed = asyncio.Event()

    # ------------------------------------------------------------------ leadership
    async def _lead(self) -> None:
        leadership = await self.election.campaign(self._value())
        self.leadership = leadership
        self.leader = LeaderView(self.replica_id, self.grpc_address, leadership.revision)
        log.info("%s leads (term %d)", self.replica_id, leadership.revision)
        loop = asyncio.get_running_loop()
        self._leader_tasks = [
            loop.create_task(self._forever(self._pairing_loop), name="pairing"),
            loop.create_task(self._forever(self._scaling_loop), name="scaling"),
        ]
        try:
            await leadership.lost.wait()
            log.warning("%s stepped down: %s", self.replica_id, leadership.lost_reason)
        finally:
            await self._stop_leader_tasks()
            self.leadership = None

    async def _stop_leader_tasks(self) -> None:
        for task in self._leader_tasks:
            task.cancel()
        for task in self._leader_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._leader_tasks = []

    def require_leader(self) -> None:
        if not self.is_leader:
            raise NotLeaderError(self.leader.address if self.leader.replica_id != self.replica_id else "")

    # ------------------------------------------------------------------ load and dispatch
    def report(self, load: common_pb2.InstanceLoad) -> bool:
        return self.cluster.report(load, time.monotonic())

    def dispatch(self, request_id: str, priority: int, num_prompt_tokens: int, max_tokens: int) -> tuple[str, str]:
        self.require_leader()
        if not request_id:
            raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        if num_prompt_tokens <= 0 or max_tokens <= 0:
            raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, "num_prompt_tokens and max_tokens must be > 0")
        request = DispatchRequestView(request_id, normalize_priority(priority), num_prompt_tokens, max_tokens)
        now = time.monotonic()
        snapshot = self.cluster.snapshot(now)
        choice = self.core.dispatch(snapshot, request)
        if choice is None:
            raise SchedulingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"no instance can take requests ({len(snapshot)} known)"
            )
        view = snapshot.get(choice)
        assert view is not None
        self.cluster.record_dispatch(choice, request_id, request.demand_blocks(view.block_size), request.priority, now)
        return choice, self.cluster.infos[choice].grpc_address

    # ------------------------------------------------------------------ llumlet calls
    def _llumlet(self, instance_id: str) -> llumlet_pb2_grpc.LlumletServiceStub:
        info = self.cluster.infos.get(instance_id)
        if info is None:
            raise SchedulingError(grpc.StatusCode.NOT_FOUND, f"unknown instance {instance_id}")
        channel = self._channels.get(info.grpc_address)
        if channel is None:
            channel = self._channels[info.grpc_address] = grpc.aio.insecure_channel(info.grpc_address)
        return llumlet_pb2_grpc.LlumletServiceStub(channel)

    async def _pairing_loop(self) -> None:
        while True:
            config = self.core.config
            await asyncio.sleep(config.pairing_interval_ms / 1000)
            now = time.monotonic()
            snapshot = self.cluster.snapshot(now)
            for order in self.core.pair(snapshot):
                if now - self._order_in_flight.get(order.source, -1e9) < MIGRATE_WAIT_TIMEOUT_S:
                    continue
                self._order_in_flight[order.source] = now
                asyncio.get_running_loop().create_task(self._order_migration(order))
            self._stop_drained()

    async def _order_migration(self, order: MigrateOrder) -> None:
        try:
            dst = self.cluster.infos.get(order.destination)
            if dst is None:
                return
            request = llumlet_pb2.MigrateOutRequest(
                destination_instance_id=order.destination,
                destination_grpc_address=dst.grpc_address,
                selection=int(order.selection),  # type: ignore[arg-type]
                max_requests=1,
                wait=True,
            )
            self.migrations_ordered += 1
            reply = await self._llumlet(order.source).MigrateOut(request, timeout=MIGRATE_WAIT_TIMEOUT_S)
            for result in reply.results:
                self._record_migration(result)
        except (grpc.aio.AioRpcError, SchedulingError) as exc:
            log.debug("migrate-out order %s -> %s failed: %s", order.source, order.destination, exc)
        finally:
            self._order_in_flight.pop(order.source, None)

    def _record_migration(self, result: llumlet_pb2.MigrationResult) -> None:
        self.migration_results.append(result)
        del self.migration_results[:-1000]
        for hook in self.on_migration:
            hook(result)

    def _stop_drained(self) -> None:
        """Draining instances that are empty stop themselves; stop provider-owned ones that linger."""
        if self.provider is None:
            return
        for iid, load in self.cluster.loads.items():
            if load.state == common_pb2.INSTANCE_STATE_DRAINING and not load.requests and not load.migrating_in:
                asyncio.get_running_loop().create_task(self._stop_later(iid))

    async def _stop_later(self, instance_id: str) -> None:
        await asyncio.sleep(5.0)
        load = self.cluster.loads.get(instance_id)
        if load is not None and load.state == common_pb2.INSTANCE_STATE_DRAINING and not load.requests:
            assert self.provider is not None
            await self.provider.stop_instance(instance_id)

    async def _scaling_loop(self) -> None:
        while True:
            config = self.core.config
            await asyncio.sleep(config.scaling_interval_ms / 1000)
            if self.provider is None:
                continue
            if self._scale_target is not None:
                await self._converge_to_target()
                continue
            if not config.enable_scaling:
                continue
            snapshot = self.cluster.snapshot(time.monotonic())
            decision = self.core.scale(snapshot, len(self.provider.starting()))
            for iid in decision.cancel_drain:
                await self.set_instance_state(iid, InstanceState.ACTIVE)
            for iid in decision.drain:
                await self.set_instance_state(iid, InstanceState.DRAINING)
            if decision.start:
                log.info("scaling up by %d (cluster freeness %.1f)", decision.start, decision.cluster_freeness)
                await self.provider.start_instances(decision.start)

    async def _converge_to_target(self) -> None:
        """Manual scale: start or drain instances until the active count meets the target."""
        assert self.provider is not None and self._scale_target is not None
        active = sorted(
            iid
            for iid, load in self.cluster.loads.items()
            if load.state != common_pb2.INSTANCE_STATE_DRAINING and iid in self.cluster.infos
        )
        starting = len(self.provider.starting())
        missing = self._scale_target - len(active) - starting
        if missing > 0:
            await self.provider.start_instances(missing)
        elif len(active) > self._scale_target:
            snapshot = self.cluster.snapshot(time.monotonic())
            by_load = sorted(active, key=lambda i: (getattr(snapshot.get(i), "num_requests", 0), i))
            for iid in by_load[: len(active) - self._scale_target]:
                await self.set_instance_state(iid, InstanceState.DRAINING)

    # ------------------------------------------------------------------ lost instances
    async def _instance_lost(self, instance_id: str, load: common_pb2.InstanceLoad | None) -> None:
        """Reports the requests of an instance whose lease expired as failed to their frontends (leader only)."""
        log.warning("instance %s left the registry", instance_id)
        if not self.is_leader or load is None:
            return
        by_frontend: dict[str, list[common_pb2.RequestOutput]] = {}
        for r in load.requests:
            if not r.frontend_address:
                continue
            by_frontend.setdefault(r.frontend_address, []).append(
                common_pb2.RequestOutput(
                    request_id=r.request_id,
                    first_token_index=r.num_output_tokens,
                    finished=True,
                    finish_reason=common_pb2.FINISH_REASON_ERROR,
                    error=f"instance {instance_id} was lost (its registry lease expired); the request failed",
                    instance_id=instance_id,
                )
            )
        for address, outputs in by_frontend.items():
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    await frontend_pb2_grpc.OutputSinkServiceStub(channel).PushOutputs(
                        frontend_pb2.PushOutputsRequest(instance_id=instance_id, outputs=outputs),
                        timeout=LLUMLET_CALL_TIMEOUT_S,
                    )
                self.requests_failed += len(outputs)
            except grpc.aio.AioRpcError as exc:
                log.warning("could not tell frontend %s about lost requests: %s", address, exc.code().name)

    # ------------------------------------------------------------------ admin operations (leader)
    def known(self, instance_id: str) -> None:
        if instance_id not in self.cluster.infos:
            raise SchedulingError(grpc.StatusCode.NOT_FOUND, f"unknown instance {instance_id}")

    async def set_instance_state(self, instance_id: str, state: InstanceState) -> None:
        self.require_leader()
        self.known(instance_id)
        await self._llumlet(instance_id).SetInstanceState(
            llumlet_pb2.SetInstanceStateRequest(state=int(state)),  # type: ignore[arg-type]
            timeout=LLUMLET_CALL_TIMEOUT_S,
        )
        self.cluster.set_override(instance_id, state, time.monotonic())

    async def migrate_request(self, request_id: str, destination: str) -> llumlet_pb2.MigrationResult:
        self.require_leader()
        self.known(destination)
        source = self.cluster.find_request(request_id)
        if source is None:
            raise SchedulingError(grpc.StatusCode.NOT_FOUND, f"unknown request {request_id}")
        if source == destination:
            raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, f"request {request_id} is already on {source}")
        dst_load = self.cluster.loads.get(destination)
        if dst_load is not None and dst_load.state in (
            common_pb2.INSTANCE_STATE_CORDONED,
            common_pb2.INSTANCE_STATE_DRAINING,
        ):
            raise SchedulingError(grpc.StatusCode.FAILED_PRECONDITION, f"{destination} takes no requests")
        request = llumlet_pb2.MigrateOutRequest(
            destination_instance_id=destination,
            destination_grpc_address=self.cluster.infos[destination].grpc_address,
            request_id=request_id,
            wait=True,
        )
        try:
            reply = await self._llumlet(source).MigrateOut(request, timeout=MIGRATE_WAIT_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise SchedulingError(exc.code(), exc.details() or exc.code().name) from exc
        if not reply.results:
            raise SchedulingError(grpc.StatusCode.NOT_FOUND, f"request {request_id} left {source} before migrating")
        result: llumlet_pb2.MigrationResult = reply.results[0]
        self._record_migration(result)
        return result

    async def scale_to(self, target: int) -> tuple[int, int]:
        self.require_leader()
        config = self.core.config
        if self.provider is None:
            raise SchedulingError(grpc.StatusCode.FAILED_PRECONDITION, "this scheduler has no instance provider")
        if not config.min_instances <= target <= config.max_instances:
            raise SchedulingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"target {target} outside [{config.min_instances}, {config.max_instances}] instances",
            )
        self._scale_target = target
        await self._converge_to_target()
        return len(self.cluster.infos), target

    async def set_config(
        self, config: config_pb2.ClusterConfig, paths: list[str], expected_revision: int
    ) -> tuple[config_pb2.ClusterConfig, int]:
        self.require_leader()
        merged = self.core.config.to_proto()
        if paths:
            mask = field_mask_pb2.FieldMask(paths=paths)
            if not mask.IsValidForDescriptor(config_pb2.ClusterConfig.DESCRIPTOR):
                raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown config path in {paths}")
            mask.MergeMessage(config, merged, replace_message_field=True, replace_repeated_field=True)
        else:
            merged = config
        try:
            validated = PolicyConfig.from_proto(merged).validate()
        except ValueError as exc:
            raise SchedulingError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        stored = validated.to_proto()
        from pyllumnix.control_plane.etcd.errors import ConfigConflictError

        try:
            revision = await self.config_store.put(stored, expected_revision=expected_revision or None)
        except ConfigConflictError as exc:
            raise SchedulingError(grpc.StatusCode.ABORTED, str(exc)) from exc
        self.core.reconfigure(validated)
        self.config_revision = revision
        return stored, revision
