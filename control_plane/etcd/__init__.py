"""etcd client layer: leases, instance registry, leader election, cluster config, embedded etcd for tests and serve.

Built on our own grpc.aio stubs of etcd's v3 API (protos/third_party/etcd); see README.md in this folder.
"""

from pyllumnix.control_plane.etcd.client import CasResult, EtcdClient, KeyValue, RangeResult, TxnResult
from pyllumnix.control_plane.etcd.config_store import ConfigStore
from pyllumnix.control_plane.etcd.election import Election, LeaderInfo, Leadership
from pyllumnix.control_plane.etcd.embedded import EmbeddedEtcd, start_embedded
from pyllumnix.control_plane.etcd.errors import (
    ConfigConflictError,
    EtcdClosedError,
    EtcdCompactedError,
    EtcdError,
    EtcdLeaseNotFoundError,
    EtcdRequestError,
    EtcdUnavailableError,
)
from pyllumnix.control_plane.etcd.keys import KeyLayout, prefix_range_end
from pyllumnix.control_plane.etcd.lease import Lease
from pyllumnix.control_plane.etcd.registry import (
    InstanceRegistry,
    RegistryEvent,
    RegistryEventType,
    RegistrySnapshot,
    RegistryWatch,
)
from pyllumnix.control_plane.etcd.watch import EventType, Watch, WatchEvent, watch_prefix

__all__ = [
    "CasResult",
    "ConfigConflictError",
    "ConfigStore",
    "Election",
    "EmbeddedEtcd",
    "EtcdClient",
    "EtcdClosedError",
    "EtcdCompactedError",
    "EtcdError",
    "EtcdLeaseNotFoundError",
    "EtcdRequestError",
    "EtcdUnavailableError",
    "EventType",
    "InstanceRegistry",
    "KeyLayout",
    "KeyValue",
    "LeaderInfo",
    "Leadership",
    "Lease",
    "RangeResult",
    "RegistryEvent",
    "RegistryEventType",
    "RegistrySnapshot",
    "RegistryWatch",
    "TxnResult",
    "Watch",
    "WatchEvent",
    "prefix_range_end",
    "start_embedded",
    "watch_prefix",
]
