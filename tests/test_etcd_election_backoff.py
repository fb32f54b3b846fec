"""Election.campaign retries a failing etcd with exponential backoff: no tight loop, no escape of the error."""

from __future__ import annotations

import asyncio
import contextlib
import time

from pyllumnix.infra.etcd.client import EtcdClient
from pyllumnix.infra.etcd.election import Election
from pyllumnix.infra.etcd.errors import EtcdUnavailableError

RETRY_INITIAL, RETRY_MAX = 0.05, 0.4
ATTEMPTS = 6


class DownEtcd:
    """Answers every lease grant with the error the real client raises once its retry budget is spent."""

    def __init__(self) -> None:
        self.grants: list[float] = []
        self.enough = asyncio.Event()

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        self.grants.append(time.monotonic())
        if len(self.grants) >= ATTEMPTS:
            self.enough.set()
        raise EtcdUnavailableError("lease_grant", ["127.0.0.1:1"], 0.0, "UNAVAILABLE: down")


async def test_campaign_backs_off_while_etcd_is_down() -> None:
    etcd = DownEtcd()
    election = Election(etcd, "/t/election/scheduler/", ttl=1, retry_initial=RETRY_INITIAL, retry_max=RETRY_MAX)  # type: ignore[arg-type]
    task = asyncio.create_task(election.campaign(b"me"))
    await asyncio.wait_for(etcd.enough.wait(), 30)  # the outage did not end the campaign: it keeps trying
    assert not task.done(), task
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # Backoff 0.05, 0.1, 0.2, 0.4, 0.4, ... (+-25 % jitter). Sleeps never end early, so each gap is at least its
    # backoff's lower bound however loaded the machine is; a tight loop (or a fixed short delay) would not be.
    gaps = [b - a for a, b in zip(etcd.grants, etcd.grants[1:], strict=False)][: ATTEMPTS - 1]
    floors = [0.75 * min(RETRY_INITIAL * 2**i, RETRY_MAX) for i in range(len(gaps))]
    assert all(g >= f - 0.005 for g, f in zip(gaps, floors, strict=True)), (gaps, floors)
    assert gaps[-1] >= 0.75 * RETRY_MAX  # it grew to the cap


def test_backoff_bounds_are_checked() -> None:
    client = EtcdClient(["127.0.0.1:1"])
    try:
        Election(client, "/t/e/", retry_initial=1.0, retry_max=0.5)
    except ValueError as exc:
        assert "retry_initial" in str(exc)
    else:
        raise AssertionError("accepted retry_initial > retry_max")
