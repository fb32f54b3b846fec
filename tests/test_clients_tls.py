"""TLS channels: root certificate + server name override, through the client and through llmctl's flags."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from pyllumnix.clients import AsyncLlumnixClient, TlsConfig, UnavailableError
from pyllumnix.protos.llumnix.v1 import admin_pb2_grpc
from pyllumnix.tools.llmctl import EXIT_UNAVAILABLE, cli
from tests.test_clients_fakes import FakeAdmin, Replica

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

NAME = "llumnix.test"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    command += ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={NAME}"]
    command += ["-addext", f"subjectAltName=DNS:{NAME}"]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
async def tls_server(certs: tuple[Path, Path]) -> AsyncIterator[str]:
    cert, key = certs
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServiceServicer_to_server(FakeAdmin(Replica("s-tls")), server)
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_tls_with_server_name_override(tls_server: str, certs: tuple[Path, Path]) -> None:
    tls = TlsConfig.from_files(ca=certs[0], server_name=NAME)
    async with AsyncLlumnixClient(scheduler_endpoints=tls_server, tls=tls) as client:
        assert len(await client.list_instances()) == 2
    # Plaintext against a TLS port never gets an answer.
    async with AsyncLlumnixClient(scheduler_endpoints=tls_server, timeout=1) as client:
        with pytest.raises(UnavailableError):
            await client.list_instances()


async def test_llmctl_tls_flags(tls_server: str, certs: tuple[Path, Path]) -> None:
    runner = CliRunner()
    args = ["-e", tls_server, "--ca", str(certs[0]), "--server-name", NAME, "instances", "-o", "json"]
    res = await asyncio.to_thread(runner.invoke, cli, args)
    assert res.exit_code == 0, res.output
    assert '"i-1"' in res.stdout
    # Wrong name: the handshake fails, reported as unreachable (not a traceback).
    bad = ["-e", tls_server, "--ca", str(certs[0]), "--server-name", "other.test", "--timeout", "1", "leader"]
    res = await asyncio.to_thread(runner.invoke, cli, bad)
    assert res.exit_code == EXIT_UNAVAILABLE and tls_server in res.stderr
    res = await asyncio.to_thread(runner.invoke, cli, ["-e", tls_server, "--cert", str(certs[0]), "leader"])
    assert res.exit_code == 2 and "together" in res.output


def test_tls_config_needs_cert_and_key_together(certs: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError):
        TlsConfig.from_files(cert=certs[0])
    both = TlsConfig.from_files(ca=certs[0], cert=certs[0], key=certs[1])
    assert both.private_key and both.certificate_chain and both.options() == []
