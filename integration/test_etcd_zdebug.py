import asyncio
import time

from pyllumnix.control_plane.etcd.client import EtcdClient
from pyllumnix.control_plane.etcd.election import Election
from pyllumnix.control_plane.etcd.keys import KeyLayout

T0 = time.monotonic()


def mark(s: str) -> None:
    print(f"{time.monotonic() - T0:7.3f} {s}", flush=True)


async def test_dbg(etcd_client: EtcdClient, etcd_cluster_name: str) -> None:
    global T0
    T0 = time.monotonic()
    prefix = KeyLayout(etcd_cluster_name).election_prefix()
    a, b = Election(etcd_client, prefix, ttl=2), Election(etcd_client, prefix, ttl=2)
    observer = a.observe()
    await asyncio.wait_for(observer.__anext__(), 3)
    mark("obs0")
    lead_a = await asyncio.wait_for(a.campaign(b"addr-a"), 3)
    mark("campaign")
    await asyncio.wait_for(observer.__anext__(), 3)
    mark("obs1")
    b_task = asyncio.create_task(b.campaign(b"addr-b"))
    await asyncio.sleep(0.5)
    mark("slept")
    await a.leader()
    mark("leader")
    await lead_a.proclaim(b"addr-a2")
    mark("proclaim")
    await asyncio.wait_for(observer.__anext__(), 3)
    mark("obs2")
    await lead_a.resign()
    mark("resign")
    lead_b = await asyncio.wait_for(b_task, 3)
    mark("b")
    await asyncio.wait_for(observer.__anext__(), 3)
    mark("obs3")

    async def dump() -> None:
        await asyncio.sleep(3)
        import gc

        from pyllumnix.control_plane.etcd.watch import Watch

        for o in gc.get_objects():
            if isinstance(o, Watch):
                g = o._gen
                print("WATCH", o.key, g.ag_running, g.ag_frame.f_lineno if g.ag_frame else None, g.ag_await)
                aw = g.ag_await
                while aw is not None:
                    fr = getattr(aw, "cr_frame", None) or getattr(aw, "gi_frame", None)
                    print("   AW", aw, fr.f_code.co_filename if fr else None, fr.f_lineno if fr else None)
                    aw = getattr(aw, "cr_await", None) or getattr(aw, "gi_yieldfrom", None)
        for task in asyncio.all_tasks():
            print("TASK", task.get_name())
            task.print_stack(limit=10)

    d = asyncio.create_task(dump())
    await lead_b.resign()
    mark("resign b")
    d.cancel()
    await asyncio.wait_for(observer.__anext__(), 3)
    mark("obs4")
    await observer.aclose()
    mark("aclose")
