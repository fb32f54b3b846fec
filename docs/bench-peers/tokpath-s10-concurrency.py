"""How many requests an instance decodes at once under ``bench peers``'s workload (session 10): replays the seeded
arrivals with a fixed model of each request's life (first token ``--ttft`` s after arrival, then one token per
``--tpot`` s; the instances' dispatch balanced, so a quarter each) and prints, per number of running requests per
instance, the share of the run's time and of its tokens, and the mean over three phases of the run. Tokens per engine
step equal running requests per instance, so this says what a per-step cost is spread over.

    PYTHONPATH=<tree> .venv/bin/python docs/bench-peers/tokpath-s10-concurrency.py
"""

from __future__ import annotations

import argparse
from collections import Counter

from pyllumnix.tools.workload import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="M-M:poisson:rate=4:n=100:len_max=1024")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--ttft", type=float, default=0.1)
    parser.add_argument("--tpot", type=float, default=0.047)
    args = parser.parse_args()
    arrivals = generate(args.workload, args.seed)
    spans = [(a.arrival_time_s + args.ttft, a.arrival_time_s + args.ttft + a.output_len * args.tpot) for a in arrivals]
    end = max(e for _, e in spans)
    tokens = sum(a.output_len for a in arrivals)
    print(f"arrivals end at {arrivals[-1].arrival_time_s:.1f} s, the last request ends at {end:.1f} s")
    print(f"{tokens} tokens, {tokens / len(arrivals):.0f} per request, {tokens / end:.0f}/s over the run")
    steps = [i * args.tpot for i in range(int(end / args.tpot) + 1)]
    running = [sum(1 for s, e in spans if s <= t < e) / args.instances for t in steps]
    time_share: Counter[int] = Counter()
    token_share: Counter[int] = Counter()
    for n in running:
        time_share[round(n)] += 1
        token_share[round(n)] += n
    for k in sorted(time_share):
        print(
            f"~{k:2d} running per instance: {100 * time_share[k] / len(running):5.1f} % of the time, "
            f"{100 * token_share[k] / sum(running):5.1f} % of the tokens"
        )
    print(f"mean running per instance (= tokens per step): {sum(running) / len(running):.1f}")
    last = arrivals[-1].arrival_time_s
    for lo, hi in ((0.0, last), (last, last + 20), (last + 20, end)):
        part = [n for t, n in zip(steps, running, strict=True) if lo <= t < hi]
        print(f"{lo:5.1f}-{hi:5.1f} s: {sum(part) / max(1, len(part)):.1f} running per instance")


if __name__ == "__main__":
    main()
