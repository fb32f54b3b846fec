"""EtcdClient retries a write etcd refused because its auth-store revision went stale (review 9 F9).

Under `llumnix serve`'s etcd auth every certificate issued adds users and roles; a request stamped before such a
change is refused at apply time ("auth: revision in header is old") without effect, so a retry is safe. Before, a
llumlet registering while the next instance's certificate was issued exited at start.
"""

from __future__ import annotations

import grpc
import pytest

from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.errors import EtcdRequestError


def refusal(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


async def test_a_request_refused_for_a_stale_auth_revision_is_retried_on_the_same_endpoint() -> None:
    refusals = [refusal(grpc.StatusCode.UNKNOWN, "etcdserver: auth: revision in header is old")]
    calls = 0

    async def invoke(stubs: object, timeout: float) -> str:
        nonlocal calls
        calls += 1
        if refusals:
            raise refusals.pop()
        return "applied"

    async with EtcdClient(["127.0.0.1:1", "127.0.0.1:2"]) as client:
        assert await client.call("put", invoke) == "applied"
        assert calls == 2 and client.current_endpoint == "127.0.0.1:1"  # no failover: the endpoint is fine


async def test_other_refusals_are_not_retried() -> None:
    calls = 0

    async def invoke(stubs: object, timeout: float) -> str:
        nonlocal calls
        calls += 1
        raise refusal(grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")

    async with EtcdClient(["127.0.0.1:1"]) as client:
        with pytest.raises(EtcdRequestError, match="PERMISSION_DENIED"):
            await client.call("put", invoke)
    assert calls == 1
