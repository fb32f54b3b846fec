"""How the drill reaches a cluster: the TLS + API key of a client context file (the one the drill writes for the local
cluster it starts, secure by default; or, in attach mode, e.g. the one ``llumnix serve`` wrote), or plaintext (a local
cluster started ``--insecure``, an attached plaintext one)."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pyllumnix.infra.security.ca import role_name


@dataclass(frozen=True)
class Credentials:
    # grpc channel credentials (TLS, with the API key as call credentials); None: plaintext.
    channel_credentials: Any = None
    # Call metadata for plaintext channels (the API key, when a plaintext context has one).
    metadata: tuple[tuple[str, str], ...] = ()
    http_headers: dict[str, str] = field(default_factory=dict)
    # CA of HTTPS endpoints (None: the system's).
    ca: Path | None = None
    description: str = "plaintext"
    # The context's CA is the cluster's (serve or the drill wrote it, naming no server): check servers' role names.
    role_names: bool = False
    server_name: str = ""  # the context's own server name, checked instead of the host when given

    def channel(
        self, address: str, options: Sequence[tuple[str, Any]] = (), *, peer: str | None = None
    ) -> grpc.aio.Channel:
        """A channel to ``address``; with ``role_names``, its server must hold ``peer``'s role (not just the host)."""
        if self.channel_credentials is None:
            return grpc.aio.insecure_channel(address, options=list(options))
        name = role_name(peer) if peer and self.role_names else self.server_name
        named = [("grpc.ssl_target_name_override", name)] if name else []
        return grpc.aio.secure_channel(address, self.channel_credentials, options=[*options, *named])

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Per-call metadata (only plaintext channels need it: TLS channels carry the key themselves)."""
        return self.metadata if self.channel_credentials is None and self.metadata else None

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.ca is None:
            return None
        return ssl.create_default_context(cafile=str(self.ca))


PLAINTEXT = Credentials()


def from_context(path: str | None, name: str | None) -> tuple[Credentials, Any]:
    """The credentials of a client context file (``path`` None: the default location) and the context itself.

    Raises ValueError with the reason when the file is missing or unusable."""
    from pyllumnix.infra.security.context import ContextError, context_path, load_context

    try:
        ctx = load_context(path, name)
    except ContextError as exc:
        raise ValueError(str(exc)) from exc
    if ctx is None:
        raise ValueError(f"no client context file at {path or context_path()}")
    creds = Credentials(
        channel_credentials=ctx.channel_credentials(),
        metadata=ctx.grpc_metadata(),
        http_headers=ctx.http_headers(),
        ca=ctx.ca,
        description=f"context {ctx.name!r} ({'TLS' if ctx.ca else 'plaintext'}{', API key' if ctx.api_key else ''})",
        role_names=ctx.checks_role_names(),
        server_name=ctx.server_name,
    )
    return creds, ctx
