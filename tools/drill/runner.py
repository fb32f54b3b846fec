"""One drill: the reference run, then each scenario (load, fault, wait for every stream, blocks, heal)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from pyllumnix.tools.drill.cluster import LocalCluster, Observer
from pyllumnix.tools.drill.credentials import PLAINTEXT, Credentials
from pyllumnix.tools.drill.faults import INJECTORS, FaultContext, heal
from pyllumnix.tools.drill.load import OpenLoop, RequestSpec, StreamClient, make_catalog, run_all
from pyllumnix.tools.drill.report import (
    BlockReport,
    DrillReport,
    FaultRecord,
    ScenarioResult,
    judge,
)
from pyllumnix.tools.drill.scenarios import Scenario


@dataclass
class DrillOptions:
    rate: float = 8.0
    warmup: float = 2.0
    tail: float = 3.0
    request_deadline: float = 60.0
    settle: float = 15.0
    seed: int = 0
    catalog_size: int = 24


class Drill:
    """Runs scenarios against ``frontend`` / ``schedulers`` (``cluster`` is None when attached)."""

    def __init__(
        self,
        opts: DrillOptions,
        *,
        frontend: str,
        schedulers: list[str],
        http_base: str,
        cluster: LocalCluster | None,
        progress: Any,
        credentials: Credentials = PLAINTEXT,
    ) -> None:
        self.opts = opts
        self.frontend = frontend
        self.schedulers = schedulers
        self.http_base = http_base
        self.cluster = cluster
        self.progress = progress
        self.credentials = credentials
        self.clock = time.monotonic
        self.specs = make_catalog("stream", opts.catalog_size, opts.seed, prompt_len=(16, 128), max_tokens=(16, 64))
        # Burst streams are short so N of them finish on a small machine within the deadline.
        self.burst_specs = make_catalog("burst", opts.catalog_size, opts.seed, prompt_len=(8, 32), max_tokens=(4, 12))
        self.probe_spec = RequestSpec("probe", 0, (5, 6, 7, 8), 2, 1)
        self.references: dict[tuple[str, int], list[int]] = {}

    def say(self, message: str) -> None:
        self.progress(message)

    async def run(self, scenarios: list[Scenario]) -> DrillReport:
        observer = Observer(self.schedulers, credentials=self.credentials)
        client = StreamClient(
            self.frontend, self.clock, deadline=self.opts.request_deadline, credentials=self.credentials
        )
        report = DrillReport(config={}, reference={}, results=[])
        try:
            instances = await self._instances(observer)
            if not instances:
                report.error = "no instance registered (no leader answered ListInstances)"
                return report
            ok, missing = await observer.wait_healthy(instances, 60.0)
            if not ok:
                report.error = f"cluster not healthy before the drill: {missing}"
                return report
            report.reference = await self._reference(client)
            if report.reference["unfinished"]:
                report.error = f"reference run: {report.reference['unfinished']} streams did not finish"
                return report
            for scenario in scenarios:
                self.say(f"[bold]{scenario.label}[/bold]: running")
                result = await self._scenario(scenario, observer, client, instances)
                report.results.append(result)
                verdict = "[green]pass[/green]" if result.passed else "[red]FAIL[/red]"
                self.say(f"{scenario.label}: {verdict}")
        finally:
            await client.close()
            await observer.close()
        return report

    async def _instances(self, observer: Observer) -> list[str]:
        if self.cluster is not None:
            return sorted(self.cluster.llumlets)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            active = await observer.active_instances()
            if active:
                return sorted(active)
            await asyncio.sleep(0.2)
        return []

    async def _reference(self, client: StreamClient) -> dict[str, Any]:
        """Every catalog entry once, with no fault: the tokens each stream of the drill must reproduce."""
        self.say("reference run (no fault)")
        started = self.clock()
        records = await run_all(client, [*self.specs, *self.burst_specs], "ref")
        unfinished = []
        for rec in records:
            if rec.status == "OK" and rec.finish_reason in ("stop", "length") and not rec.index_errors:
                self.references[(rec.catalog, rec.index)] = rec.token_ids
            else:
                unfinished.append(f"{rec.request_id}: {rec.status} {rec.finish_reason} {rec.error}")
        return {
            "streams": len(records),
            "unfinished": len(unfinished),
            "unfinished_reasons": unfinished[:10],
            "tokens": sum(len(r.token_ids) for r in records),
            "seconds": round(self.clock() - started, 3),
        }

    async def _scenario(
        self, scenario: Scenario, observer: Observer, client: StreamClient, instances: list[str]
    ) -> ScenarioResult:
        healthy, missing = await observer.wait_healthy(instances, 30.0)
        record = FaultRecord(scenario.label)
        if not healthy:
            record.notes.append(f"before the fault: {missing}")
        record.leader_before = await self._leader(observer)
        started = self.clock()
        load = OpenLoop(client, self.specs, self.opts.rate, scenario.fault)
        ctx = FaultContext(
            scenario=scenario,
            record=record,
            observer=observer,
            cluster=self.cluster,
            clock=self.clock,
            load=load,
            client=client,
            burst_specs=self.burst_specs,
            probe_spec=self.probe_spec,
            instances=instances,
            http_base=self.http_base,
        )
        load.start()
        await asyncio.sleep(self.opts.warmup)
        try:
            await INJECTORS[scenario.fault](ctx)
        except Exception as exc:
            record.notes.append(f"injection failed: {type(exc).__name__}: {str(exc)[:500]}")
        if not record.skipped:
            await asyncio.sleep(self.opts.tail)
        self.say(f"{scenario.label}: fault over; waiting for {load.in_flight()} streams")
        records = await load.finish()
        await asyncio.gather(*ctx.observers)
        probes = await ctx.prober.stop() if ctx.prober is not None else []
        blocks = await self._blocks(observer)
        record.duration_s = round(self.clock() - started, 3)
        record.leader_after = await self._leader(observer)
        if self.cluster is not None:
            record.exited_llumlets = [i for i in self.cluster.exited_llumlets() if i not in record.killed_instances]
        ok, missing = await heal(ctx)
        if not ok:
            record.notes.append(f"cluster not healthy after healing: {missing}")
        return judge(
            scenario,
            record,
            records,
            self.references,
            blocks,
            probes,
            started,
            healthy_before=healthy,
        )

    @staticmethod
    async def _leader(observer: Observer) -> str:
        seen = await observer.wait_leader(5.0)
        return f"{seen.replica_id} (term {seen.term})" if seen is not None else "none"

    async def _blocks(self, observer: Observer) -> BlockReport:
        """KV blocks and requests each reachable llumlet still holds, polled until none or the settle time passed."""
        start = time.monotonic()
        report = BlockReport()
        while True:
            addresses: dict[str, str] = {}
            for status in await observer.list_instances() or []:
                addresses[status.info.instance_id] = status.info.grpc_address
            if self.cluster is not None:
                for iid, comp in self.cluster.llumlets.items():
                    if comp.alive():
                        addresses.setdefault(iid, f"127.0.0.1:{self.cluster.llumlet_ports[iid]}")
            loads = await asyncio.gather(*(observer.get_load(a) for a in addresses.values()))
            report = BlockReport(settle_s=time.monotonic() - start)
            for iid, load in zip(addresses, loads, strict=True):
                if load is None:
                    report.unreachable.append(iid)
                    continue
                report.used_blocks[iid] = load.total_blocks - load.free_blocks
                report.requests[iid] = [r.request_id for r in load.requests]
            clean = not report.leaked and not any(report.requests.values())
            if clean or time.monotonic() - start >= self.opts.settle:
                return report
            await asyncio.sleep(0.25)
