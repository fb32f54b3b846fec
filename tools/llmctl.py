"""``llmctl``: the operator's command line for a Llumnix cluster (the AdminService of the scheduler replicas).

Every command takes ``--output`` / ``-o`` with kubectl's meanings: ``table`` (default), ``wide`` (the table with more
columns), ``json`` and ``yaml`` (the same data: the protobuf JSON mapping with snake_case field names, every field
printed, enums by name, so scripts can rely on it), ``name`` (``instance/<id>``, ``request/<id>``, ... one a line).
Tables never truncate a cell: on a terminal they are as wide as their content needs; piped or redirected they are
plain space-aligned columns with full ids (no box drawing, no colour, no trailing spaces). Exit codes (also in
``llmctl --help``):

  0 success · 1 the cluster refused or failed the command (NOT_FOUND, FAILED_PRECONDITION, ...), or the operation
  did not happen although the call returned (an aborted migration, another scale target or config value) ·
  2 usage error or invalid argument (a local check or the server's INVALID_ARGUMENT) · 3 cluster unreachable / no
  leader / no answer within --timeout (a write that lost its connection or timed out after it was sent may or may
  not have been applied) · 4 timed out waiting (drain --wait) · 130 interrupted.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pyllumnix.clients import config_paths
from pyllumnix.clients.channel import TlsConfig, normalize_endpoints
from pyllumnix.clients.client import AsyncLlumnixClient
from pyllumnix.clients.errors import (
    AbortedError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    LlumnixError,
    NoLeaderError,
    NotFoundError,
    UnavailableError,
)
from pyllumnix.infra.cli_types import FiniteFloatRange
from pyllumnix.infra.security.ca import role_name
from pyllumnix.infra.security.context import ContextError, context_path, load_context
from pyllumnix.protos.llumnix.v1 import admin_pb2, common_pb2, llumlet_pb2, scheduler_pb2

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130

OUTPUTS = ("table", "wide", "json", "yaml", "name")
TABLES = ("table", "wide")
# Width of the console a table is laid out on before it is printed: wide enough that no cell is ever truncated.
UNBOUNDED_WIDTH = 1 << 16
ENV_ENDPOINT = "LLUMNIX_ENDPOINT"
ENV_API_KEY = "LLUMNIX_API_KEY"
# Upper bounds of the proto fields integer arguments go into (ScaleRequest.target_instances is int32,
# SetConfigRequest.expected_revision int64): a larger number is a usage error, not protobuf's ValueError.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
# Longest a call or a wait may be given (one day): a bound, so no value turns into a deadline grpc cannot represent.
MAX_SECONDS = 86400.0


def seconds(minimum: float) -> FiniteFloatRange:
    """A duration option's type: finite, at least ``minimum``, at most a day."""
    return FiniteFloatRange(min=minimum, max=MAX_SECONDS)


@dataclass
class Settings:
    endpoints: tuple[str, ...]
    tls: bool
    ca: str | None
    cert: str | None
    key: str | None
    server_name: str | None
    timeout: float
    output: str
    api_key: str | None = None
    context: str | None = None


# --- output helpers --------------------------------------------------------------------------------------------


def console(stderr: bool = False) -> Console:
    """A console bound to the current stdout/stderr (so click's test runner captures it)."""
    return Console(file=sys.stderr if stderr else sys.stdout, soft_wrap=False, highlight=False)


def new_table(columns: Sequence[tuple[str, str]], *, title: str | None = None) -> Table:
    """A table whose cells never wrap (print_table makes room for them instead of truncating)."""
    table = Table(title=title, title_justify="left")
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    return table


