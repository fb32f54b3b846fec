"""The load-report cadence both ends of a load stream agree on: the llumlet's reporter decides from it how often to
keep alive, the leader how long a silent instance may stay silent. It lives here, below both, because the data plane
may import only the pure policy core of the control plane (``tests/test_layers.py``).
"""

from __future__ import annotations

from pyllumnix.protos.llumnix.v1 import common_pb2

# A quiet instance (``load_is_quiet``) keeps alive every this many report intervals (1 s at 50 ms), not every 3.
QUIET_KEEPALIVE_EVERY = 20


def load_is_quiet(load: common_pb2.InstanceLoad) -> bool:
    """Nothing on the instance: no request in any phase, no migration either way, no block reserved for one. Its
    load can then change only through something sent to it (a request, a reservation) or an order (drain, cordon),
    so the llumlet keeps alive slowly (``QUIET_KEEPALIVE_EVERY``) and the leader waits for it accordingly."""
    return not (
        load.requests
        or load.num_running
        or load.num_waiting
        or load.migrating_in
        or load.migrating_out
        or load.reserved_blocks
    )
