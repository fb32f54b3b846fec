"""Ad hoc (session 7): the live demonstration's simulation with the live overheads (1.2 +- 0.6 ms per step, 120 ms per
migration stage), per seed and jitter draw: how stable its predicted prefill ratios are.

    PYTHONPATH=<snapshot> .venv/bin/python calibrated.py L-L:poisson:rate=1.1:n=500 0,1,2 0,1
"""

import sys

from pyllumnix.tools.sim.live_demo import predict

workload = sys.argv[1]
seeds = [int(x) for x in sys.argv[2].split(",")]
jitters = [int(x) for x in sys.argv[3].split(",")]
overhead = {"llumnix": 1.2, "infaas++": 1.2}
spread = {"llumnix": 0.6, "infaas++": 0.6}
for s in seeds:
    for j in jitters:
        out = predict(workload, s, 4, overhead_ms=overhead, overhead_sd_ms=spread, jitter_seed=j, stage_ms=120.0)
        a, b = out["infaas++"]["overall"]["prefill_s"], out["llumnix"]["overall"]["prefill_s"]
        print(
            f"{workload} s{s} j{j}: P99 {a['p99']:.1f}/{b['p99']:.1f} = {a['p99'] / b['p99']:.2f}x"
            f"  mean {a['mean']:.2f}/{b['mean']:.2f} = {a['mean'] / b['mean']:.2f}x",
            flush=True,
        )