def print_table(table: Table) -> None:
    """Prints a table with every cell in full (kubectl never truncates either).

    On a terminal: rich's boxed table, widened past the terminal when its content needs it (the terminal wraps the
    line; an ellipsis would lose data). Piped or redirected: plain columns separated by two spaces, no trailing
    spaces, the same for every consumer (grep, awk, logs).
    """
    out = console()
    if out.is_terminal:
        needed = Console(width=UNBOUNDED_WIDTH).measure(table).maximum
        if needed > out.width:
            out = Console(file=sys.stdout, soft_wrap=False, highlight=False, width=needed)
        out.print(table)
        return
    table.box = None
    table.show_edge = False
    table.pad_edge = False
    table.header_style = ""
    table.title_style = ""
    table.caption_style = ""
    buf = io.StringIO()
    Console(file=buf, width=UNBOUNDED_WIDTH, soft_wrap=False, highlight=False, color_system=None).print(table)
    click.echo("\n".join(line.rstrip() for line in buf.getvalue().splitlines()))


def to_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def emit_json(data: Message | dict[str, Any], *, compact: bool = False) -> None:
    payload = to_dict(data) if isinstance(data, Message) else data
    click.echo(json.dumps(payload, indent=None if compact else 2, sort_keys=False))


def emit_yaml(data: Message | dict[str, Any], *, document_start: bool = False) -> None:
    """The same data as ``-o json`` (it parses to equal objects), as YAML; ``document_start`` begins it with ---."""
    payload = to_dict(data) if isinstance(data, Message) else data
    text = yaml.safe_dump(
        payload, sort_keys=False, default_flow_style=False, allow_unicode=True, explicit_start=document_start
    )
    click.echo(text, nl=False)


def emit_data(fmt: str, data: Message | dict[str, Any]) -> bool:
    """Prints ``data`` for ``-o json`` or ``-o yaml``; False for the other formats (the caller prints those)."""
    if fmt == "json":
        emit_json(data)
    elif fmt == "yaml":
        emit_yaml(data)
    else:
        return False
    return True


def emit_names(kind: str, ids: Sequence[str]) -> None:
    """``-o name``: one ``kind/id`` a line, as kubectl prints ``pod/web-0``."""
    for ident in ids:
        click.echo(f"{kind}/{ident}")


def enum_short(value: int, enum: Any, prefix: str) -> str:
    name = str(enum.Name(value)) if value in enum.values() else str(value)
    return name.removeprefix(prefix).lower()


def fmt_freeness(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.1f}"


def instance_id_of(st: scheduler_pb2.InstanceStatus) -> str:
    return st.info.instance_id or st.load.instance_id


def instances_table(
    instances: Sequence[scheduler_pb2.InstanceStatus], title: str | None = None, *, wide: bool = False
) -> Table:
    columns = [
        ("ID", "left"),
        ("STATE", "left"),
        ("FREENESS", "right"),
        ("BLOCKS", "right"),
        ("RUNNING", "right"),
        ("WAITING", "right"),
        ("PREEMPTED", "right"),
        ("MIGRATING", "left"),
    ]
    if wide:
        columns += [
            ("ADDRESS", "left"),
            ("ENGINE", "left"),
            ("MODEL", "left"),
            ("TRANSPORT", "left"),
            ("HOST", "left"),
            ("PREEMPTIONS", "right"),
            ("MIGRATIONS IN/OUT", "right"),
        ]
    table = new_table(columns, title=title)
    for st in sorted(instances, key=instance_id_of):
        load, info = st.load, st.info
        total = load.total_blocks or info.total_blocks
        used = f"{total - load.free_blocks}/{total}" if st.HasField("load") else f"-/{total}"
        migrating = [d for d, on in (("in", load.migrating_in), ("out", load.migrating_out)) if on]
        row = [
            instance_id_of(st),
            enum_short(st.state, common_pb2.InstanceState, "INSTANCE_STATE_"),
            fmt_freeness(st.freeness),
            used,
            str(load.num_running),
            str(load.num_waiting),
            str(load.num_preempted),
            ",".join(migrating) or "-",
        ]
        if wide:
            row += [
                info.grpc_address or "-",
                info.engine or "-",
                info.model or "-",
                info.transport or "-",
                info.hostname or "-",
                str(load.total_preemptions),
                f"{load.total_migrations_in}/{load.total_migrations_out}",
            ]
        table.add_row(*row)
    return table


