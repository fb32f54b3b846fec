"""A pure vLLM-V1-like scheduler: paged KV blocks, FCFS admission with a watermark, continuous batching, and
preemption by recompute. No I/O, no clock, no randomness: the same decisions in real and in virtual time.

Per step (as vLLM V1's ``Scheduler.schedule``):
1. running requests, oldest first, each get their next tokens (1 when decoding). A request that needs a new block
   when none is free preempts the most recently started running request (possibly itself): its blocks are freed and
   it goes to the front of the waiting queue, to be recomputed (prompt + generated tokens) when readmitted;
2. only if nothing was preempted, waiting requests are admitted in queue order while the batch has a sequence slot,
   the token budget covers the whole (re)computation, and free blocks minus their demand stay at or above the
   watermark. The head blocks everyone behind it (head-of-line blocking, which is what makes fragmentation visible).

Priorities (as vLLM V1's ``priority`` scheduling policy): high-priority requests queue ahead of normal ones, the
preemption victim is the most recently started *normal* request while one runs. A high-priority head that lacks blocks
preempts normal requests (most recent first) when that makes it fit: our rule, not vLLM's (the vLLM adapter adds it,
``CoreAdapter.admit_high_priority_head``). A departure from the paper's engine (FCFS,
priorities only in the global scheduler's headroom): it lets normal requests use the memory of an instance holding
high-priority work in a burst without that work queueing behind them (Fig. 13, docs/sim/REPORT.md). With only normal
requests (every run without priorities) nothing changes.

With ``split_steps`` (vLLM 0.1.x, the paper's engine) the order is reversed and a step is never mixed: waiting
requests are admitted first (same rules); if any was, the step prefills only them and every running request waits;
otherwise the step decodes the running batch (1. above). A prefill thus stalls every decode on the instance.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from pyllumnix.data_plane.engine.base import Phase, RequestSpec
from pyllumnix.data_plane.engine.block_pool import BlockPool
from pyllumnix.infra.vocabulary import Priority

# Waiting-queue order: high priority before normal; within a priority, preempted requests first (latest preemption
# in front, as vLLM prepends them), then fresh or migrated-in requests by arrival time, ties by insertion order.
QueueKey = tuple[int, int, float, int]


def priority_rank(priority: int) -> int:
    """0 for high priority, 1 otherwise (the first element of a queue key)."""
    return 0 if priority >= Priority.HIGH else 1


@dataclass(eq=False)
class SimRequest:
    spec: RequestSpec
    seed: int
    key: int
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the request's blocks.
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    phase: Phase = Phase.WAITING
    num_preemptions: int = 0
    # Waiting because it was preempted and not yet readmitted.
    preempted: bool = False
    queue_key: QueueKey = (1, 1, 0.0, 0)
    # Order in which it (last) started running: the preemption victim is the highest.
    start_seq: int = 0
    suspended_from: Phase | None = None
    first_token_time: float = 0.0

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def high(self) -> bool:
        return self.spec.priority >= Priority.HIGH

    @property
    def num_tokens(self) -> int:
        return len(self.spec.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.spec.prompt_token_ids[-1]


@dataclass(frozen=True)
class Scheduled:
    request: SimRequest
    num_new_tokens: int
    is_prefill: bool


@dataclass(frozen=True)
class Schedule:
    scheduled: list[Scheduled]
    preempted: list[SimRequest]


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        *,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        watermark_blocks: int,
        split_steps: bool = False,
    ) -> None:
        self.pool = pool
        self.split_steps = split_steps
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = watermark_blocks
        self.waiting: list[SimRequest] = []
        self.running: list[SimRequest] = []
        # Suspended requests taken from the running batch keep their sequence slot until resumed or released.
        self.num_suspended_running = 0
        self.total_preemptions = 0
        self._seq = 0
        self._preempt_seq = 0

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def demand_blocks(self, req: SimRequest) -> int:
        """Blocks the request needs beyond what it holds to be scheduled next step."""
        if req.phase in (Phase.WAITING, Phase.RUNNING):
            return max(0, self.blocks_for(req.num_tokens) - len(req.block_ids))
        return 0

    def head_of_line_demand(self) -> int:
        return self.demand_blocks(self.waiting[0]) if self.waiting else 0

    # --- queues ---
    def enqueue(self, req: SimRequest) -> None:
        """Adds a fresh (or migrated-in waiting) request by arrival time."""
        req.queue_key = (priority_rank(req.spec.priority), 1, req.spec.arrival_time, self._next_seq())
        self.insert_waiting(req)

    def insert_waiting(self, req: SimRequest) -> None:
        req.phase = Phase.WAITING
        bisect.insort(self.waiting, req, key=lambda r: r.queue_key)

    def start_running(self, req: SimRequest) -> None:
        req.phase = Phase.RUNNING
        req.preempted = False
        req.start_seq = self._next_seq()
        self.running.append(req)

    def insert_running(self, req: SimRequest) -> None:
        req.phase = Phase.RUNNING
        bisect.insort(self.running, req, key=lambda r: r.start_seq)

    def remove(self, req: SimRequest) -> None:
        """Takes the request out of its queue (or suspension) and frees its blocks."""
        if req.phase is Phase.WAITING:
            self.waiting.remove(req)
        elif req.phase is Phase.RUNNING:
            self.running.remove(req)
        elif req.phase is Phase.SUSPENDED and req.suspended_from is Phase.RUNNING:
            self.num_suspended_running -= 1
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.phase = Phase.FINISHED

    def suspend(self, req: SimRequest) -> None:
        """Out of scheduling, blocks kept; ``resume`` restores the same queue position."""
        if req.phase is Phase.RUNNING:
            self.running.remove(req)
            self.num_suspended_running += 1
        else:
            self.waiting.remove(req)
        req.suspended_from = req.phase
        req.phase = Phase.SUSPENDED

    def resume(self, req: SimRequest) -> None:
        if req.suspended_from is Phase.RUNNING:
            self.num_suspended_running -= 1
            self.insert_running(req)
        else:
            self.insert_waiting(req)
        req.suspended_from = None

    def _preempt(self, req: SimRequest) -> None:
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.preempted = True
        self.total_preemptions += 1
        self._preempt_seq += 1
        req.queue_key = (priority_rank(req.spec.priority), 0, float(-self._preempt_seq), 0)
        self.insert_waiting(req)

    # --- one step ---
    def schedule(self) -> Schedule:
        budget = self.max_num_batched_tokens
        scheduled: list[Scheduled] = []
        preempted: list[SimRequest] = []
        if self.split_steps:
            budget = self._admit(scheduled, preempted, budget)
            if scheduled:
                return Schedule(scheduled, preempted)
        i = 0
        while i < len(self.running):
            req = self.running[i]
            num_new = req.num_tokens - req.num_computed_tokens
            if num_new > budget:
                i += 1
                continue
            need = self.blocks_for(req.num_tokens) - len(req.block_ids)
            while need > self.pool.num_free:
                j = self._victim_index()
                victim = self.running.pop(j)
                budget += self._unschedule(scheduled, victim)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
                if j < i:
                    i -= 1
            if req.phase is not Phase.RUNNING:
                break
            if need > 0:
                req.block_ids.extend(self.pool.allocate(need))
            scheduled.append(Scheduled(req, num_new, self._is_prefill(req, num_new)))
            budget -= num_new
            i += 1
        if not preempted and not self.split_steps:
            self._admit(scheduled, preempted, budget)
        return Schedule(scheduled, preempted)

    def _victim_index(self) -> int:
        """The preemption victim: the most recently started normal request, else the most recently started one."""
        for j in range(len(self.running) - 1, -1, -1):
            if not self.running[j].high:
                return j
        return len(self.running) - 1

    @staticmethod
    def _unschedule(scheduled: list[Scheduled], victim: SimRequest) -> int:
        """Drops a victim already scheduled in this step (a normal request older than the high-priority one that
        needs its blocks); returns the tokens given back to the budget."""
        for k, item in enumerate(scheduled):
            if item.request is victim:
                del scheduled[k]
                return item.num_new_tokens
        return 0

    def _admit(self, scheduled: list[Scheduled], preempted: list[SimRequest], budget: int) -> int:
        """Admits waiting requests in queue order while a sequence slot, the token budget and the watermark allow;
        returns the budget left. A high-priority head short of blocks first preempts normal running requests, most
        recent first, if together they free enough; the tokens those victims had been scheduled this step go back to
        the budget (as the running loop's preemptions give theirs back)."""
        while self.waiting and len(self.running) + self.num_suspended_running < self.max_num_seqs:
            req = self.waiting[0]
            num_new = req.num_tokens - req.num_computed_tokens
            need = self.blocks_for(req.num_tokens) - len(req.block_ids)
            if num_new > budget:
                break
            if self.pool.num_free - need < self.watermark_blocks:
                returned = self._make_room(need, scheduled, preempted) if req.high else None
                if returned is None:
                    break
                budget += returned
            self.waiting.pop(0)
            req.block_ids.extend(self.pool.allocate(need))
            self.start_running(req)
            scheduled.append(Scheduled(req, num_new, True))
            budget -= num_new
        return budget

    def _make_room(self, need: int, scheduled: list[Scheduled], preempted: list[SimRequest]) -> int | None:
        """Preempts normal running requests (most recent first) until ``need`` blocks fit above the watermark and
        returns the tokens the victims had been scheduled this step (given back to the budget); does nothing and
        returns None when all of them together would not free enough."""
        normal = [r for r in self.running if not r.high]
        if self.pool.num_free + sum(len(r.block_ids) for r in normal) - need < self.watermark_blocks:
            return None
        returned = 0
        while self.pool.num_free - need < self.watermark_blocks:
            victim = normal.pop()
            self.running.remove(victim)
            returned += self._unschedule(scheduled, victim)
            self._preempt(victim)
            preempted.append(victim)
        return returned

    def waiting_demand_ahead(self, arrival_time: float, priority: int = Priority.NORMAL) -> int:
        """Blocks the waiting requests that a fresh request of ``priority`` arriving at ``arrival_time`` would queue
        behind need."""
        key: QueueKey = (priority_rank(priority), 1, arrival_time, 1 << 62)
        return sum(self.demand_blocks(r) for r in self.waiting if r.queue_key < key)

    @staticmethod
    def _is_prefill(req: SimRequest, num_new: int) -> bool:
        return num_new > 1 or req.num_computed_tokens < len(req.spec.prompt_token_ids)
