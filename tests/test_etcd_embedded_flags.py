"""#20 idle cost: a single embedded etcd member (``llumnix serve``, most tests) ticks its raft at 100 ms, not 50 ms:
it has no leader to replace quickly, and the ticker was most of an idle member's CPU. A fast cluster of several members
keeps 50 ms (failover in well under a second). Checked on the command lines (no process started). Also the ports
free_port hands out for components started later."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyllumnix.infra.etcd import embedded
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd


@pytest.fixture
def clusters() -> Iterator[tuple[EmbeddedEtcd, EmbeddedEtcd, EmbeddedEtcd]]:
    made = (EmbeddedEtcd(1), EmbeddedEtcd(3), EmbeddedEtcd(1, fast=False))
    try:
        yield made
    finally:
        for etcd in made:
            etcd.stop()  # nothing started: removes the temporary data dirs


def flags(etcd: EmbeddedEtcd) -> dict[str, str]:
    cmd = etcd._command(etcd.members[0], "new")
    return dict(arg[2:].split("=", 1) for arg in cmd if arg.startswith(("--heartbeat", "--election")))


def test_a_single_member_ticks_at_100_ms_and_a_cluster_at_50(
    clusters: tuple[EmbeddedEtcd, EmbeddedEtcd, EmbeddedEtcd],
) -> None:
    single, three, durable = clusters
    assert flags(single) == {"heartbeat-interval": "100", "election-timeout": "500"}  # before: 50 / 250
    assert flags(three) == {"heartbeat-interval": "50", "election-timeout": "250"}
    assert flags(durable) == {}, "fast=False: etcd's own defaults"
    assert "--unsafe-no-fsync" in single._command(single.members[0], "new")


def test_free_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    """A fixed port chosen ahead of a component's start: below the kernel's ephemeral range (no outgoing connection
    or ``bind(0)`` takes it meanwhile) and never handed out twice. Before, ``bind(0)`` drew it from that range."""
    low, _ = embedded._ephemeral_range()
    ports = [embedded.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(port < low for port in ports), [p for p in ports if p >= low][:5]
