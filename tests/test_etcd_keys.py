"""Pure parts of the etcd layer: prefix ranges, key layout, endpoint rotation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyllumnix.infra.etcd.client import EndpointRing, normalize_endpoint
from pyllumnix.infra.etcd.keys import KeyLayout, prefix_range_end


def test_prefix_range_end_examples() -> None:
    assert prefix_range_end(b"/a/") == b"/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == b"\0"
    assert prefix_range_end(b"") == b"\0"


@given(st.binary(min_size=1, max_size=8), st.binary(max_size=8))
def test_prefix_range_end_contains_exactly_the_prefixed_keys(prefix: bytes, suffix: bytes) -> None:
    end = prefix_range_end(prefix)
    key = prefix + suffix
    assert end == b"\0" or prefix <= key < end


@given(st.binary(min_size=1, max_size=6), st.binary(min_size=1, max_size=6))
def test_keys_outside_the_prefix_are_outside_the_range(prefix: bytes, other: bytes) -> None:
    end = prefix_range_end(prefix)
    if not other.startswith(prefix) and end != b"\0":
        assert not (prefix <= other < end)


def test_layout() -> None:
    layout = KeyLayout("prod")
    assert layout.instance_key("i-1") == "/llumnix/prod/instances/i-1"
    assert layout.instance_id(b"/llumnix/prod/instances/i-1") == "i-1"
    assert layout.election_prefix() == "/llumnix/prod/election/scheduler/"
    assert layout.config_key == "/llumnix/prod/config"
    assert KeyLayout("c", root="/x").instances_prefix == "/x/c/instances/"
    with pytest.raises(ValueError):
        layout.instance_key("a/b")
    with pytest.raises(ValueError):
        KeyLayout("")
    with pytest.raises(ValueError):
        KeyLayout("c", root="x/")
    with pytest.raises(ValueError):
        layout.instance_id("/llumnix/other/instances/i")


def test_endpoint_ring_rotates_once_per_failure() -> None:
    ring = EndpointRing(["http://127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    assert ring.current == "127.0.0.1:1"
    ring.failed(0)
    assert ring.current == "127.0.0.1:2"
    ring.failed(0)  # a late report about the endpoint already left behind changes nothing
    assert ring.current == "127.0.0.1:2"
    ring.failed(1)
    ring.failed(2)
    assert ring.current == "127.0.0.1:1"


def test_endpoint_validation() -> None:
    assert normalize_endpoint("https://h:1/") == "h:1"
    with pytest.raises(ValueError):
        normalize_endpoint("localhost")
    with pytest.raises(ValueError):
        EndpointRing([])
