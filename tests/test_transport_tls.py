"""The TCP data plane over mutual TLS (a secure llumlet's): bytes land exactly; a sender that is not a llumlet of the
cluster, or has no certificate, gets nothing delivered and the receiver keeps working."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from pyllumnix.data_plane.transport.base import TransportError
from pyllumnix.data_plane.transport.tcp import TcpTransport
from pyllumnix.infra.security.bootstrap import ClusterSecurity, bootstrap_local
from pyllumnix.infra.security.tls import client_ssl_context, server_ssl_context

DEADLINE = 5.0


def tls_transport(pki: ClusterSecurity, role: str, id: str) -> TcpTransport:
    paths = pki.ensure(role, id)
    return TcpTransport(ssl_server=server_ssl_context(paths), ssl_client=client_ssl_context(paths), cluster=pki.cluster)


@pytest.fixture
def pki(tmp_path: Path) -> ClusterSecurity:
    return bootstrap_local(tmp_path / "pki", "dp")


@pytest.fixture
async def receiver(pki: ClusterSecurity) -> AsyncIterator[TcpTransport]:
    transport = tls_transport(pki, "llumlet", "dst")
    await transport.start()
    yield transport
    await transport.close()


async def test_chunks_land_exactly_over_mutual_tls(pki: ClusterSecurity, receiver: TcpTransport) -> None:
    sender = tls_transport(pki, "llumlet", "src")
    await sender.start()
    try:
        rng = np.random.default_rng(7)
        for n, size in enumerate((1, 3 << 20, (5 << 20) + 17)):  # several TLS records and read slices
            data = rng.integers(0, 256, size, dtype=np.uint8)
            key = f"k{n}"
            receiver.expect(key, data.nbytes)
            await sender.send(receiver.address, key, data, timeout=DEADLINE)
            assert np.array_equal(await receiver.receive(key, timeout=DEADLINE), data)
    finally:
        await sender.close()


async def nothing_lands(receiver: TcpTransport, sender: TcpTransport) -> None:
    key = f"x-{time.monotonic_ns()}"
    receiver.expect(key, 1024)
    await sender.start()
    try:
        # the send may fail (handshake) or be written into a connection the receiver drops; nothing arrives
        try:
            await sender.send(receiver.address, key, np.ones(1024, dtype=np.uint8), timeout=DEADLINE)
        except TransportError:
            pass
        with pytest.raises((TransportError, TimeoutError)):
            await receiver.receive(key, timeout=1.0)
    finally:
        await sender.close()


async def test_a_sender_of_another_role_delivers_nothing(pki: ClusterSecurity, receiver: TcpTransport) -> None:
    await nothing_lands(receiver, tls_transport(pki, "frontend", "f0"))
    await test_chunks_land_exactly_over_mutual_tls(pki, receiver)  # the receiver still works


async def test_a_plaintext_sender_delivers_nothing(pki: ClusterSecurity, receiver: TcpTransport) -> None:
    await nothing_lands(receiver, TcpTransport())


async def test_a_sender_from_another_ca_is_refused_at_the_handshake(tmp_path: Path, receiver: TcpTransport) -> None:
    other = bootstrap_local(tmp_path / "other", "dp")
    sender = tls_transport(other, "llumlet", "src")
    await sender.start()
    try:
        start = time.monotonic()
        with pytest.raises(TransportError):
            await sender.send(receiver.address, "k", np.ones(16, dtype=np.uint8), timeout=DEADLINE)
        assert time.monotonic() - start < DEADLINE
    finally:
        await sender.close()
    await asyncio.sleep(0)


async def test_a_receiver_of_another_role_gets_nothing_sent_to_it(pki: ClusterSecurity) -> None:
    """Was: the sender checked the receiver's certificate for the host only, so a frontend's or scheduler's
    certificate on the destination's host could take a llumlet's KV bytes. Now the receiver must hold a llumlet's."""
    for role, id in (("frontend", "f0"), ("scheduler", "s0")):
        impostor = tls_transport(pki, role, id)
        await impostor.start()
        sender = tls_transport(pki, "llumlet", "src")
        await sender.start()
        try:
            impostor.expect("kv", 1024)
            with pytest.raises(TransportError) as failed:
                await sender.send(impostor.address, "kv", np.ones(1024, dtype=np.uint8), timeout=DEADLINE)
            assert "certificate" in str(failed.value).lower() or "handshake" in str(failed.value).lower(), failed.value
            with pytest.raises((TransportError, TimeoutError)):
                await impostor.receive("kv", timeout=0.5)
        finally:
            await sender.close()
            await impostor.close()


async def test_closing_leaves_no_connection_handler_to_be_cancelled(pki: ClusterSecurity) -> None:
    """Was: close() closed the TLS connections without waiting for asyncio's tasks serving them, which the loop then
    cancelled at its end; Python 3.11 logs each such cancellation as "Exception in callback
    StreamReaderProtocol...CancelledError" with a traceback (every llumlet shutdown after a migration)."""
    receiver = tls_transport(pki, "llumlet", "dst2")
    await receiver.start()
    sender = tls_transport(pki, "llumlet", "src2")
    await sender.start()
    try:
        receiver.expect("k", 16)
        await sender.send(receiver.address, "k", np.ones(16, dtype=np.uint8), timeout=DEADLINE)
        await receiver.receive("k", timeout=DEADLINE)  # the connection stays open for the next transfer
    finally:
        await receiver.close()
        await sender.close()
    serving = [t for t in asyncio.all_tasks() if "_serve_tls" in repr(t.get_coro()) and not t.done()]
    assert not serving, serving
