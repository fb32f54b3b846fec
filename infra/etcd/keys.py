"""Key layout of everything the control plane keeps in etcd, and etcd's prefix-range arithmetic.

One place names every key so that processes written separately (llumlets register, schedulers watch) agree on them.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_ROOT = "/llumnix"


def prefix_range_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that selects every key starting with ``prefix`` (prefix with its last byte + 1).

    Trailing 0xff bytes are dropped before incrementing; an all-0xff (or empty) prefix means "to the end" (``b"\\0"``).
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _check_segment(name: str, what: str) -> str:
    if not name or "/" in name:
        raise ValueError(f"{what} must be non-empty and contain no '/': {name!r}")
    return name


@dataclass(frozen=True)
class KeyLayout:
    """``<root>/<cluster>/{instances/<id>, frontends/<id>/<sink address>, election/<name>/<lease hex>, config,
    scale_target, apikeys/<id>}``."""

    cluster: str
    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        _check_segment(self.cluster, "cluster name")
        if not self.root.startswith("/") or self.root.endswith("/"):
            raise ValueError(f"root must start with '/' and not end with it: {self.root!r}")

    @property
    def base(self) -> str:
        return f"{self.root}/{self.cluster}/"

    @property
    def instances_prefix(self) -> str:
        return f"{self.base}instances/"

    def instance_key(self, instance_id: str) -> str:
        return self.instances_prefix + _check_segment(instance_id, "instance id")

    def instance_id(self, key: bytes | str) -> str:
        """Inverse of :meth:`instance_key`."""
        text = key.decode(errors="replace") if isinstance(key, bytes) else key
        if not text.startswith(self.instances_prefix):
            raise ValueError(f"{text!r} is not an instance key of {self.instances_prefix!r}")
        return text[len(self.instances_prefix) :]

    @property
    def frontends_prefix(self) -> str:
        return f"{self.base}frontends/"

    def frontend_prefix(self, frontend_id: str) -> str:
        """One frontend id's keys (what its certificate may write: several processes may share an id)."""
        return f"{self.frontends_prefix}{_check_segment(frontend_id, 'frontend id')}/"

    def frontend_key(self, frontend_id: str, sink_address: str) -> str:
        """A frontend process's registry key: its id and its output sink's address (host:port has no '/')."""
        return self.frontend_prefix(frontend_id) + _check_segment(sink_address, "sink address")

    def election_prefix(self, name: str = "scheduler") -> str:
        return f"{self.base}election/{_check_segment(name, 'election name')}/"

    @property
    def config_key(self) -> str:
        return f"{self.base}config"

    @property
    def apikeys_prefix(self) -> str:
        """API key records, ``apikeys/<id>`` (``infra.security.apikeys``); named here for etcd's permissions."""
        return f"{self.base}apikeys/"

    @property
    def scale_target_key(self) -> str:
        """The manual scale target (a serialized ``llumnix.v1.ScaleTarget``), kept apart from the policy config."""
        return f"{self.base}scale_target"
