"""Data-plane addressing: UCX is restricted to the interface of the llumlet's bind address, so the worker address it
publishes names no interface a peer on another host could not reach (multi-host: each host's own loopback, bridges)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pyllumnix.data_plane.transport import TransportError, ucx_available
from pyllumnix.data_plane.transport.ucx import interface_of, restrict_ucx_to_host

# In a fresh process: the UCX context is per process and reads UCX_NET_DEVICES when it is created.
_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from pyllumnix.data_plane.transport.ucx import UcxTransport, parse_ucx_address

    async def main() -> None:
        host = sys.argv[1] or None
        a, b = UcxTransport(host=host), UcxTransport(host=host)
        await a.start(); await b.start()
        b.expect("k", 5)
        await a.send(b.address, "k", b"hello", timeout=10)
        assert bytes(await b.receive("k", timeout=10)) == b"hello"
        print(os.environ.get("UCX_NET_DEVICES", "-"), len(parse_ucx_address(a.address)[1]), flush=True)
        await a.close(); await b.close()

    asyncio.run(main())
    """
)


def test_interface_of_loopback_and_unknown() -> None:
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("127.0.0.9") == "lo"  # all of 127/8 is on lo
    with pytest.raises(TransportError, match=r"no network interface holds '192\.0\.2\.254'"):
        interface_of("192.0.2.254")  # TEST-NET-1: on no interface here


def test_wildcard_leaves_ucx_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    for host in (None, "", "0.0.0.0", "::"):
        restrict_ucx_to_host(host)
        assert "UCX_NET_DEVICES" not in os.environ
    monkeypatch.setenv("UCX_NET_DEVICES", "eth9")  # an operator's explicit choice wins
    restrict_ucx_to_host("127.0.0.1")
    assert os.environ["UCX_NET_DEVICES"] == "eth9"


def _run(host: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, host], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not ucx_available(), reason="ucxx not importable (pyllumnix[ucx])")
def test_ucx_bound_host_publishes_only_its_interface() -> None:
    """With ``host`` UCX uses that interface alone (its worker address carries fewer devices than the default, which
    lists every interface) and a transfer over it still lands."""
    devices, bound_len = _run("127.0.0.1")
    assert devices == "lo"
    default_devices, default_len = _run("")
    assert default_devices == "-"
    assert bound_len < default_len
