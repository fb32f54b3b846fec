"""The etcd permission table (``infra.etcd.rbac.grants_for``) and the certificate common names etcd takes as users.

A real etcd enforcing the table is in ``integration/test_etcd_rbac.py``; here, fast: the CN names role and id (etcd
users of a llumlet and a scheduler with the same id differ), a llumlet may write exactly its own registry key, and
nothing but admin may write API keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyllumnix.infra.etcd.embedded import free_port
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.etcd.rbac import EtcdRbacError, Grant, grants_for, user_of
from pyllumnix.infra.security.apikeys import apikeys_prefix
from pyllumnix.infra.security.bootstrap import bootstrap_local
from pyllumnix.infra.security.runtime import configure_from_cli

LAYOUT = KeyLayout("c")


def writes(role: str, id: str) -> list[Grant]:
    return [g for g in grants_for(role, id, LAYOUT) if "write" in g.perm]


def test_certificate_common_name_is_role_and_id(tmp_path: Path) -> None:
    pki = bootstrap_local(tmp_path, "c", components={"scheduler": ["x"]}, llumlets=["x"])
    assert user_of(pki.paths("llumlet", "x").cert) == "llumlet-x"
    assert user_of(pki.paths("scheduler", "x").cert) == "scheduler-x"


def test_llumlet_writes_only_its_own_registry_key() -> None:
    assert writes("llumlet", "i0") == [Grant("readwrite", "/llumnix/c/instances/i0")]


def test_a_frontend_writes_only_its_own_ids_frontend_keys_and_the_scheduler_reads_them() -> None:
    """The leader tells every registered frontend about a lost instance: a frontend registers its sink under its own
    id (one key per process), which nobody else may write; schedulers read them all."""
    assert writes("frontend", "f1") == [Grant("readwrite", "/llumnix/c/frontends/f1/", prefix=True)]
    assert LAYOUT.frontend_key("f1", "127.0.0.1:5").startswith(writes("frontend", "f1")[0].key)
    assert not LAYOUT.frontend_key("f10", "127.0.0.1:5").startswith(writes("frontend", "f1")[0].key)
    for role in ("llumlet", "scheduler", "admin", "client"):
        assert not any(g.key.startswith(LAYOUT.frontends_prefix) for g in writes(role, "f1")), role
    assert Grant("read", LAYOUT.frontends_prefix, prefix=True) in grants_for("scheduler", "s0", LAYOUT)


def test_only_admin_writes_api_keys_and_the_apikeys_prefix_matches_the_store() -> None:
    assert LAYOUT.apikeys_prefix == apikeys_prefix(LAYOUT)
    for role in ("llumlet", "scheduler", "frontend", "client", "etcd"):
        assert not any(g.key.startswith(LAYOUT.apikeys_prefix) for g in writes(role, "x")), role
    assert Grant("readwrite", LAYOUT.apikeys_prefix, prefix=True) in writes("admin", "a")
    assert grants_for("client", "c", LAYOUT) == []


def test_a_certificate_whose_etcd_user_cannot_be_made_is_not_issued(tmp_path: Path) -> None:
    """Under etcd auth a certificate without its user is useless: ensure() fails clearly and leaves nothing behind,
    so a retry issues it again (and makes the user) instead of finding a certificate etcd refuses."""
    pki = bootstrap_local(tmp_path, "c", components={"etcd": ["etcd"]})
    pki.rbac_path.write_text(json.dumps({"endpoints": [f"https://127.0.0.1:{free_port()}"], "cluster": "c"}))
    with pytest.raises(EtcdRbacError, match="no endpoint answers"):
        pki.ensure("llumlet", "z")
    assert not list(tmp_path.glob("llumlet-z*"))


def test_a_component_that_cannot_issue_its_certificate_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI path of the above (a llumlet issuing its own certificate from a PKI folder while etcd is down): one
    clear line and exit 1, not a traceback."""
    pki = bootstrap_local(tmp_path, "c", components={"etcd": ["etcd"]})
    pki.rbac_path.write_text(json.dumps({"endpoints": [f"https://127.0.0.1:{free_port()}"], "cluster": "c"}))
    with pytest.raises(SystemExit) as exited:
        configure_from_cli("llumlet", "z", {"tls_dir": str(tmp_path)})
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot issue this component's certificate:") and "no endpoint answers" in err
    assert len(err.splitlines()) == 1
