import sys
from pyllumnix.tools.sim.live_demo import predict
w = sys.argv[1]; seeds = [int(x) for x in sys.argv[2].split(",")]; JS = [int(x) for x in sys.argv[3].split(",")]
for s in seeds:
    for j in JS:
        out = predict(w, s, 4, overhead_ms={"llumnix": 1.2, "infaas++": 1.2}, overhead_sd_ms={"llumnix": 0.6, "infaas++": 0.6}, jitter_seed=j, stage_ms=120.0)
        a, b = out["infaas++"]["overall"]["prefill_s"], out["llumnix"]["overall"]["prefill_s"]
        print(f"{w} s{s} j{j}: P99 {a['p99']:.1f}/{b['p99']:.1f} = {a['p99']/b['p99']:.2f}x  mean {a['mean']:.2f}/{b['mean']:.2f} = {a['mean']/b['mean']:.2f}x", flush=True)
