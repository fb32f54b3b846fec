"""One way to start a grpc.aio server: the given services plus health checking (and reflection when asked for).

Every process of the system (scheduler replicas, llumlets, frontends, test sinks) starts its server here, so health
is always on, the bound port is always reported the same way, and security is applied in one place: with the
process's security settings (``infra.security.runtime``) secure, the port requires CA-signed client certificates
and a ``RoleInterceptor`` checks each call's method against the caller's role. Reflection is off unless the settings
(``--reflection``) or the caller ask for it: it hands out the whole schema to anyone who may connect.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pyllumnix.infra import tracing
from pyllumnix.infra.security import runtime
from pyllumnix.infra.security.runtime import SecuritySettings

# (add_XServicer_to_server, servicer instance, full service name, e.g. "llumnix.v1.LlumletService")
ServiceBinding = tuple[Callable[[Any, grpc.aio.Server], None], Any, str]

DEFAULT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.so_reuseport", 0),
)


# Bind hosts that name every interface rather than one host.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


def host_port(host: str, port: int) -> str:
    """``host:port`` as gRPC spells a bind address or a target: an IPv6 literal goes in brackets (``::1:0`` is no
    address gRPC can bind, and ``:::0`` no name it can resolve)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def advertised_host(host: str, advertise_host: str = "") -> str:
    """The name peers use for a process bound on ``host``: ``advertise_host`` if given, else ``host``, else (a
    wildcard bind names no host) this machine's host name, the name ``llumnix serve`` puts in the certificates."""
    if advertise_host:
        return advertise_host
    return socket.gethostname() if host in WILDCARD_HOSTS else host


def advertised_address(host: str, advertise_host: str, port: int) -> str:
    """``host:port`` peers dial to reach a server bound on ``host`` (see :func:`advertised_host`), as gRPC spells a
    target: an IPv6 literal in brackets (``::1:5000`` is no target)."""
    return host_port(advertised_host(host, advertise_host), port)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    # The host it was bound on, as given to ``start_server``.
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        """Where a client on this machine dials the server: the host it is bound on, or loopback for a wildcard bind
        (which names no host; peers on other machines need the name the process advertises, ``--advertise-host``)."""
        return host_port("127.0.0.1" if self.host in WILDCARD_HOSTS else self.host, self.port)

    async def set_serving(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(service, status)

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    bindings: Sequence[ServiceBinding],
    host: str = "127.0.0.1",
    port: int = 0,
    options: Sequence[tuple[str, int]] = DEFAULT_OPTIONS,
    *,
    security: SecuritySettings | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: Any = None,
    reflection_on: bool | None = None,
) -> RunningServer:
    """Starts a server on host:port (port 0 picks a free one) with health; all services SERVING.

    ``security`` defaults to the process's settings. ``credentials`` replaces the port's (a public port: server-only
    TLS, callers authenticated by ``interceptors`` such as API keys, no role check); ``reflection_on`` overrides the
    settings' ``--reflection``.
    """
    settings = security if security is not None else runtime.current()
    chain = list(interceptors)
    if credentials is None:
        credentials = runtime.server_port_credentials(settings)
        chain = [*runtime.server_interceptors(settings), *chain]
    chain = [*tracing.server_interceptors(), *chain]  # continues callers' traces (none when tracing is off)
    server = grpc.aio.server(options=list(options), interceptors=chain or None)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health.SERVICE_NAME]
    for add, servicer, name in bindings:
        add(servicer, server)
        names.append(name)
    if settings.reflection if reflection_on is None else reflection_on:
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    address = host_port(host, port)
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    await server.start()
    for _, _, name in bindings:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server=server, port=bound, health=health_servicer, host=host)