def kv_table(rows: Sequence[tuple[str, str]]) -> Table:
    table = new_table([("KEY", "left"), ("VALUE", "left")])
    for key, value in rows:
        table.add_row(key, value)
    return table


def status_line(verb: str, st: scheduler_pb2.InstanceStatus) -> str:
    state = enum_short(st.state, common_pb2.InstanceState, "INSTANCE_STATE_")
    return f"{verb} {st.info.instance_id or st.load.instance_id} (state: {state})"


# --- running commands ------------------------------------------------------------------------------------------


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"llmctl: {message}", err=True)
    raise SystemExit(code)


def settings_of(ctx: click.Context) -> Settings:
    obj = ctx.find_object(Settings)
    if obj is None:  # pragma: no cover - the group always sets it
        raise click.UsageError("llmctl settings missing")
    return obj


def output_of(ctx: click.Context, output: str | None) -> str:
    return output or settings_of(ctx).output


def make_client(settings: Settings) -> AsyncLlumnixClient:
    """A client from the flags; with no --endpoint, from the client context file (``llumnix serve`` writes it:
    scheduler addresses, CA, admin certificate and API key), as the Python client does.

    With the context's endpoints, a TLS flag overrides only its own part of the context's TLS settings: an API key
    from ``LLUMNIX_API_KEY`` (which ``llumnix bench serving`` and OpenAI scripts use too) replaces the key but keeps the
    context's CA, which verifies the cluster's servers, and its admin certificate, which AdminService authorizes by.
    """
    try:
        endpoints = normalize_endpoints(settings.endpoints)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    ca, cert, key = settings.ca, settings.cert, settings.key
    server_name, api_key = settings.server_name, settings.api_key
    use_tls = bool(settings.tls or ca or cert or key or api_key)
    where = "TLS"
    if not endpoints:
        try:
            context = load_context(name=settings.context)
        except ContextError as exc:
            raise click.UsageError(str(exc)) from None
        if context is None or not context.scheduler:
            why = f"the client context file {context_path()} " + ("has none" if context else "does not exist")
            raise click.UsageError(f"no endpoint: pass --endpoint HOST:PORT or set {ENV_ENDPOINT} ({why})")
        try:
            endpoints = normalize_endpoints(context.scheduler)
        except ValueError as exc:
            raise click.UsageError(f"context {context.name!r} of {context_path()}: {exc}") from None
        if context.ca is not None:
            if not use_tls:
                where = f"TLS files of context {context.name!r}"
            use_tls = True
            cluster_ca = ca is None and cert is None and key is None and context.checks_role_names()
            ca = ca or str(context.ca)
            if cert is None and key is None and context.cert is not None and context.key is not None:
                cert, key = str(context.cert), str(context.key)
            # Serve's context, its files unchanged: the cluster CA, whose scheduler certificates name their role.
            server_name = server_name or context.server_name or (role_name("scheduler") if cluster_ca else None)
            api_key = api_key or context.api_key or None
    elif settings.context is not None:
        raise click.UsageError("--context and --endpoint exclude each other (a context names its own endpoints)")
    tls: TlsConfig | None = None
    if use_tls:
        try:
            tls = TlsConfig.from_files(ca, cert, key, server_name, api_key=api_key)
        except (OSError, ValueError) as exc:
            raise click.UsageError(f"{where}: {exc}") from None
    return AsyncLlumnixClient(scheduler_endpoints=endpoints, tls=tls, timeout=settings.timeout)


def run(ctx: click.Context, body: Callable[[AsyncLlumnixClient], Awaitable[T]], *, subject: str = "") -> T:
    """Runs ``body`` with a client and turns every client error into a message and an exit code (no traceback)."""
    client = make_client(settings_of(ctx))

    async def main() -> T:
        async with client:
            return await body(client)

    try:
        return asyncio.run(main())
    except LlumnixError as exc:
        fail(*describe_error(exc, client, subject))
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)


