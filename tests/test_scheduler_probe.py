"""The liveness signal the scheduler acts on: only a refused connection proves a process gone."""

from __future__ import annotations

import pytest

from pyllumnix.control_plane.scheduler.replica import ReplicaTiming, parse_instance_info, port_refuses
from pyllumnix.protos.llumnix.v1 import common_pb2
from tests.test_clients_fakes import Blackhole, dead_address


async def test_refused_open_and_unknown() -> None:
    assert await port_refuses(dead_address(), 0.5) is True  # nobody listens: the process is gone
    hung = Blackhole()  # a stalled process: the kernel still completes the handshake
    try:
        assert await port_refuses(hung.address, 0.5) is False
    finally:
        hung.close()
    assert await port_refuses("no-port", 0.5) is None
    assert await port_refuses("host.invalid:1", 0.5) is None


def test_registry_value_checks() -> None:
    info = common_pb2.InstanceInfo(instance_id="i-1", grpc_address="127.0.0.1:5")
    assert parse_instance_info("i-1", info.SerializeToString()) == info
    with pytest.raises(ValueError, match="not an InstanceInfo"):
        parse_instance_info("i-1", b"not a protobuf")
    with pytest.raises(ValueError, match="is not the key's"):
        parse_instance_info("i-2", info.SerializeToString())
    with pytest.raises(ValueError, match="no grpc_address"):
        parse_instance_info("i-1", common_pb2.InstanceInfo(instance_id="i-1").SerializeToString())


def test_timing_defaults_and_checks() -> None:
    t = ReplicaTiming()
    # The lease survives a stall of up to TTL - renewal period minus a renewal round trip: >= 3 s with margin.
    assert t.election_ttl - t.election_renew_every >= 4.0
    assert t.leader_probe_interval * t.leader_probe_failures <= 1.0 and t.instance_grace == 10.0
    with pytest.raises(ValueError):
        ReplicaTiming(election_ttl=0)
    with pytest.raises(ValueError):
        ReplicaTiming(leader_probe_failures=0)
    with pytest.raises(ValueError, match="election_renew_every"):
        ReplicaTiming(election_ttl=2, election_renew_every=2.0)
