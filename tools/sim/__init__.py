"""Discrete-event cluster simulator: the live policy core, sim engines and migration plan on a virtual clock."""

from pyllumnix.tools.sim.cluster import ClusterSimulator, SimResult, simulate
from pyllumnix.tools.sim.config import SimConfig, TransferModel
from pyllumnix.tools.sim.runner import load_workload, run_case, write_run
from pyllumnix.tools.sim.summary import run_summary

__all__ = [
    "ClusterSimulator",
    "SimConfig",
    "SimResult",
    "TransferModel",
    "load_workload",
    "run_case",
    "run_summary",
    "simulate",
    "write_run",
]