def describe_error(exc: LlumnixError, client: AsyncLlumnixClient, subject: str) -> tuple[str, int]:
    """The message and exit code of a client error (the exit codes of the module docstring)."""
    if isinstance(exc, NotFoundError):
        return (f"unknown {subject}: {exc.details}" if subject else f"not found: {exc.details}"), EXIT_ERROR
    if isinstance(exc, InvalidArgumentError):
        return f"invalid argument: {exc.details}", EXIT_USAGE
    if isinstance(exc, NoLeaderError):
        return f"no scheduler leader reachable via [{', '.join(exc.endpoints)}]: {exc.details}", EXIT_UNAVAILABLE
    if isinstance(exc, UnavailableError):
        if not exc.may_have_started:
            where = ", ".join(exc.endpoints or client.scheduler_pool.endpoints)
            return f"cannot reach the cluster at [{where}]: {exc.details}", EXIT_UNAVAILABLE
        return f"connection lost during the call, it may or may not have been applied: {exc}", EXIT_UNAVAILABLE
    if isinstance(exc, DeadlineExceededError):
        # Like a connection lost after sending: a write that timed out may still be applied by the cluster.
        within = f"within {client.timeout:g}s (--timeout)"
        if exc.may_have_started:
            return f"no answer {within}, the call may or may not have been applied: {exc}", EXIT_UNAVAILABLE
        return f"no answer {within}: {exc}", EXIT_UNAVAILABLE
    if isinstance(exc, FailedPreconditionError):
        return f"refused: {exc.details}", EXIT_ERROR
    if isinstance(exc, AbortedError):
        return f"aborted: {exc.details}", EXIT_ERROR
    return f"{exc.code or 'error'}: {exc.details}", EXIT_ERROR


output_option = click.option(
    "--output",
    "-o",
    type=click.Choice(OUTPUTS),
    default=None,
    help="table (default), wide (more columns), json or yaml (protobuf JSON mapping, stable for scripts), "
    "name (kind/id lines).",
)


# --- the commands ----------------------------------------------------------------------------------------------


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    epilog="Exit codes: 0 ok, 1 refused/not found/not done (e.g. migration aborted), 2 usage or invalid argument, "
    "3 cluster unreachable, no leader or no answer within --timeout, 4 timed out waiting, 130 interrupted.",
)
@click.option(
    "--endpoint",
    "-e",
    "endpoints",
    multiple=True,
    envvar=ENV_ENDPOINT,
    metavar="HOST:PORT",
    help=f"Scheduler replica address; repeat or comma-separate for several (env {ENV_ENDPOINT}).",
)
@click.option("--tls/--no-tls", default=False, help="Use TLS (implied by --ca/--cert/--key).")
@click.option("--ca", type=click.Path(dir_okay=False), default=None, help="PEM root certificates.")
@click.option("--cert", type=click.Path(dir_okay=False), default=None, help="PEM client certificate (mTLS).")
@click.option("--key", type=click.Path(dir_okay=False), default=None, help="PEM client private key (mTLS).")
@click.option("--server-name", default=None, help="TLS server name override.")
@click.option(
    "--api-key",
    envvar=ENV_API_KEY,
    default=None,
    help=f"API key, sent as 'authorization: Bearer' (implies --tls; env {ENV_API_KEY}). With the context file, "
    "this and --ca/--cert/--key/--server-name replace only their own part of the context's TLS settings.",
)
@click.option(
    "--context",
    "context_name",
    default=None,
    metavar="NAME",
    help="Context of the client context file to use when no --endpoint is given (default: its current one; the "
    "file: $LLUMNIX_CONTEXT or ~/.config/llumnix/context.yaml, written by `llumnix serve`).",
)
@click.option("--timeout", type=seconds(0.01), default=10.0, show_default=True, help="Seconds per call.")
@output_option
@click.version_option(package_name="pyllumnix")
@click.pass_context
def cli(
    ctx: click.Context,
    endpoints: tuple[str, ...],
    tls: bool,
    ca: str | None,
    cert: str | None,
    key: str | None,
    server_name: str | None,
    api_key: str | None,
    context_name: str | None,
    timeout: float,
    output: str | None,
) -> None:
    """Operate a Llumnix cluster: instances, requests, migration, drain/cordon, scaling, config, leader."""
    ctx.obj = Settings(
        endpoints, tls, ca, cert, key, server_name, timeout, output or "table", api_key or None, context_name
    )


