"""Real-time fidelity of the sim engine: for a few batch shapes, run steps paced by the real clock exactly as a live
llumlet does (``StepPacer``: compute the step, then sleep out the rest of its modelled duration) and compare the
measured wall time per step with the modelled one. Payload bytes are on, so the measured time includes writing real KV.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from pyllumnix.data_plane.engine.base import RequestSpec, Sampling, StepResult
from pyllumnix.data_plane.engine.clock import RealClock, StepPacer
from pyllumnix.data_plane.engine.profile import PROFILES, Profile, get_profile
from pyllumnix.data_plane.engine.sim import SimEngine
from pyllumnix.tools.progress import Steps, progress_bar

TARGET = 0.05
PREWARM_BLOCKS = 128


@dataclass(frozen=True)
class Shape:
    name: str
    # Prefill shapes: a fresh request of ``prompt`` tokens per measured step. Decode shapes: ``batch`` requests of
    # ``prompt`` tokens prefilled first (not measured), then ``steps`` decode steps measured.
    batch: int
    prompt: int
    steps: int

    @property
    def is_prefill(self) -> bool:
        return self.batch == 0


# Live KV stays within 128 blocks per shape (2k tokens, 1 GiB of payload at 7B's 8 MiB blocks), all taken from the
# pre-warmed spares: on this machine a block array touched for the first time mid-step cost up to ~20 ms (page faults
# and huge-page compaction), which no modelled step absorbs.
SHAPES = (
    Shape("prefill-256", 0, 256, 10),
    Shape("prefill-1024", 0, 1024, 5),
    Shape("decode-b1-ctx1024", 1, 1024, 40),
    Shape("decode-b8-ctx128", 8, 128, 40),
    Shape("decode-b32-ctx32", 32, 32, 30),
)


def fit_shape(shape: Shape, profile: Profile, budget_blocks: int = PREWARM_BLOCKS) -> Shape | None:
    """``shape`` scaled down (whole blocks of prompt, fewer requests) to what ``profile`` can run as measured: a
    prompt plus its generated tokens within ``max_model_len``, a decode batch within ``max_num_seqs`` and prefilled
    in one step (``max_num_batched_tokens``), live KV within ``budget_blocks`` (the pre-warmed spares, or the whole
    cache of a small profile). None when nothing of it fits. A shape that fits as it is comes back unchanged."""
    bs = profile.block_size
    blocks = min(budget_blocks, profile.total_blocks)

    def fits(batch: int, prompt: int, generated: int) -> bool:
        return (
            prompt + generated <= profile.max_model_len
            and max(batch, 1) * prompt <= profile.max_num_batched_tokens
            and max(batch, 1) * -(-(prompt + generated) // bs) <= blocks
        )

    batch = min(shape.batch, profile.max_num_seqs)
    generated = 1 if shape.is_prefill else shape.steps + 2
    prompt = shape.prompt
    if not fits(batch, prompt, generated):
        prompt -= prompt % bs
        while prompt >= bs and not fits(batch, prompt, generated):
            prompt -= bs
        if prompt < bs:
            return None
    if (batch, prompt) == (shape.batch, shape.prompt):
        return shape
    name = f"prefill-{prompt}" if shape.is_prefill else f"decode-b{batch}-ctx{prompt}"
    return Shape(name, batch, prompt, shape.steps)


def shapes_for(profile: Profile, shapes: tuple[Shape, ...] = SHAPES) -> tuple[Shape, ...]:
    """The shapes that ``profile`` can run (see ``fit_shape``), without duplicates; the 7B profile runs SHAPES."""
    fitted: dict[str, Shape] = {}
    for shape in shapes:
        fit = fit_shape(shape, profile)
        if fit is not None:
            fitted.setdefault(fit.name, fit)
    return tuple(fitted.values())


@dataclass(frozen=True)
class ShapeResult:
    shape: str
    steps: int
    modelled_ms: float
    measured_ms: float
    compute_ms: float
    ratio: float


class TimedSimEngine(SimEngine):
    """Accumulates the wall time spent inside ``step`` (the engine's own work, before the pacer's sleep)."""

    compute_s = 0.0

    def step(self, now: float) -> StepResult:
        t0 = time.perf_counter()
        result = super().step(now)
        self.compute_s += time.perf_counter() - t0
        return result


def _spec(rid: str, prompt: int, max_tokens: int) -> RequestSpec:
    sampling = Sampling(max_tokens=max_tokens, ignore_eos=True)
    return RequestSpec(rid, tuple(range(1, prompt + 1)), sampling)


async def run_shape(profile_name: str, shape: Shape, payload: bool, steps: Steps | None = None) -> ShapeResult:
    # Pre-warmed spare block arrays, as a live sim llumlet has after start-up (steady state reuses freed arrays).
    engine = TimedSimEngine(profile_name, payload=payload, prewarm_blocks=PREWARM_BLOCKS)
    clock = RealClock()
    pacer = StepPacer(engine, clock)
    if shape.is_prefill:
        engine.add_request(_spec("warm", shape.prompt, 1), clock.now())
    else:
        for i in range(shape.batch):
            engine.add_request(_spec(f"d{i}", shape.prompt, shape.steps + 2), clock.now())
    steps = steps or Steps()
    steps.describe(shape.name)
    await pacer.step()  # warm-up (decode shapes: their prefill), not measured
    steps.step(shape.name)
    engine.compute_s = 0.0
    modelled = 0.0
    start = clock.now()
    for k in range(shape.steps):
        if shape.is_prefill:
            engine.add_request(_spec(f"p{k}", shape.prompt, 1), clock.now())
        result = await pacer.step()
        modelled += result.duration
        steps.step(shape.name)
    measured = clock.now() - start
    n = shape.steps
    return ShapeResult(
        shape.name, n, modelled / n * 1000, measured / n * 1000, engine.compute_s / n * 1000, measured / modelled
    )


async def run_all(
    profile_name: str, payload: bool, shapes: tuple[Shape, ...] = SHAPES, steps: Steps | None = None
) -> list[ShapeResult]:
    return [await run_shape(profile_name, s, payload, steps) for s in shapes]


@click.command("engine")
@click.option("--profile", "profile_name", default="llama-7b-a10", type=click.Choice(sorted(PROFILES)))
@click.option("--payload/--no-payload", default=True, help="Write real KV bytes (as a live sim llumlet does).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def bench_engine(profile_name: str, payload: bool, json_path: Path | None) -> None:
    """Modelled vs measured step time of the sim engine driven in real time (JSON on stdout; the progress bar, on a
    terminal only, and the summary line on stderr)."""
    profile = get_profile(profile_name)
    shapes = shapes_for(profile)
    if not shapes:
        raise click.BadParameter(
            f"profile {profile.name!r} is too small for any benchmark shape", param_hint="--profile"
        )
    with progress_bar(refresh_per_second=2) as bar:  # few redraws: the measured steps are paced in real time
        steps = Steps(bar, "bench engine", total=sum(s.steps + 1 for s in shapes))
        results = asyncio.run(run_all(profile_name, payload, shapes, steps))
    worst = max(abs(r.ratio - 1) for r in results)
    report = {
        "bench": "engine",
        "profile": profile.name,
        "payload": payload,
        "target_abs_error": TARGET,
        "worst_abs_error": worst,
        "within_target": worst <= TARGET,
        "shapes": [asdict(r) for r in results],
    }
    text = json.dumps(report, indent=2)
    click.echo(text)
    if json_path is not None:
        json_path.write_text(text + "\n")
    ratios = " ".join(f"{r.shape}={r.ratio:.3f}" for r in results)
    verdict = "OK" if worst <= TARGET else "OVER TARGET"
    click.echo(
        f"engine[{profile.name}, payload={payload}] measured/modelled: {ratios}; worst {worst:.1%} {verdict}", err=True
    )
