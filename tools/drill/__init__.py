"""``llumnix drill``: the control-plane failover drill as a product command.

It starts (or attaches to) a local cluster, runs streaming load with known seeds, injects one fault per scenario and
reports, per fault, how the cluster coped: time to a new leader, the longest gap without a first token, requests
lost / hung / altered / ended with a clear error, and KV blocks still held afterwards. Modules:

- ``scenarios``: the fault vocabulary and the parser of ``--scenario`` values (pure);
- ``report``: per-request outcomes, their classification against the fault-free reference run, per-scenario checks
  and the verdict, JSON and the readable summary (pure);
- ``load``: the streaming load (gRPC Generate), bursts, HTTP probes;
- ``cluster``: the processes the drill started (or the addresses it attached to) and the observers
  (leader, instances, blocks);
- ``faults``: injecting and healing each fault;
- ``runner`` / ``cli``: one scenario after another, then the verdict.
"""
