"""etcd client layer: leases, instance registry, leader election, cluster config, embedded etcd for tests and serve.

Built on our own grpc.aio stubs of etcd's v3 API (protos/third_party/etcd); see README.md in this folder.
"""

from pyllumnix.infra.etcd.client import CasResult, EtcdClient, KeyValue, RangeResult, TxnResult
from pyllumnix.infra.etcd.config_store import ConfigStore
from pyllumnix.infra.etcd.election import Election, LeaderInfo, Leadership
from pyllumnix.infra.etcd.embedded import EmbeddedEtcd, start_embedded
from pyllumnix.infra.etcd.errors import (
    ConfigConflictError,
    EtcdClosedError,
    EtcdCompactedError,
    EtcdError,
    EtcdLeaseNotFoundError,
    EtcdRequestError,
    EtcdUnavailableError,
)
from pyllumnix.infra.etcd.keys import KeyLayout, prefix_range_end
from pyllumnix.infra.etcd.lease import Lease
from pyllumnix.infra.etcd.registry import (
    InstanceRegistry,
    RegistryEvent,
    RegistryEventType,
    RegistrySnapshot,
    RegistryWatch,
)
from pyllumnix.infra.etcd.watch import EventType, Watch, WatchEvent, watch_prefix

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
