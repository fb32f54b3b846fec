"""Election.campaign retries a failing etcd with exponential backoff: no tight loop, no escape of the error."""

from __future__ import annotations

import asyncio
import contextlib
import time

from pyllumnix.control_plane.etcd.client import EtcdClient
from pyllumnix.control_plane.etcd.election import Election
from pyllumnix.control_plane.etcd.errors import EtcdUnavailableError


class DownEtcd:
    """Answers every lease grant with the error the real client raises once its retry budget is spent."""

    def __init__(self) -> None:
        self.grants: list[float] = []

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        self.grants.append(time.monotonic())
        raise EtcdUnavailableError("lease_grant", ["127.0.0.1:1"], 0.0, "UNAVAILABLE: down")


async def test_campaign_backs_off_while_etcd_is_down() -> None:
    etcd = DownEtcd()
    election = Election(etcd, "/t/election/scheduler/", ttl=1, retry_initial=0.05, retry_max=0.4)  # type: ignore[arg-type]
    task = asyncio.create_task(election.campaign(b"me"))
    await asyncio.sleep(1.5)
    assert not task.done(), task  # still campaigning: the outage did not end the campaign with an error
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # 0.05, 0.1, 0.2, 0.4, 0.4, ... (+-25 %): about 6 attempts in 1.5 s, not thousands
    assert 3 <= len(etcd.grants) <= 8, len(etcd.grants)
    gaps = [b - a for a, b in zip(etcd.grants, etcd.grants[1:], strict=False)]
    assert gaps[-1] >= 0.3 > gaps[0], gaps


def test_backoff_bounds_are_checked() -> None:
    client = EtcdClient(["127.0.0.1:1"])
    try:
        Election(client, "/t/e/", retry_initial=1.0, retry_max=0.5)
    except ValueError as exc:
        assert "retry_initial" in str(exc)
    else:
        raise AssertionError("accepted retry_initial > retry_max")
