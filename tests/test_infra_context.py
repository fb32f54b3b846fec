"""The client context file (location, 0600, refusal of open permissions, several contexts) and the local bootstrap
(CA reuse, a certificate per component, the token secret, an admin key written into the context)."""

from __future__ import annotations

import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.security.apikeys import ApiKeyInterceptor, ApiKeyStore
from pyllumnix.infra.security.authz import RoleInterceptor
from pyllumnix.infra.security.bootstrap import bootstrap_local, provision_admin
from pyllumnix.infra.security.ca import Identity, identities_in
from pyllumnix.infra.security.context import (
    ClientContext,
    ContextError,
    context_path,
    load_context,
    save_context,
)
from pyllumnix.infra.security.tls import grpc_server_credentials
from pyllumnix.protos.llumnix.v1 import frontend_pb2, frontend_pb2_grpc
from tests.test_infra_apikeys import FakeKV, Frontend


def test_context_path() -> None:
    assert context_path({"LLUMNIX_CONTEXT": "/x/ctx.yaml", "XDG_CONFIG_HOME": "/cfg"}) == Path("/x/ctx.yaml")
    assert context_path({"XDG_CONFIG_HOME": "/cfg"}) == Path("/cfg/llumnix/context.yaml")
    assert context_path({}) == Path.home() / ".config" / "llumnix" / "context.yaml"


def test_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "context.yaml"
    assert load_context(path) is None
    prod = ClientContext(
        name="prod",
        cluster="c1",
        scheduler=["10.0.0.1:50060", "10.0.0.2:50060"],
        ca=tmp_path / "ca.pem",
        cert=tmp_path / "admin.pem",
        key=tmp_path / "admin-key.pem",
        api_key="llx_x",
    )
    save_context(prod, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    save_context(ClientContext(name="dev", frontend=["127.0.0.1:50051"]), path, make_current=False)
    loaded = load_context(path)
    assert loaded == prod
    assert loaded.tls_files() == {"ca": prod.ca, "cert": prod.cert, "key": prod.key, "server_name": None}
    assert loaded.grpc_metadata() == (("authorization", "Bearer llx_x"),)
    assert loaded.http_headers() == {"Authorization": "Bearer llx_x"}
    cert_paths = loaded.cert_paths()
    assert cert_paths is not None and cert_paths.key == prod.key
    dev = load_context(path, "dev")
    assert dev is not None and dev.frontend == ["127.0.0.1:50051"] and dev.tls_files() == {} and not dev.grpc_metadata()
    with pytest.raises(ContextError, match=r"no context named 'qa'.*prod, dev"):
        load_context(path, "qa")
    # Replacing a context keeps the others.
    save_context(ClientContext(name="dev", frontend=["127.0.0.1:1"]), path)
    dev = load_context(path)
    assert dev is not None and dev.frontend == ["127.0.0.1:1"] and load_context(path, "prod") == prod


def test_permissions_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "context.yaml"
    save_context(ClientContext(name="a", api_key="llx_secret"), path)
    path.chmod(0o644)
    with pytest.raises(ContextError, match=r"accessible by others \(mode 0644\); run: chmod 600"):
        load_context(path)
    path.write_text("contexts: [\n")
    path.chmod(0o600)
    with pytest.raises(ContextError, match="not valid YAML"):
        load_context(path)
    path.write_text("contexts:\n- name: a\n  cert: c.pem\n")
    with pytest.raises(ContextError, match="together"):
        load_context(path)
    path.write_text("contexts:\n- name: a\n  colour: blue\n")
    with pytest.raises(ContextError, match="unknown keys colour"):
        load_context(path)
    # Relative paths are relative to the file's folder.
    path.write_text("contexts:\n- name: a\n  ca: pki/ca.pem\n")
    ctx = load_context(path)
    assert ctx is not None and ctx.ca == tmp_path / "pki" / "ca.pem"


async def test_bootstrap_and_admin_context(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    security = bootstrap_local(pki, "c1", llumlets=["i-1"])
    for role, id in [
        ("etcd", "etcd"),
        ("scheduler", "s0"),
        ("scheduler", "s1"),
        ("frontend", "f0"),
        ("llumlet", "i-1"),
    ]:
        paths = security.paths(role, id)
        cert = x509.load_pem_x509_certificate(paths.cert_pem())
        assert identities_in(cert) == [Identity("c1", role, id)]
        cert.verify_directly_issued_by(security.authority().cert)
        assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    assert len(security.secret()) == 32 and stat.S_IMODE(security.secret_path.stat().st_mode) == 0o600
    ca_before, secret_before = security.ca_cert.read_bytes(), security.secret()
    # A restart reuses the CA, the secret and the certificates; a new llumlet gets one on demand.
    again = bootstrap_local(pki, "c1")
    assert again.ca_cert.read_bytes() == ca_before and again.secret() == secret_before
    new = again.ensure("llumlet", "i-9", hosts=["node-9.example"])
    names = x509.load_pem_x509_certificate(new.cert_pem()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "node-9.example" in names.value.get_values_for_type(x509.DNSName)
    with pytest.raises(FileNotFoundError, match="call ensure"):
        again.paths("llumlet", "i-404")

    kv = FakeKV()
    store = ApiKeyStore(kv, KeyLayout("c1"), cache_ttl=0)
    ctx_file = tmp_path / "ctx" / "context.yaml"
    key, written = await provision_admin(security, store, context_path=ctx_file, scheduler=["127.0.0.1:50060"])
    assert written == ctx_file and stat.S_IMODE(ctx_file.stat().st_mode) == 0o600
    ctx = load_context(ctx_file)
    assert ctx is not None and ctx.api_key == key and ctx.scheduler == ["127.0.0.1:50060"]
    assert (await store.verify(key)).role == "admin"
    assert ctx.cert is not None
    assert identities_in(x509.load_pem_x509_certificate(ctx.cert.read_bytes())) == [Identity("c1", "admin", "admin")]
    # Provisioning again replaces the admin key: the old one stops working.
    key2, _ = await provision_admin(security, store, context_path=ctx_file)
    assert key2 != key and [k.name for k in await store.list()] == ["admin@c1"]
    with pytest.raises(Exception, match="unknown or revoked"):
        await store.verify(key)


async def test_context_channel_credentials_carry_tls_and_the_api_key(tmp_path: Path) -> None:
    """One set of channel credentials from the context: mTLS to a role-checked server, the Bearer key on each call."""
    security = bootstrap_local(tmp_path / "pki", "c1")
    store = ApiKeyStore(FakeKV(), KeyLayout("c1"), cache_ttl=0)
    ctx_file = tmp_path / "context.yaml"
    await provision_admin(security, store, context_path=ctx_file)
    ctx = load_context(ctx_file)
    assert ctx is not None
    server = grpc.aio.server(interceptors=[RoleInterceptor("c1"), ApiKeyInterceptor(store)])
    frontend_pb2_grpc.add_FrontendServiceServicer_to_server(Frontend(), server)  # type: ignore[abstract]
    port = server.add_secure_port("127.0.0.1:0", grpc_server_credentials(security.paths("frontend", "f0")))
    await server.start()
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", ctx.channel_credentials()) as channel:
            await frontend_pb2_grpc.FrontendServiceStub(channel).Abort(frontend_pb2.AbortRequest(), timeout=5)
        ctx.api_key = ""
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", ctx.channel_credentials()) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await frontend_pb2_grpc.FrontendServiceStub(channel).Abort(frontend_pb2.AbortRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(None)
    assert ClientContext(name="plain").channel_credentials() is None
