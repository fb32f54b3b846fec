"""The drill's credentials check its servers' role names when the context holds the cluster's CA (as the product's
components and clients do), and only then."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pyllumnix.infra.security.bootstrap import bootstrap_local
from pyllumnix.infra.security.context import ClientContext, save_context
from pyllumnix.tools.drill.credentials import from_context


def test_a_context_of_the_clusters_ca_checks_role_names_and_one_naming_a_server_does_not(tmp_path: Path) -> None:
    admin = bootstrap_local(tmp_path / "pki", "c1").ensure("admin", "admin")
    ctx = ClientContext("c1", scheduler=["127.0.0.1:1"], ca=admin.ca, cert=admin.cert, key=admin.key)
    path = tmp_path / "context.yaml"
    save_context(ctx, path)
    creds, _ = from_context(str(path), None)
    assert creds.role_names, "serve's or the drill's own context: the cluster CA"
    save_context(dataclasses.replace(ctx, server_name="lb.example"), path)
    named, _ = from_context(str(path), None)
    assert not named.role_names and named.server_name == "lb.example", "an explicit server name is what is checked"
    save_context(dataclasses.replace(ctx, cert=None, key=None), path)
    balancer, _ = from_context(str(path), None)
    assert not balancer.role_names, "no client certificate of the cluster: maybe not its CA, the host is checked"
    save_context(dataclasses.replace(ctx, ca=None, cert=None, key=None), path)
    plain, _ = from_context(str(path), None)
    assert plain.channel_credentials is None and not plain.role_names
