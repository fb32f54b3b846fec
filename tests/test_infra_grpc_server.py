"""``RunningServer.address`` is where the server can be dialled: the host it was bound on, not always 127.0.0.1.

Before the fix it always said ``127.0.0.1:<port>``: a server bound on another address (127.0.0.2 here; a node's own IP
in the multi-host driver, which worked around it) was unreachable at its ``address``; and an IPv6 host (``::1``, ``::``)
could not be bound at all (``::1:0`` is no address gRPC can bind).
"""

from __future__ import annotations

import socket
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pyllumnix.infra.grpc_server import RunningServer, host_port, start_server


def ipv6_loopback() -> bool:
    """Whether this host can bind ::1 (containers without IPv6 cannot: the IPv6 cases skip). Shared by the IPv6
    tests (``tests/test_advertised_addresses.py``, ``integration/test_ipv6_addresses.py``)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize(
    ("host", "dialled_as"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.2"),
        pytest.param("::1", "[::1]", marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")),
    ],
)
async def test_the_address_is_the_bound_host_and_answers(host: str, dialled_as: str) -> None:
    """Old behaviour: 127.0.0.2 -> address 127.0.0.1:<port> (nothing listens there); ::1 -> bind failed (OSError)."""
    server = await start_server([], host=host)
    try:
        assert server.address == f"{dialled_as}:{server.port}"
        assert await serving(server.address)
    finally:
        await server.stop(None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", ""])
def test_a_wildcard_bind_is_dialled_on_loopback(host: str) -> None:
    """A wildcard names no host: a client on this machine dials loopback (checked without binding every interface)."""
    fake: Any = object()
    assert RunningServer(server=fake, port=5, health=fake, host=host).address == "127.0.0.1:5"


def test_host_port_brackets_ipv6_literals_only() -> None:
    assert host_port("::1", 7) == "[::1]:7"
    assert host_port("[::1]", 7) == "[::1]:7"
    assert host_port("fd00::2", 7) == "[fd00::2]:7"
    assert host_port("10.0.0.3", 7) == "10.0.0.3:7"
    assert host_port("node-a.example", 7) == "node-a.example:7"