@cli.command()
@output_option
@click.pass_context
def instances(ctx: click.Context, output: str | None) -> None:
    """List instances with their state and load."""
    fmt = output_of(ctx, output)
    found = run(ctx, lambda c: c.list_instances())
    if emit_data(fmt, admin_pb2.ListInstancesResponse(instances=found)):
        return
    if fmt == "name":
        emit_names("instance", sorted(instance_id_of(st) for st in found))
    else:
        print_table(instances_table(found, wide=fmt == "wide"))


@cli.command()
@click.option("--instance", "-i", "instance_id", default="", help="Only this instance's requests.")
@output_option
@click.pass_context
def requests(ctx: click.Context, instance_id: str, output: str | None) -> None:
    """List requests (of one instance or of every instance)."""
    fmt = output_of(ctx, output)
    found = run(ctx, lambda c: c.list_requests(instance_id), subject=f"instance {instance_id!r}")
    if emit_data(fmt, admin_pb2.ListClusterRequestsResponse(requests=found)):
        return
    ordered = sorted(found, key=lambda r: (r.instance_id, r.request.arrival_time, r.request.request_id))
    if fmt == "name":
        emit_names("request", [item.request.request_id for item in ordered])
        return
    wide = fmt == "wide"
    columns = [("REQUEST", "left"), ("INSTANCE", "left"), ("PHASE", "left"), ("PRIORITY", "left")]
    columns += [(name, "right") for name in ("BLOCKS", "PROMPT", "OUTPUT", "PREEMPTIONS")]
    if wide:
        columns += [("DEMAND", "right"), ("FRONTEND", "left")]
    table = new_table(columns)
    for item in ordered:
        r = item.request
        row = [
            r.request_id,
            item.instance_id,
            enum_short(r.phase, common_pb2.RequestPhase, "REQUEST_PHASE_"),
            enum_short(r.priority, common_pb2.Priority, "PRIORITY_"),
            str(r.num_blocks),
            str(r.num_prompt_tokens),
            str(r.num_output_tokens),
            str(r.num_preemptions),
        ]
        if wide:
            row += [str(r.demand_blocks), r.frontend_address or "-"]
        table.add_row(*row)
    print_table(table)


@cli.command()
@click.argument("request_id", metavar="REQUEST")
@click.option("--to", "destination", required=True, metavar="INSTANCE", help="Destination instance id.")
@output_option
@click.pass_context
def migrate(ctx: click.Context, request_id: str, destination: str, output: str | None) -> None:
    """Live-migrate one request to another instance."""
    result = run(ctx, lambda c: c.migrate(request_id, destination), subject=f"request or instance ({request_id!r})")
    committed = result.outcome == llumlet_pb2.MIGRATION_OUTCOME_COMMITTED
    outcome = enum_short(result.outcome, llumlet_pb2.MigrationOutcome, "MIGRATION_OUTCOME_")
    fmt = output_of(ctx, output)
    if emit_data(fmt, result):
        pass
    elif fmt == "name":
        emit_names("request", [result.request_id or request_id])
    else:
        text = (
            f"migration {result.migration_id or '-'} of {result.request_id or request_id}: "
            f"{result.source_instance_id or '?'} -> {result.destination_instance_id or destination}: {outcome}"
        )
        if committed:
            text += f" ({result.stages} stages, downtime {result.downtime_ms:.1f} ms, total {result.total_ms:.1f} ms)"
        elif result.reason:
            text += f" ({result.reason})"
        click.echo(text)
    if not committed:
        # The request did not move: the operation did not happen, whatever the call returned.
        fail(f"request {request_id} was not migrated: {outcome} ({result.reason or 'no reason given'})", EXIT_ERROR)


