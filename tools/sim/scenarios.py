"""The paper's cluster experiments as lists of runs over shared arrivals (generated once per workload, replayed for
every policy), with the paper's headline figures to print beside ours.

Rates are the paper's (PAPER.md) for 16 instances, scaled by ``instances / 16`` and by ``load_scale``: the sim
engine's LLaMA-7B profile serves these traces with far more headroom than the paper's testbed (steady-state KV use
is ~30-40 % of an instance at the paper's rates), so Fig. 11 defaults to a higher load to reach the regime where the
policies differ; the factor is printed with every result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyllumnix.tools.sim.config import SimConfig

# The artifact's rate ranges for 16 x 7B (PAPER.md); we take the middle of each.
PAPER_RATES = {"S-S": 35.0, "M-M": 7.7, "L-L": 2.9, "S-L": 4.25, "L-S": 16.0}


@dataclass(frozen=True)
class Case:
    """One simulated run: ``group`` names the workload point (rows share arrivals), ``label`` the policy column."""

    group: str
    label: str
    spec: str
    config: SimConfig
    x: float = 0.0  # the swept value of the group (rate, CV, threshold), for the plots


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    baseline: str
    cases: list[Case]
    x_label: str
    paper: list[tuple[str, str]] = field(default_factory=list)
    load_scale: float = 1.0
    seed: int = 0


def _rate(rate: float, instances: int, load_scale: float) -> float:
    return round(rate * instances / 16 * load_scale, 4)


def fig11(requests: int, instances: int, load_scale: float, seed: int) -> Scenario:
    """Llumnix vs INFaaS++ and round-robin: the paper's traces at their middle rate, plus a rate sweep on M-M."""
    policies = ("infaas++", "llumnix", "round-robin")
    points: list[tuple[str, str, float]] = []
    for trace in ("S-S", "M-M", "L-L"):
        r = _rate(PAPER_RATES[trace], instances, load_scale)
        points.append((f"{trace} rate={r:g}", f"{trace}:poisson:rate={r}:n={requests}", r))
    for base in (7.4, 8.0):
        r = _rate(base, instances, load_scale)
        points.append((f"M-M rate={r:g}", f"M-M:poisson:rate={r}:n={requests}", r))
    # Round-robin is the paper's naive baseline: no migration (the policy core would pair under it otherwise).
    cases = [
        Case(group, p, spec, SimConfig(instances=instances, policy=p, enable_migration=p == "llumnix", seed=seed), x)
        for group, spec, x in points
        for p in policies
    ]
    paper = [
        ("end-to-end mean / P99", "up to 1.5x / 1.6x better than INFaaS++"),
        ("prefill mean / P99", "up to 7.7x / 14.8x better"),
        ("decode P99", "up to 2.0x better"),
        ("preemption loss", "70.4 % lower on average"),
        ("fragmentation", "7.9 % (INFaaS++) vs 0.7 % (Llumnix)"),
    ]
    return Scenario(
        "paper-fig11", "Serving: Llumnix vs INFaaS++ / round-robin", "infaas++", cases, "rate (req/s)", paper,
        load_scale, seed,
    )  # fmt: skip


def fig13(requests: int, instances: int, load_scale: float, seed: int) -> Scenario:
    """10 % high priority, S-S, Gamma CV 2-8 at 26 req/s: priority-aware Llumnix vs Llumnix with priorities ignored."""
    cases: list[Case] = []
    r = _rate(26.0, instances, load_scale)
    for cv in (2, 4, 6, 8):
        spec = f"S-S:gamma:rate={r}:cv={cv}:n={requests}:priority_share=0.1"
        for label, aware in (("no-priority", False), ("priority", True)):
            config = SimConfig(instances=instances, policy="llumnix", priorities=aware, seed=seed)
            cases.append(Case(f"S-S cv={cv} rate={r:g}", label, spec, config, float(cv)))
    paper = [
        ("high-priority e2e mean", "1.2-1.5x better"),
        ("high-priority prefill mean / P99", "2.9-8.6x / 3.6-10x better"),
        ("high-priority decode mean / P99", "1.2-1.5x / 1.3-2.2x better"),
        ("normal requests (e2e / prefill / decode)", "at most 4.5 % / 13 % / 2 % worse"),
    ]
    return Scenario(
        "paper-fig13", "Priorities: priority-aware vs priorities ignored", "no-priority", cases, "Gamma CV", paper,
        load_scale, seed,
    )  # fmt: skip


def fig14(requests: int, instances: int, load_scale: float, seed: int) -> Scenario:
    """Auto-scaling 1-16 instances starting at 8 (``instances`` is the max), L-L: Poisson 2-3 req/s, Gamma CV 2-6
    at 2 req/s, and the threshold sweep (scale-up 5-85, scale-down = up + 50) at Poisson 2.5 req/s."""
    top = instances
    start = max(1, top // 2)
    cases: list[Case] = []

    def config(policy: str, up: float = 10.0) -> SimConfig:
        return SimConfig(
            instances=start, policy=policy, autoscale=True, min_instances=1, max_instances=top,
            scale_up_threshold=up, scale_down_threshold=up + 50.0, seed=seed,
        )  # fmt: skip

    points = [(f"poisson rate={_rate(x, top, load_scale):g}", "poisson", _rate(x, top, load_scale), 0, x) for x in
              (2.0, 2.5, 3.0)]  # fmt: skip
    r2 = _rate(2.0, top, load_scale)
    points += [(f"gamma cv={cv} rate={r2:g}", "gamma", r2, cv, float(cv)) for cv in (2, 4, 6)]
    for group, kind, rate, cv, x in points:
        spec = f"L-L:{kind}:rate={rate}:n={requests}" + (f":cv={cv}" if cv else "")
        cases += [Case(group, p, spec, config(p), x) for p in ("infaas++", "llumnix")]
    r25 = _rate(2.5, top, load_scale)
    for up in (5, 25, 45, 65, 85):
        spec = f"L-L:poisson:rate={r25}:n={requests}"
        cases += [Case(f"threshold up={up} down={up + 50}", p, spec, config(p, up), float(up)) for p in
                  ("infaas++", "llumnix")]  # fmt: skip
    paper = [
        ("P99 prefill, Poisson", "up to 12.2x better with 16 % lower cost"),
        ("P99 prefill, Gamma", "up to 11x better with 18 % lower cost"),
        ("threshold sweep", "up to 36 % cost saving at similar tail latency"),
    ]
    return Scenario(
        "paper-fig14", "Auto-scaling: Llumnix vs INFaaS++ with the same scaler", "infaas++", cases, "rate / CV / up",
        paper, load_scale, seed,
    )  # fmt: skip


BUILDERS = {"paper-fig11": fig11, "paper-fig13": fig13, "paper-fig14": fig14}
# Defaults per scenario: (requests, instances, load_scale).
DEFAULTS: dict[str, tuple[int, int, float]] = {
    "paper-fig11": (3000, 16, 3.0),
    "paper-fig13": (3000, 16, 1.0),
    "paper-fig14": (1500, 16, 1.0),
}


def build(name: str, requests: int | None, instances: int | None, load_scale: float | None, seed: int) -> Scenario:
    if name not in BUILDERS:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(BUILDERS)}")
    n, inst, scale = DEFAULTS[name]
    return BUILDERS[name](requests or n, instances or inst, scale if load_scale is None else load_scale, seed)
