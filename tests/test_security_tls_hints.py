"""The client's own certificate is checked when a TLS connection fails: a server that refuses a client certificate
only closes the connection, so the client must name the cause itself (expired, not yet valid, another CA)."""

from __future__ import annotations

import datetime
from pathlib import Path

from pyllumnix.infra.security.bootstrap import bootstrap_local
from pyllumnix.infra.security.ca import Identity
from pyllumnix.infra.security.tls import describe_tls_failure, own_certificate_problem

SOCKET_CLOSED = (
    "UNAVAILABLE: failed to connect to all addresses; last error: UNAVAILABLE: ipv4:1.2.3.4:5: Socket closed"
)


def test_a_good_certificate_has_no_problem_and_the_error_text_hint_remains(tmp_path: Path) -> None:
    pki = bootstrap_local(tmp_path / "pki", "c1")
    paths = pki.ensure("admin", "ok")
    assert own_certificate_problem(paths.cert.read_bytes(), paths.ca.read_bytes()) == ""
    assert "refused this client's certificate" in describe_tls_failure(SOCKET_CLOSED, paths.cert.read_bytes())
    assert describe_tls_failure("UNAVAILABLE: connection refused", paths.cert.read_bytes()) == ""


def test_expired_and_not_yet_valid_certificates_are_named_with_their_identity(tmp_path: Path) -> None:
    pki = bootstrap_local(tmp_path / "pki", "c1")
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    expired = pki.authority().issue(Identity("c1", "admin", "old"), not_before=now - 2 * day, not_after=now - day)
    problem = describe_tls_failure(SOCKET_CLOSED, expired.write(tmp_path / "old", pki.ca_cert).cert.read_bytes())
    assert "expired at" in problem and "llumnix://c1/admin/old" in problem, problem
    early = pki.authority().issue(Identity("c1", "admin", "new"), not_before=now + day, not_after=now + 2 * day)
    problem = own_certificate_problem(early.write(tmp_path / "new", pki.ca_cert).cert.read_bytes())
    assert "not valid before" in problem and "llumnix://c1/admin/new" in problem, problem


def test_a_certificate_from_another_ca_than_the_trusted_one_is_named(tmp_path: Path) -> None:
    ours = bootstrap_local(tmp_path / "ours", "c1")
    theirs = bootstrap_local(tmp_path / "theirs", "c1")
    foreign = theirs.ensure("admin", "intruder")
    problem = describe_tls_failure(SOCKET_CLOSED, foreign.cert.read_bytes(), ours.ca_cert.read_bytes())
    assert "not signed by the CA it trusts" in problem and "llumnix://c1/admin/intruder" in problem, problem
    assert own_certificate_problem(b"not a certificate") == "this client's certificate is not a PEM certificate"