async def _wait_drained(
    client: AsyncLlumnixClient, instance_id: str, timeout: float, interval: float, show: bool
) -> int:
    """Polls the instance's requests until none is left or it is gone; returns how many remain (0: drained)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    progress = Progress(
        TextColumn("draining {task.fields[instance]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("requests moved"),
        TimeElapsedColumn(),
        console=console(stderr=True),
        disable=not show,
        transient=False,
    )
    remaining = -1
    with progress:
        task = progress.add_task("drain", total=None, instance=instance_id)
        initial: int | None = None
        while True:
            try:
                remaining = len(await client.list_requests(instance_id))
            except NotFoundError:
                remaining = 0  # the instance stopped: drained
            if initial is None:
                initial = remaining
            initial = max(initial, remaining)
            progress.update(task, total=max(initial, 1), completed=(initial - remaining) if initial else 1)
            if remaining == 0 or loop.time() >= deadline:
                return remaining
            await asyncio.sleep(min(interval, max(deadline - loop.time(), 0.0)))


@cli.command()
@click.argument("instance_id", metavar="INSTANCE")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the instance is empty or gone.")
@click.option("--timeout", "wait_timeout", type=seconds(0), default=600.0, show_default=True)
@click.option("--interval", type=seconds(0.01), default=1.0, show_default=True, help="Poll period (s).")
@output_option
@click.pass_context
def drain(
    ctx: click.Context, instance_id: str, wait: bool, wait_timeout: float, interval: float, output: str | None
) -> None:
    """Drain an instance: it takes nothing new, migrates its requests out and stops when empty."""
    fmt = output_of(ctx, output)
    subject = f"instance {instance_id!r}"

    async def body(c: AsyncLlumnixClient) -> tuple[scheduler_pb2.InstanceStatus, int, tuple[str, int] | None]:
        status = await c.drain(instance_id)
        if not wait:
            return status, -1, None
        show = fmt in TABLES and console(stderr=True).is_terminal
        try:
            left = await _wait_drained(c, instance_id, wait_timeout, interval, show=show)
        except LlumnixError as exc:
            # The drain was accepted and goes on without us: say so, or the operator would think nothing happened.
            return status, -1, describe_error(exc, c, subject)
        return status, left, None

    status, left, wait_failed = run(ctx, body, subject=subject)
    if wait_failed is not None:
        message, code = wait_failed
        fail(f"drain of {instance_id} accepted; waiting for it failed: {message}", code)
    if emit_data(fmt, {"instance": to_dict(status), "waited": wait, "drained": left == 0, "remaining_requests": left}):
        pass
    elif fmt == "name":
        emit_names("instance", [instance_id_of(status) or instance_id])
    elif not wait:
        click.echo(status_line("draining", status))
    elif left == 0:
        click.echo(f"drained {instance_id}")
    if wait and left > 0:
        fail(f"timed out after {wait_timeout:g}s: {left} request(s) still on {instance_id}", EXIT_TIMEOUT)


@cli.command()
@click.argument("instance_id", metavar="INSTANCE")
@output_option
@click.pass_context
def cordon(ctx: click.Context, instance_id: str, output: str | None) -> None:
    """Stop dispatching and migrating to an instance (it keeps serving what it has)."""
    status = run(ctx, lambda c: c.cordon(instance_id), subject=f"instance {instance_id!r}")
    fmt = output_of(ctx, output)
    if emit_data(fmt, status):
        return
    if fmt == "name":
        emit_names("instance", [instance_id_of(status) or instance_id])
    else:
        click.echo(status_line("cordoned", status))


@cli.command()
@click.argument("instance_id", metavar="INSTANCE")
@output_option
@click.pass_context
def uncordon(ctx: click.Context, instance_id: str, output: str | None) -> None:
    """Make a cordoned instance eligible again."""
    status = run(ctx, lambda c: c.uncordon(instance_id), subject=f"instance {instance_id!r}")
    fmt = output_of(ctx, output)
    if emit_data(fmt, status):
        return
    if fmt == "name":
        emit_names("instance", [instance_id_of(status) or instance_id])
    else:
        click.echo(status_line("uncordoned", status))


@cli.command()
@click.argument("target", type=click.IntRange(min=0, max=INT32_MAX), metavar="N")
@output_option
@click.pass_context
def scale(ctx: click.Context, target: int, output: str | None) -> None:
    """Set the target number of instances."""
    fmt = output_of(ctx, output)
    if fmt == "name":
        raise click.UsageError("scale names no object: use -o table, wide, json or yaml")
    reply = run(ctx, lambda c: c.scale(target))
    if not emit_data(fmt, reply):
        click.echo(f"target instances: {reply.target_instances} (current: {reply.current_instances})")
    if reply.target_instances != target:
        fail(f"the cluster set the target to {reply.target_instances}, not {target}", EXIT_ERROR)


@cli.group(invoke_without_command=True)
@output_option
@click.pass_context
def leader(ctx: click.Context, output: str | None) -> None:
    """Show the scheduler leader (`leader resign`: make it step down)."""
    if ctx.invoked_subcommand is not None:
        return
    fmt = output_of(ctx, output)
    reply = run(ctx, lambda c: c.leader())
    if emit_data(fmt, reply):
        return
    if fmt == "name":
        emit_names("scheduler", [reply.leader_id] if reply.leader_id else [])
        return
    by = reply.answered_by
    rows = [
        ("leader", reply.leader_id or "(none)"),
        ("address", reply.leader_address or "-"),
        ("term", str(reply.term)),
        ("answered by", f"{by.replica_id} ({by.grpc_address}{', leader' if by.leader else ''})"),
    ]
    print_table(kv_table(rows))


@leader.command("resign")
@output_option
@click.pass_context
def leader_resign(ctx: click.Context, output: str | None) -> None:
    """The current leader steps down gracefully: a standby takes over at once, the old leader stays out of the
    election for a short hold-off. Exit 3 when there is no leader."""
    reply = run(ctx, lambda c: c.resign_leader())
    if not reply.resigned.replica_id:
        fail("the cluster answered but named no resigned replica", EXIT_ERROR)
    fmt = output_of(ctx, output)
    if emit_data(fmt, reply):
        return
    if fmt == "name":
        emit_names("scheduler", [reply.resigned.replica_id])
        return
    click.echo(
        f"{reply.resigned.replica_id} resigned leadership (term {reply.term}); "
        f"it stays out of the election for {reply.hold_off_ms / 1000:g}s"
    )


@cli.group()
def config() -> None:
    """Read or change the cluster config (KEY is a dotted path, e.g. migration.migrate_out_threshold)."""


@config.command("get")
@click.argument("key", required=False)
@output_option
@click.pass_context
def config_get(ctx: click.Context, key: str | None, output: str | None) -> None:
    """Show the whole config, or one KEY."""
    if key is not None:
        try:
            config_paths.resolve(key)
        except config_paths.ConfigPathError as exc:
            fail(str(exc), EXIT_USAGE)
    reply = run(ctx, lambda c: c.get_config())
    fmt = output_of(ctx, output)
    if key is not None:
        value = config_paths.get_path(reply.config, key)
        if emit_data(fmt, {"key": key, "value": value, "revision": str(reply.revision)}):
            return
        if fmt == "name":
            emit_names("config", [key])
        else:
            click.echo(config_paths.format_value(value))
        return
    if emit_data(fmt, reply):
        return
    if fmt == "name":
        emit_names("config", list(config_paths.all_paths()))
        return
    rows = [(p, config_paths.format_value(config_paths.get_path(reply.config, p))) for p in config_paths.all_paths()]
    table = kv_table(rows)
    table.caption = f"revision {reply.revision}"
    print_table(table)


# ignore_unknown_options lets a negative VALUE ("-1") through as an argument instead of an unknown option.
@config.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("key")
@click.argument("value")
@click.option(
    "--expected-revision",
    type=click.IntRange(min=0, max=INT64_MAX),
    default=0,
    help="Apply only if the stored config is at this revision.",
)
@output_option
@click.pass_context
def config_set(ctx: click.Context, key: str, value: str, expected_revision: int, output: str | None) -> None:
    """Set one KEY to VALUE (parsed by the key's type; enums by name, e.g. dispatch.policy round-robin)."""
    try:
        config_paths.make_update({key: value})
    except config_paths.ConfigPathError as exc:
        fail(str(exc), EXIT_USAGE)
    wanted, _ = config_paths.make_update({key: value})
    # A zero scalar without presence means "the default" (config.proto): the cluster answers with the default it
    # applied, which is what was asked, not a refusal.
    takes_default = _zero_means_default(wanted, key)
    reply = run(ctx, lambda c: c.set_config({key: value}, expected_revision=expected_revision))
    fmt = output_of(ctx, output)
    held = config_paths.get_path(reply.config, key)
    if emit_data(fmt, reply):
        pass
    elif fmt == "name":
        emit_names("config", [key])
    else:
        note = "the cluster's default for 0; " if takes_default and held != config_paths.get_path(wanted, key) else ""
        click.echo(f"{key} = {config_paths.format_value(held)} ({note}revision {reply.revision})")
    if reply.revision <= 0 or (not takes_default and held != config_paths.get_path(wanted, key)):
        fail(f"{key} was not applied as asked (the cluster holds {held!r})", EXIT_ERROR)


def _zero_means_default(config: Message, key: str) -> bool:
    """Whether ``key`` in ``config`` is a scalar without presence left at its zero value, which the cluster reads as
    "use the default" and echoes as that default."""
    chain = config_paths.resolve(key)
    leaf = chain[-1]
    if leaf.has_presence or leaf.message_type is not None or leaf.is_repeated:
        return False
    msg = config
    for field in chain[:-1]:
        msg = getattr(msg, field.name)
    return bool(getattr(msg, leaf.name) == leaf.default_value)


@cli.command()
@click.option("--interval", type=seconds(0.05), default=2.0, show_default=True, help="Seconds.")
@click.option("--count", type=click.IntRange(min=0), default=0, help="Refreshes before exiting (0: until Ctrl-C).")
@output_option
@click.pass_context
def watch(ctx: click.Context, interval: float, count: int, output: str | None) -> None:
    """Live view of the instances table (json: one line per refresh; yaml: one document per refresh; name: the
    instance names of each refresh, then an empty line)."""
    fmt = output_of(ctx, output)
    out = console()

    async def body(c: AsyncLlumnixClient) -> None:
        live: Live | None = None
        if fmt in TABLES and out.is_terminal:
            live = Live(console=out, auto_refresh=False)
            live.start()
        try:
            n = 0
            while True:
                found = await c.list_instances()
                n += 1
                if fmt == "json":
                    emit_json(admin_pb2.ListInstancesResponse(instances=found), compact=True)
                elif fmt == "yaml":
                    emit_yaml(admin_pb2.ListInstancesResponse(instances=found), document_start=True)
                elif fmt == "name":
                    emit_names("instance", sorted(instance_id_of(st) for st in found))
                    click.echo("")
                else:
                    title = f"{time.strftime('%H:%M:%S')}  ({len(found)} instances, every {interval:g}s)"
                    table = instances_table(found, title=title, wide=fmt == "wide")
                    if live is not None:
                        live.update(table, refresh=True)
                    else:
                        print_table(table)
                if count and n >= count:
                    return
                await asyncio.sleep(interval)
        finally:
            if live is not None:
                live.stop()

    run(ctx, body)


def main() -> None:
    """Entry point of the ``llmctl`` script."""
    cli(prog_name="llmctl")


if __name__ == "__main__":
    main()
