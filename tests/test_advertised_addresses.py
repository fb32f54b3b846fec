"""The addresses processes advertise (``infra.grpc_server.advertised_address``): a name peers can dial.

Before: the llumlet and the scheduler advertised ``f"{host}:{port}"`` (``::1:5000`` is no gRPC target), each site
had its own spelling of "wildcard host" (the llumlet's and the TCP transport's missed ``""`` and ``[::]``), the TCP
transport could not bind a bracketed IPv6 host and advertised ``tcp://:<port>`` for a ``""`` bind, a metrics
endpoint on ``::1`` said ``::1:<port>`` (no URL), the frontend's HTTP url always named 127.0.0.1, and a certificate
issued for a wildcard-bound process lacked the host name it advertises.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter

from pyllumnix.control_plane.frontend.http import HttpServer
from pyllumnix.data_plane.transport.tcp import TcpTransport, parse_tcp_address
from pyllumnix.infra.grpc_server import WILDCARD_HOSTS, advertised_address, advertised_host
from pyllumnix.infra.metrics_http import start_metrics_server
from pyllumnix.infra.security.bootstrap import bootstrap_local
from pyllumnix.infra.security.runtime import from_options
from tests.test_infra_grpc_server import ipv6_loopback

needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this host")


@pytest.mark.parametrize(
    ("host", "advertise", "expected"),
    [
        ("127.0.0.1", "", "127.0.0.1:7"),
        ("::1", "", "[::1]:7"),
        ("[::1]", "", "[::1]:7"),
        ("fd00::2", "", "[fd00::2]:7"),
        ("0.0.0.0", "node-a.example", "node-a.example:7"),
        ("::", "fd00::3", "[fd00::3]:7"),
        ("127.0.0.1", "[fd00::4]", "[fd00::4]:7"),
    ],
)
def test_advertised_address_is_a_grpc_target(host: str, advertise: str, expected: str) -> None:
    assert advertised_address(host, advertise, 7) == expected


@pytest.mark.parametrize("host", sorted(WILDCARD_HOSTS))
def test_a_wildcard_bind_advertises_the_host_name(host: str) -> None:
    """Every spelling of "all interfaces" ("" and "[::]" too) names no host: peers get this machine's name."""
    assert advertised_host(host) == socket.gethostname()
    assert advertised_address(host, "", 9) == f"{socket.gethostname()}:9"


async def _round_trip(a: TcpTransport, b: TcpTransport) -> None:
    b.expect("k", 5)
    await a.send(b.address, "k", b"hello", timeout=10)
    assert bytes(await b.receive("k", timeout=10)) == b"hello"


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]"])
async def test_tcp_transport_on_ipv6_loopback_advertises_a_reachable_address(host: str) -> None:
    """Old behaviour: ``[::1]`` could not be bound (socket.gaierror)."""
    a, b = TcpTransport(host=host), TcpTransport(host=host)
    try:
        await a.start()
        await b.start()
        assert b.address.startswith("tcp://[::1]:")
        assert parse_tcp_address(b.address) == ("::1", int(b.address.rpartition(":")[2]))
        await _round_trip(a, b)
    finally:
        await a.close()
        await b.close()


async def test_tcp_transport_on_the_empty_wildcard_advertises_the_host_name() -> None:
    """Old behaviour: ``""`` (all interfaces) advertised ``tcp://:<port>``, which no peer can parse."""
    t = TcpTransport(host="")
    try:
        address = await t.start()
        assert parse_tcp_address(address)[0] == socket.gethostname()
    finally:
        await t.close()


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]"])
async def test_metrics_endpoint_on_ipv6_loopback_is_scrapable_at_its_address(host: str) -> None:
    """Old behaviour: address ``::1:<port>`` (``http://::1:<port>/metrics`` is no URL); ``[::1]`` did not bind."""
    registry = CollectorRegistry()
    Counter("llumnix_test_things", "A counter for the test.", registry=registry).inc()
    server = await start_metrics_server(registry, host, 0, advertised_host(host))
    try:
        assert server.address == f"[::1]:{server.port}"
        async with aiohttp.ClientSession() as session, session.get(f"http://{server.address}/metrics") as reply:
            assert reply.status == 200
            assert "llumnix_test_things_total 1.0" in await reply.text()
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("::1", "http://[::1]:80"),
        ("10.0.0.5", "http://10.0.0.5:80"),
        ("0.0.0.0", "http://127.0.0.1:80"),
        # asyncio binds "::" IPv6-only: loopback of that family (review 8: 127.0.0.1 was refused)
        ("::", "http://[::1]:80"),
        ("[::]", "http://[::1]:80"),
    ],
)
def test_frontend_http_url_names_the_bind_host(host: str, url: str) -> None:
    """Old behaviour: always ``http://127.0.0.1:<port>`` (nothing listens there for a frontend bound elsewhere)."""
    runner: Any = None
    assert HttpServer(runner, 80, host=host).url == url


def test_a_wildcard_bound_process_is_certified_for_the_name_it_advertises(tmp_path: Path) -> None:
    """Old behaviour: wildcard hosts were dropped, so the certificate lacked the host name the process advertises
    (peers verifying it by that name failed); ``[::1]`` went in as a DNS name."""
    pki = bootstrap_local(tmp_path / "pki", "c1")
    settings = from_options("llumlet", "i-8", env={"LLUMNIX_TLS_DIR": str(pki.directory)}, hosts=["[::]", "[::1]"])
    assert settings.paths is not None
    san = x509.load_pem_x509_certificate(settings.paths.cert.read_bytes()).extensions
    names = san.get_extension_for_class(x509.SubjectAlternativeName).value
    assert socket.gethostname() in names.get_values_for_type(x509.DNSName)
    assert "::1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert not any("[" in n or n == "::" for n in names.get_values_for_type(x509.DNSName))
