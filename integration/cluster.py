"""Helpers for integration tests that run a whole cluster: find the leader, dispatch and add like a frontend does.

Components run on mutual TLS with role checks (the ``procs`` fixture gives them the session's PKI), so the test
process dials them with :func:`dial`: as a given role, or as whichever role each called method allows
(:class:`RoutedChannel`). Plaintext when no PKI is set (the ``procs`` fixture sets it for each test).

The test clusters' etcd serves TLS with client-certificate auth from the session PKI, as ``llumnix serve`` runs it
(:func:`etcd_server_tls`): components take :func:`etcd_urls` (``https://``) as ``--etcd``, and the test process reads
and writes it with :func:`harness_etcd_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from pyllumnix.clients.channel import TlsConfig
from pyllumnix.infra.etcd.client import EtcdClient, EtcdTls
from pyllumnix.infra.etcd.election import Election
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd, EtcdServerTls
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.security.apikeys import ApiKeyStore
from pyllumnix.infra.security.authz import ANY_ROLE, PROJECT_ROLES
from pyllumnix.infra.security.bootstrap import ClusterSecurity
from pyllumnix.infra.security.fencing import term_metadata
from pyllumnix.infra.security.runtime import INSECURE, SecuritySettings, identity_of, open_channel, split_etcd_endpoints
from pyllumnix.protos.llumnix.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    llumlet_pb2,
    llumlet_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from pyllumnix.tools.launch import session_pki

_HARNESS: dict[str, ClusterSecurity | None] = {"pki": None}


def etcd_server_tls() -> EtcdServerTls:
    """TLS for a test cluster's etcd as ``llumnix serve`` gives its own: the session PKI's etcd certificate, client
    certificates required (the admin one for the embedded cluster's health checks)."""
    pki: ClusterSecurity = session_pki("llumnix")
    server, health = pki.ensure("etcd", "etcd"), pki.ensure("admin", "admin")
    return EtcdServerTls(server.ca, server.cert, server.key, health.cert, health.key)


def etcd_urls(etcd: EmbeddedEtcd) -> list[str]:
    """The endpoints a component's ``--etcd`` takes: ``https://`` ones for an etcd serving TLS."""
    return [f"https://{e}" for e in etcd.endpoints] if etcd.tls is not None else list(etcd.endpoints)


def harness_etcd_client(endpoints: Sequence[str], **kwargs: Any) -> EtcdClient:
    """The test process's etcd client: for ``https://`` endpoints over TLS with the session PKI's harness admin
    certificate, as a component's (``runtime.etcd_client``); plaintext for plain ones."""
    plain, tls = split_etcd_endpoints(endpoints)
    if not tls:
        return EtcdClient(plain, **kwargs)
    paths = session_pki("llumnix").ensure("admin", "harness")
    return EtcdClient(plain, tls=EtcdTls.from_files(paths.ca, paths.cert, paths.key), **kwargs)


def set_harness_pki(pki: ClusterSecurity | None) -> None:
    """The PKI the test process takes its certificates from (None: plaintext)."""
    _HARNESS["pki"] = pki


def harness_security(role: str) -> SecuritySettings:
    """This test process acting as ``role`` (certificate ``<role>-harness`` issued on first use)."""
    pki = _HARNESS["pki"]
    if pki is None:
        return INSECURE
    paths = pki.ensure(role, "harness")
    return SecuritySettings(paths, identity_of(paths.cert), tls_dir=Path(pki.directory))


# A test may call anything; each call goes out with a certificate of a role the role table allows for it.
ROLE_PREFERENCE = ("admin", "scheduler", "frontend", "llumlet", "client")


# Orders a llumlet takes only from a leader, with its term (``infra.security.fencing``). Tests that order directly
# run no scheduler, so the harness is the leader of term 1 (a real leader's term, an etcd revision, is higher); a
# llumlet registered in etcd admits only a term etcd proves, so such a test leads with ``harness_leadership``.
LEADER_ORDERS = ("/llumnix.v1.LlumletService/MigrateOut", "/llumnix.v1.LlumletService/SetInstanceState")
HARNESS_TERM = 1


@contextlib.asynccontextmanager
async def harness_leadership(etcd_endpoints: Sequence[str], cluster: str) -> AsyncIterator[int]:
    """The harness as the scheduler leader of ``cluster`` (a real election key naming its certificate's id), for a
    test that orders llumlets registered in etcd without running a scheduler: they admit only a term the election
    proves is the caller's (attack 9 B3). Yields the term to send (``term_metadata``); resigns on exit."""
    async with harness_etcd_client(etcd_endpoints) as etcd:
        leadership = await Election(etcd, KeyLayout(cluster).election_prefix()).campaign(
            admin_pb2.SchedulerReplica(replica_id="harness").SerializeToString()
        )
        try:
            yield leadership.revision
        finally:
            await leadership.resign()


def _with_term(call: Any) -> Any:
    """A unary multicallable that sends the harness's leader term unless the caller passes metadata itself."""

    def invoke(request: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("metadata") is None:
            kwargs["metadata"] = term_metadata(HARNESS_TERM)
        return call(request, *args, **kwargs)

    return invoke


class RoutedChannel:
    """Quacks like a grpc.aio channel for generated stubs: each method is called over a mutual-TLS channel whose
    certificate has a role allowed to call it (``PROJECT_ROLE_TABLE``), so a test's stub may AddRequest (frontend),
    MigrateOut (scheduler) and GetLoad (admin) on one "channel" while the servers keep checking every role; orders
    carry the harness's leader term."""

    def __init__(self, address: str, options: Any = ()) -> None:
        self._address = address
        self._options = options
        self._channels: dict[str, grpc.aio.Channel] = {}

    def for_method(self, method: str) -> grpc.aio.Channel:
        allowed = PROJECT_ROLES.allowed(method) or frozenset()
        role = next((r for r in ROLE_PREFERENCE if r in allowed or ANY_ROLE in allowed), "admin")
        channel = self._channels.get(role)
        if channel is None:
            channel = self._channels[role] = open_channel(
                self._address, self._options, peer=None, settings=harness_security(role)
            )
        return channel

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        call = self.for_method(method).unary_unary(method, *args, **kwargs)
        return _with_term(call) if method in LEADER_ORDERS else call

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.for_method(method).unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.for_method(method).stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.for_method(method).stream_stream(method, *args, **kwargs)

    async def close(self, grace: float | None = None) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close(grace)

    async def __aenter__(self) -> RoutedChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def dial(address: str, role: str | None = None, options: Any = ()) -> Any:
    """A channel to a component: as ``role``, or (None) as whichever role each called method allows; plaintext when
    the harness has no PKI."""
    if _HARNESS["pki"] is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    if role is None:
        return RoutedChannel(address, options)
    return open_channel(address, options, peer=None, settings=harness_security(role))


async def leader_of(addresses: list[str], timeout: float = 10.0) -> admin_pb2.GetLeaderResponse:
    """The leader as the first reachable replica reports it, once one is elected."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for address in addresses:
            try:
                async with dial(address, "admin") as ch:
                    reply: admin_pb2.GetLeaderResponse = await admin_pb2_grpc.AdminServiceStub(ch).GetLeader(
                        admin_pb2.GetLeaderRequest(), timeout=1
                    )
                if reply.leader_address:
                    return reply
            except grpc.aio.AioRpcError:
                continue
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no leader among {addresses}")


async def list_instances(leader: str) -> list[scheduler_pb2.InstanceStatus]:
    async with dial(leader) as ch:
        reply = await admin_pb2_grpc.AdminServiceStub(ch).ListInstances(admin_pb2.ListInstancesRequest(), timeout=2)
    return list(reply.instances)


async def submit(leader: str, request_id: str, sink: str, prompt_len: int, max_tokens: int, priority: int = 1) -> str:
    """Dispatch through the leader, then AddRequest on the chosen llumlet; returns the instance id."""
    async with dial(leader, "frontend") as ch:
        choice = await scheduler_pb2_grpc.SchedulerServiceStub(ch).Dispatch(
            scheduler_pb2.DispatchRequest(
                request_id=request_id,
                priority=priority,  # type: ignore[arg-type]
                num_prompt_tokens=prompt_len,
                max_tokens=max_tokens,
            ),
            timeout=2,
        )
    await add_request(choice.grpc_address, request_id, sink, prompt_len, max_tokens, priority)
    instance_id: str = choice.instance_id
    return instance_id


async def add_request(
    address: str, request_id: str, sink: str, prompt_len: int, max_tokens: int, priority: int = 1
) -> None:
    request = common_pb2.EngineRequest(
        request_id=request_id,
        prompt_token_ids=[(i * 7 + len(request_id)) % 200 + 1 for i in range(prompt_len)],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, seed=hash(request_id) % 1000, ignore_eos=True),
        priority=priority,  # type: ignore[arg-type]
        frontend_address=sink,
        arrival_time=time.time(),
    )
    async with dial(address, "frontend") as ch:
        await llumlet_pb2_grpc.LlumletServiceStub(ch).AddRequest(
            llumlet_pb2.AddRequestRequest(request=request), timeout=5
        )


async def get_load(address: str) -> common_pb2.InstanceLoad:
    async with dial(address) as ch:
        reply = await llumlet_pb2_grpc.LlumletServiceStub(ch).GetLoad(llumlet_pb2.GetLoadRequest(), timeout=2)
    load: common_pb2.InstanceLoad = reply.load
    return load


async def api_key(etcd_endpoints: list[str], cluster: str, role: str = "user") -> str:
    """A new API key of ``role`` in the test cluster's key store (secure frontends want one)."""
    name = f"test-{role}-{time.monotonic_ns()}"
    async with harness_etcd_client(etcd_endpoints) as etcd:
        key, _ = await ApiKeyStore(etcd, KeyLayout(cluster)).create(name, role)
    return key


async def client_tls(etcd_endpoints: list[str], cluster: str) -> TlsConfig | None:
    """What a user's client needs for a frontend's public port: the cluster CA and an API key (None: plaintext)."""
    pki = _HARNESS["pki"]
    if pki is None:
        return None
    return TlsConfig(root_certificates=pki.ca_cert.read_bytes(), api_key=await api_key(etcd_endpoints, cluster))


async def http_headers(etcd_endpoints: list[str], cluster: str) -> dict[str, str]:
    """The ``Authorization`` header for a secure frontend's OpenAI API (none when plaintext)."""
    if _HARNESS["pki"] is None:
        return {}
    return {"Authorization": f"Bearer {await api_key(etcd_endpoints, cluster)}"}


def llmctl_tls_args() -> list[str]:
    """``llmctl``'s TLS flags with the harness's admin certificate (none when plaintext)."""
    settings = harness_security("admin")
    if settings.paths is None:
        return []
    p = settings.paths
    return ["--ca", str(p.ca), "--cert", str(p.cert), "--key", str(p.key)]
