"""Component processes for integration tests: the same launcher ``llumnix serve`` uses."""

from __future__ import annotations

from pyllumnix.tools.launch import Component, Launcher

Processes = Launcher

__all__ = ["Component", "Processes"]
