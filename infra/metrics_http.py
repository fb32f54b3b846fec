"""A ``/metrics`` HTTP endpoint on the component's own event loop (llumlets, scheduler replicas).

On the loop, not in prometheus_client's server thread: collectors read live state (the engine's load, the cluster
view) that only the loop mutates, so a scrape between two loop steps sees a consistent picture without locks.
Like the frontend's ``/metrics``, it needs no key (Prometheus has none) and exposes only counts and timings.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pyllumnix.infra.grpc_server import host_port


@dataclass
class MetricsServer:
    runner: web.AppRunner
    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port`` to scrape (``http://{address}/metrics``; an IPv6 literal in brackets, as a URL needs)."""
        return host_port(self.host, self.port)

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_metrics_server(
    registry: CollectorRegistry, host: str, port: int, advertise_host: str = ""
) -> MetricsServer:
    """Serves ``registry`` at ``http://host:port/metrics`` (port 0: any free port; the bound one is returned)."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), port)  # a socket takes an IPv6 literal bare
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return MetricsServer(runner, advertise_host or host, int(bound))
