"""The ``llumnix`` command: one entry point, sub-commands loaded lazily from their own modules.

Each sub-command lives in the module named below (a click command object); importing only the one invoked keeps
``llumnix --help`` fast and lets each component start on its own host.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

# name -> "module:attribute" under pyllumnix; add a line here to add a sub-command.
COMMANDS: dict[str, str] = {
    "llumlet": "data_plane.llumlet.main:llumlet_command",
    "scheduler": "control_plane.scheduler.main:scheduler_command",
    "frontend": "control_plane.frontend.main:frontend_command",
    "sim": "tools.sim.cli:sim",
    "serve": "tools.serve:serve_command",
    "drill": "tools.drill.cli:drill_command",
}
BENCH_COMMANDS: dict[str, str] = {
    "engine": "tools.bench_engine:bench_engine",
    "dataplane": "tools.bench_dataplane:bench_dataplane",
    "sim": "tools.sim.bench:bench_sim",
    "migration": "tools.bench_migration:bench_migration",
    "serving": "tools.bench_serving:bench_serving",
    "dispatch": "tools.bench_dispatch:bench_dispatch",
    "peers": "tools.bench_peers:bench_peers",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            module_name, attr = self._lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(f"pyllumnix.{module_name}"), attr)
            if not isinstance(command, click.Command):
                raise click.ClickException(f"{self._lazy[cmd_name]} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, lazy=COMMANDS)
@click.version_option(package_name="pyllumnix")
def cli() -> None:
    """Llumnix-style dynamic scheduling for LLM serving."""


@cli.group(cls=LazyGroup, lazy=BENCH_COMMANDS)
def bench() -> None:
    """Benchmarks: each prints JSON figures and a one-line summary."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
