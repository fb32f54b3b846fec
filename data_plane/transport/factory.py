"""Chooses a transport by name; UCX when the ucxx wheel loads, TCP otherwise."""

from __future__ import annotations

import functools
from typing import Any, Literal

from pyllumnix.data_plane.transport.base import Transport, TransportError

TransportKind = Literal["ucx", "tcp", "inproc", "auto"]


@functools.cache
def ucx_available() -> bool:
    """True if ``ucxx`` imports with its native libraries (it is an optional extra)."""
    from pyllumnix.data_plane.transport.ucx import configure_ucx_env, import_ucxx

    configure_ucx_env()  # ucxx's import sets its own (GPU-minded) defaults for whatever is still unset
    try:
        import_ucxx()
    except TransportError:
        return False
    return True


def make_transport(kind: TransportKind | str, **opts: Any) -> Transport:
    """A new, not yet started endpoint. ``auto`` picks UCX if available, else TCP. Options go to the constructor:
    ucx: ``tls``, ``rescue_interval``, ``device``, ``host`` (its interface only); tcp: ``host``, ``port``,
    ``advertise_host``; inproc: ``name``, ``cost_fn``."""
    if kind == "auto":
        kind = "ucx" if ucx_available() else "tcp"
    if kind == "ucx":
        if not ucx_available():
            raise TransportError("ucx transport requested but ucxx is not importable (install pyllumnix[ucx])")
        from pyllumnix.data_plane.transport.ucx import UcxTransport

        return UcxTransport(**opts)
    if kind == "tcp":
        from pyllumnix.data_plane.transport.tcp import TcpTransport

        return TcpTransport(**opts)
    if kind == "inproc":
        from pyllumnix.data_plane.transport.inproc import InprocTransport

        return InprocTransport(**opts)
    raise ValueError(f"unknown transport kind {kind!r} (ucx, tcp, inproc, auto)")
