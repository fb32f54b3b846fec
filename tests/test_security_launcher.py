"""The Launcher (``llumnix serve``'s, the integration tests', the drill's, the benchmarks') is secure by default: its
children get a local PKI unless the caller opts out, one throwaway PKI per process serves every default launcher, and
no security variable of the launching process leaks into a child against the launcher's mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyllumnix.tools.launch import Launcher, session_pki


def test_default_launcher_gives_children_one_shared_throwaway_pki(tmp_path: Path) -> None:
    first, second = Launcher(tmp_path / "a"), Launcher(tmp_path / "b")
    env = first.child_env()
    assert set(env) == {"LLUMNIX_TLS_DIR"}, env
    assert second.child_env() == env, "one PKI per process, issued once"
    pki = Path(env["LLUMNIX_TLS_DIR"])
    assert pki == session_pki().directory and (pki / "ca.pem").exists() and (pki / "ca-key.pem").exists()
    assert first.security("admin", "t").secure, "the launcher's own channels are mutual TLS too"


def test_opt_out_and_caller_flags_modes(tmp_path: Path) -> None:
    assert Launcher(tmp_path / "plain", secure=False).child_env() == {"LLUMNIX_INSECURE": "1"}
    assert not Launcher(tmp_path / "plain2", secure=False).security().secure
    assert Launcher(tmp_path / "flags", secure=None).child_env() == {}
    own = Launcher(tmp_path / "own", pki_dir=tmp_path / "pki", cluster="c9")
    assert own.child_env() == {"LLUMNIX_TLS_DIR": str(tmp_path / "pki")}
    assert (tmp_path / "pki" / "cluster").read_text().strip() == "c9"


def test_inherited_security_variables_never_override_the_launchers_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLUMNIX_INSECURE", "1")
    monkeypatch.setenv("LLUMNIX_TLS_DIR", "/somewhere/else")
    secure = Launcher(tmp_path / "s").environment()
    assert "LLUMNIX_INSECURE" not in secure and secure["LLUMNIX_TLS_DIR"] == str(session_pki().directory)
    flags = Launcher(tmp_path / "f", secure=None).environment()
    assert "LLUMNIX_INSECURE" not in flags and "LLUMNIX_TLS_DIR" not in flags
    # the caller's explicit env still wins (a test may ask serve for something on purpose)
    assert Launcher(tmp_path / "e").environment({"LLUMNIX_INSECURE": ""})["LLUMNIX_INSECURE"] == ""
