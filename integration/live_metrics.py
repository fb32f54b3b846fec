"""A live ``llumnix serve`` (secure, the default) driven through a few requests and one migration, and every
``/metrics`` it exposes scraped: the frontend's, each scheduler replica's and each llumlet's (addresses from
serve.json). Shared by ``test_metrics_live.py`` (the vLLM-compatible series) and ``test_grafana_dashboard.py``."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from integration.test_serve import Stream, client, instance_of, llmctl_json, wait_for
from pyllumnix.tools.launch import Component, Launcher

Labels = tuple[tuple[str, str], ...]


@dataclass
class Scrape:
    """One scrape of every target: role -> address -> {(sample name, sorted labels): value}."""

    by_target: dict[str, dict[tuple[str, Labels], float]] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # address -> frontend | scheduler | llumlet

    def names(self) -> set[str]:
        return {name for samples in self.by_target.values() for name, _ in samples}

    def of(self, role: str) -> dict[str, dict[tuple[str, Labels], float]]:
        return {a: s for a, s in self.by_target.items() if self.roles[a] == role}

    def values(self, role: str, name: str, **labels: str) -> list[float]:
        """Every sample named ``name`` on ``role`` targets whose labels include ``labels``."""
        return [
            v
            for samples in self.of(role).values()
            for (n, lbls), v in samples.items()
            if n == name and all((k, x) in lbls for k, x in labels.items())
        ]


def scrape_text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def scrape_all(serve: Component) -> Scrape:
    status = json.loads(Path(serve.ready["status_file"]).read_text())
    out = Scrape()
    for comp in status["components"]:
        if comp["kind"] not in ("frontend", "scheduler", "llumlet") or comp["state"] != "running":
            continue
        address = comp["metrics"]
        assert address, f"{comp['name']} has no metrics address in serve.json"
        out.roles[address] = comp["kind"]
        out.by_target[address] = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(scrape_text(address))
            for s in family.samples
        }
    return out


def start_serve(launcher: Launcher) -> Component:
    return launcher.start(
        "serve",
        "serve",
        *("--http-port", "0", "--grpc-port", "0", "--transport", "tcp", "--llumlets", "2"),
        *("--log-dir", str(launcher.log_dir / "components")),
        timeout=120,
        env={"LLUMNIX_INSECURE": ""},  # secure, the default: serve writes the client context the helpers read
    )


N_REQUESTS = 4
MAX_TOKENS = 12
# The migrated stream: long enough (~12-20 s on llama-7b-a10) to still run after the llmctl calls that find and move it
# on a loaded host.
MIGRATED_TOKENS = 400


def drive(serve: Component) -> None:
    """A few requests (known token counts) and one committed migration of a streaming request."""
    openai_client = client(serve)
    for i in range(N_REQUESTS):
        reply = openai_client.completions.create(
            model="llama-7b-a10", prompt=f"metrics request {i}", max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.choices[0].finish_reason == "length"
    stream = Stream(serve, "metrics-mig", "The quick brown fox jumps", MIGRATED_TOKENS, 7)
    stream.start()
    assert stream.started.wait(30)
    source = instance_of(serve, "metrics-mig")
    instances = llmctl_json(serve, "instances")["instances"]
    target = next(i["info"]["instance_id"] for i in instances if i["info"]["instance_id"] != source)
    moved = llmctl_json(serve, "migrate", "metrics-mig", "--to", target)
    assert moved["outcome"] == "MIGRATION_OUTCOME_COMMITTED", moved
    stream.join(90)
    assert stream.error is None and stream.finish_reason == "length", stream.error


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Component, Scrape]]:
    """serve, driven, and a scrape taken once the leader's view of the migration reached the frontend."""
    launcher = Launcher(tmp_path_factory.mktemp("serve-metrics"))
    serve = start_serve(launcher)
    try:
        drive(serve)

        def settled() -> Scrape | None:
            s = scrape_all(serve)
            done = sum(s.values("frontend", "llumnix_migrations_total", outcome="committed")) >= 1
            idle = sum(s.values("llumlet", "vllm:num_requests_running")) == 0
            return s if done and idle else None

        yield serve, wait_for(settled, 30, "the migration on the frontend's /metrics and idle instances")
    finally:
        assert serve.terminate(30) == 0, serve.log()[-2000:]
