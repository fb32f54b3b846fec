"""llmctl against a fake scheduler replica: table/wide/json/yaml/name output, config parsing, errors and exit codes."""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from click.testing import CliRunner, Result

from pyllumnix.clients.client import AsyncLlumnixClient
from pyllumnix.clients.errors import UnavailableError
from pyllumnix.infra.etcd.keys import KeyLayout
from pyllumnix.infra.grpc_server import RunningServer
from pyllumnix.infra.security.apikeys import ApiKeyInterceptor, ApiKeyStore
from pyllumnix.infra.security.authz import RoleInterceptor
from pyllumnix.infra.security.bootstrap import bootstrap_local, provision_admin
from pyllumnix.infra.security.context import ClientContext, load_context
from pyllumnix.infra.security.tls import grpc_server_credentials
from pyllumnix.protos.llumnix.v1 import admin_pb2_grpc, common_pb2, config_pb2, llumlet_pb2
from pyllumnix.tools.llmctl import EXIT_ERROR, EXIT_TIMEOUT, EXIT_UNAVAILABLE, EXIT_USAGE, cli
from tests.test_clients_fakes import (
    FakeAdmin,
    Replica,
    dead_address,
    instance,
    request_load,
    serve_replica,
    stop_all,
)
from tests.test_infra_apikeys import FakeKV

# No context file unless a test writes one: a developer's own ~/.config/llumnix/context.yaml must not leak in.
NO_CONTEXT = str(Path(tempfile.gettempdir()) / f"llmctl-test-no-context-{uuid.uuid4().hex}.yaml")
ENV = {"COLUMNS": "200", "LLUMNIX_ENDPOINT": "", "LLUMNIX_CONTEXT": NO_CONTEXT, "LLUMNIX_API_KEY": ""}


async def llmctl(*args: str, env: dict[str, str] | None = None) -> Result:
    """Runs the CLI in a worker thread (it runs its own event loop) while the fake server serves on this loop."""
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, cli, list(args), env={**ENV, **(env or {})}, catch_exceptions=False)


@pytest.fixture
async def replica() -> AsyncIterator[tuple[RunningServer, Replica, FakeAdmin]]:
    r = Replica("s-0", leader=True)
    server, admin = await serve_replica(r)
    yield server, r, admin
    await server.stop(None)


async def test_instances_table_and_json(replica: tuple[RunningServer, Replica, FakeAdmin]) -> None:
    server, _, _ = replica
    res = await llmctl("-e", server.address, "instances")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    header = next(line for line in lines if "ID" in line)
    for col in ("STATE", "FREENESS", "BLOCKS", "RUNNING", "WAITING", "PREEMPTED", "MIGRATING"):
        assert col in header
    row1 = next(line for line in lines if "i-1" in line)
    assert "active" in row1 and "60/100" in row1 and "12.5" in row1
    row2 = next(line for line in lines if "i-2" in line)
    assert "inf" in row2 and "10/100" in row2 and "out" in row2

    res = await llmctl("-e", server.address, "instances", "-o", "json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    ids = [i["info"]["instance_id"] for i in data["instances"]]
    assert ids == ["i-1", "i-2"]
    assert data["instances"][0]["state"] == "INSTANCE_STATE_ACTIVE"
    assert data["instances"][1]["freeness"] == "Infinity"
    assert data["instances"][0]["load"]["num_preempted"] == 0  # every field printed, stable for scripts
    # The group-level option works too.
    res = await llmctl("-e", server.address, "--output", "json", "instances")
    assert json.loads(res.stdout) == data


async def test_requests_and_not_found(replica: tuple[RunningServer, Replica, FakeAdmin]) -> None:
    server, _, _ = replica
    res = await llmctl("-e", server.address, "requests")
    assert res.exit_code == 0, res.output
    assert all(r in res.stdout for r in ("r-1", "r-2", "r-3")) and "running" in res.stdout
    res = await llmctl("-e", server.address, "requests", "--instance", "i-2", "-o", "json")
    assert [r["request"]["request_id"] for r in json.loads(res.stdout)["requests"]] == ["r-3"]
    res = await llmctl("-e", server.address, "requests", "--instance", "i-9")
    assert res.exit_code == EXIT_ERROR
    assert "unknown instance 'i-9'" in res.stderr
    assert "Traceback" not in res.output


async def test_cordon_uncordon_scale_migrate_leader(replica: tuple[RunningServer, Replica, FakeAdmin]) -> None:
    server, r, admin = replica
    ep = ["-e", server.address]
    res = await llmctl(*ep, "cordon", "i-1")
    assert res.exit_code == 0 and "cordoned i-1 (state: cordoned)" in res.stdout
    assert admin.instances["i-1"].state == common_pb2.INSTANCE_STATE_CORDONED
    res = await llmctl(*ep, "uncordon", "i-1", "-o", "json")
    assert json.loads(res.stdout)["state"] == "INSTANCE_STATE_ACTIVE"
    res = await llmctl(*ep, "cordon", "i-404")
    assert res.exit_code == EXIT_ERROR and "unknown instance 'i-404'" in res.stderr

    res = await llmctl(*ep, "scale", "4")
    assert res.exit_code == 0 and "target instances: 4 (current: 2)" in res.stdout
    res = await llmctl(*ep, "scale", "40")
    assert res.exit_code == EXIT_USAGE
    assert "invalid argument: target_instances: 40 is outside the range [1, 16]" in res.stderr
    admin.provider_cap = 3  # the fake runs the scheduler's own check: the provider's cap binds first
    res = await llmctl(*ep, "scale", "4")
    assert res.exit_code == EXIT_USAGE and "outside the range [1, 3]" in res.stderr and "provider cap 3" in res.stderr

    res = await llmctl(*ep, "migrate", "r-1", "--to", "i-2")
    assert res.exit_code == 0, res.output
    assert "i-1 -> i-2: committed" in res.stdout and "downtime 3.5 ms" in res.stdout
    res = await llmctl(*ep, "migrate", "r-1", "--to", "i-1")
    assert res.exit_code == EXIT_USAGE and "destination is the request's instance" in res.stderr
    res = await llmctl(*ep, "migrate", "r-nope", "--to", "i-2")
    assert res.exit_code == EXIT_ERROR and "unknown request or instance" in res.stderr

    r.fail["Scale"] = (grpc.StatusCode.FAILED_PRECONDITION, "no instance provider")
    res = await llmctl(*ep, "scale", "2")
    assert res.exit_code == EXIT_ERROR and "refused: no instance provider" in res.stderr

    res = await llmctl(*ep, "leader")
    assert res.exit_code == 0 and "s-leader" in res.stdout and server.address in res.stdout
    res = await llmctl(*ep, "leader", "-o", "json")
    assert json.loads(res.stdout)["term"] == "3"


async def test_config_get(replica: tuple[RunningServer, Replica, FakeAdmin]) -> None:
    server, _, _ = replica
    ep = ["-e", server.address]
    res = await llmctl(*ep, "config", "get")
    assert res.exit_code == 0, res.output
    assert "migration.migrate_out_threshold" in res.stdout and "DISPATCH_POLICY_LLUMNIX" in res.stdout
    assert "revision 7" in res.stdout
    res = await llmctl(*ep, "config", "get", "migration.max_stages")
    assert res.stdout.strip() == "3"
    res = await llmctl(*ep, "config", "get", "scaling.scale_up_threshold", "-o", "json")
    assert json.loads(res.stdout) == {"key": "scaling.scale_up_threshold", "value": None, "revision": "7"}
    res = await llmctl(*ep, "config", "get", "-o", "json")
    assert json.loads(res.stdout)["config"]["dispatch"]["policy"] == "DISPATCH_POLICY_LLUMNIX"
    res = await llmctl(*ep, "config", "get", "migration.bogus")
    assert res.exit_code == EXIT_USAGE and "unknown config key 'migration.bogus'" in res.stderr


@pytest.mark.parametrize(
    ("key", "value", "check"),
    [
        ("dispatch.policy", "infaas++", lambda c: c.dispatch.policy == config_pb2.DISPATCH_POLICY_INFAAS_PP),
        ("dispatch.policy", "round-robin", lambda c: c.dispatch.policy == config_pb2.DISPATCH_POLICY_ROUND_ROBIN),
        ("dispatch.policy", "Balanced", lambda c: c.dispatch.policy == config_pb2.DISPATCH_POLICY_BALANCED),
        (
            "dispatch.policy",
            "DISPATCH_POLICY_LLUMNIX",
            lambda c: c.dispatch.policy == config_pb2.DISPATCH_POLICY_LLUMNIX,
        ),
        ("migration.selection", "FCW", lambda c: c.migration.selection == common_pb2.MIGRATION_SELECTION_FCW),
        ("migration.selection", "lr", lambda c: c.migration.selection == common_pb2.MIGRATION_SELECTION_LR),
        ("migration.migrate_out_threshold", "2.5", lambda c: c.migration.migrate_out_threshold == 2.5),
        ("migration.disable", "yes", lambda c: c.migration.disable is True),
        ("scaling.max_instances", "12", lambda c: c.scaling.max_instances == 12),
        (
            "priority.headroom",
            '[{"priority": "PRIORITY_HIGH", "headroom_blocks": 8}]',
            lambda c: c.priority.headroom[0].headroom_blocks == 8,
        ),
    ],
)
async def test_config_set_parses_by_field_type(
    replica: tuple[RunningServer, Replica, FakeAdmin], key: str, value: str, check: object
) -> None:
    server, _, admin = replica
    res = await llmctl("-e", server.address, "config", "set", key, value)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"{key} = ") and "(revision 8)" in res.stdout
    sent = admin.set_requests[-1]
    assert list(sent.update_mask.paths) == [key]
    assert callable(check) and check(sent.config)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dispatch.polcy", "llumnix", "unknown config key 'dispatch.polcy': dispatch has keys policy"),
        ("nope", "1", "unknown config key 'nope'"),
        ("dispatch", "{oops", "bad value for dispatch: expected JSON"),
        ("dispatch", "1", "bad value for dispatch: Failed to parse"),
        ("dispatch.policy", "fastest", "expected one of llumnix, infaas_pp, round_robin, balanced"),
        ("dispatch.policy", "unspecified", "bad value 'unspecified'"),
        ("migration.migrate_out_threshold", "high", "expected a number"),
        ("migration.max_stages", "2.5", "expected an integer"),
        ("migration.max_stages", "99999999999", "out of range"),
        ("migration.disable", "maybe", "expected true or false"),
    ],
)
async def test_config_set_rejects_bad_key_or_value_locally(
    replica: tuple[RunningServer, Replica, FakeAdmin], key: str, value: str, message: str
) -> None:
    server, r, _ = replica
    res = await llmctl("-e", server.address, "config", "set", key, value)
    assert res.exit_code == EXIT_USAGE
    assert message in res.stderr
    assert r.calls["SetConfig"] == 0


async def test_config_set_server_rejection_and_conflict(replica: tuple[RunningServer, Replica, FakeAdmin]) -> None:
    server, _, admin = replica
    res = await llmctl("-e", server.address, "config", "set", "migration.max_stages", "4", "--expected-revision", "3")
    assert res.exit_code == EXIT_ERROR and "aborted: stale expected_revision" in res.stderr
    admin.reject_config = "migrate_out_threshold must not be negative"
    res = await llmctl("-e", server.address, "config", "set", "migration.migrate_out_threshold", "-1")
    assert res.exit_code == EXIT_USAGE
    assert "invalid argument: migrate_out_threshold must not be negative" in res.stderr


@pytest.mark.parametrize(("key", "default"), [("migration.pairing_interval_ms", "100"), ("scaling.min_instances", "1")])
async def test_config_set_zero_takes_the_default_and_succeeds(
    replica: tuple[RunningServer, Replica, FakeAdmin], key: str, default: str
) -> None:
    """0 means "the default" (config.proto): the cluster stores and echoes the default, which is what was asked.
    Before, the write happened and llmctl then exited with "was not applied as asked"."""
    server, _, admin = replica
    admin.apply_defaults = True
    res = await llmctl("-e", server.address, "config", "set", key, "0")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == f"{key} = {default} (the cluster's default for 0; revision 8)"


async def test_unreachable_cluster_names_endpoints() -> None:
    dead = [dead_address(), dead_address()]
    res = await llmctl("--endpoint", dead[0], "--endpoint", dead[1], "--timeout", "2", "instances")
    assert res.exit_code == EXIT_UNAVAILABLE
    assert f"cannot reach the cluster at [{dead[0]}, {dead[1]}]" in res.stderr
    assert "Traceback" not in res.output
    # The env var takes a comma list.
    res = await llmctl("cordon", "i-1", env={"LLUMNIX_ENDPOINT": ",".join(dead)})
    assert res.exit_code == EXIT_UNAVAILABLE and dead[1] in res.stderr
    res = await llmctl("instances")
    assert res.exit_code == EXIT_USAGE and "no endpoint" in res.output


async def test_follower_endpoint_is_redirected_and_no_leader_is_exit_3() -> None:
    leader = Replica("s-0", leader=True)
    s0, admin = await serve_replica(leader)
    follower = Replica("s-1", leader=False, leader_address=s0.address)
    s1, _ = await serve_replica(follower)
    orphan = Replica("s-2", leader=False, leader_address="")
    s2, _ = await serve_replica(orphan)
    try:
        res = await llmctl("-e", s1.address, "cordon", "i-2")
        assert res.exit_code == 0, res.output
        assert admin.instances["i-2"].state == common_pb2.INSTANCE_STATE_CORDONED
        res = await llmctl("-e", s2.address, "--timeout", "2", "cordon", "i-2")
        assert res.exit_code == EXIT_UNAVAILABLE and "no scheduler leader reachable" in res.stderr
    finally:
        await stop_all([s0, s1, s2])


async def test_drain_waits_with_progress_until_gone(replica: tuple[RunningServer, Replica, FakeAdmin]) -> None:
    server, _, admin = replica
    res = await llmctl("-e", server.address, "drain", "i-1", "--interval", "0.05")
    assert res.exit_code == 0, res.output
    assert "drained i-1" in res.stdout
    assert admin.requests["i-1"] == []
    res = await llmctl("-e", server.address, "drain", "i-2", "--no-wait", "-o", "json")
    data = json.loads(res.stdout)
    assert data["instance"]["state"] == "INSTANCE_STATE_DRAINING" and data["waited"] is False


async def test_drain_timeout_exit_code(replica: tuple[RunningServer, Replica, FakeAdmin]) -> None:
    server, _, admin = replica
    admin.requests["i-1"] = [common_pb2.RequestLoad(request_id=f"r{i}") for i in range(1000)]
    res = await llmctl("-e", server.address, "drain", "i-1", "--timeout", "0.3", "--interval", "0.1")
    assert res.exit_code == EXIT_TIMEOUT
    assert "timed out after 0.3s" in res.stderr and "still on i-1" in res.stderr


async def test_watch_is_bounded_by_count(replica: tuple[RunningServer, Replica, FakeAdmin]) -> None:
    server, r, _ = replica
    res = await llmctl("-e", server.address, "watch", "--interval", "0.05", "--count", "3", "-o", "json")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3 and all(len(json.loads(x)["instances"]) == 2 for x in lines)
    res = await llmctl("-e", server.address, "watch", "--interval", "0.05", "--count", "2")
    assert res.exit_code == 0 and res.stdout.count("i-1") == 2
    assert r.calls["ListInstances"] == 5


async def test_aborted_migration_exits_1_with_outcome_and_reason(
    replica: tuple[RunningServer, Replica, FakeAdmin],
) -> None:
    """The migration was carried out but aborted: the request did not move, so llmctl must not report success."""
    server, _, admin = replica
    admin.migration_outcome = llumlet_pb2.MIGRATION_OUTCOME_ABORTED_BY_DESTINATION
    admin.migration_reason = "destination out of blocks"
    res = await llmctl("-e", server.address, "migrate", "r-1", "--to", "i-2")
    assert res.exit_code == EXIT_ERROR, res.output
    assert "i-1 -> i-2: aborted_by_destination (destination out of blocks)" in res.stdout
    assert "request r-1 was not migrated: aborted_by_destination (destination out of blocks)" in res.stderr
    res = await llmctl("-e", server.address, "migrate", "r-1", "--to", "i-2", "-o", "json")
    assert res.exit_code == EXIT_ERROR
    assert json.loads(res.stdout)["outcome"] == "MIGRATION_OUTCOME_ABORTED_BY_DESTINATION"


async def test_leader_resign_follows_the_redirect_and_no_leader_is_exit_3() -> None:
    leader = Replica("s-0", leader=True)
    s0, admin = await serve_replica(leader)
    follower = Replica("s-1", leader=False, leader_address=s0.address)
    s1, follower_admin = await serve_replica(follower)
    orphan = Replica("s-2", leader=False, leader_address="")
    s2, _ = await serve_replica(orphan)
    try:
        res = await llmctl("-e", s1.address, "leader", "resign")
        assert res.exit_code == 0, res.output
        assert "s-0 resigned leadership (term 3); it stays out of the election for 3s" in res.stdout
        assert (admin.resigned, follower_admin.resigned) == (1, 0)
        res = await llmctl("-e", s0.address, "leader", "resign", "-o", "json")
        assert json.loads(res.stdout)["resigned"]["replica_id"] == "s-0"
        res = await llmctl("-e", s2.address, "--timeout", "2", "leader", "resign")
        assert res.exit_code == EXIT_UNAVAILABLE and "no scheduler leader reachable" in res.stderr
        res = await llmctl("-e", s0.address, "leader")  # the plain `leader` still shows it
        assert res.exit_code == 0 and "s-leader" in res.stdout
    finally:
        await stop_all([s0, s1, s2])


async def test_scale_reply_with_another_target_is_not_success(
    replica: tuple[RunningServer, Replica, FakeAdmin],
) -> None:
    server, _, admin = replica
    admin.scale_reply_target = 2  # a cluster that answers OK but set another target
    res = await llmctl("-e", server.address, "scale", "5")
    assert res.exit_code == EXIT_ERROR and "set the target to 2, not 5" in res.stderr


# --- output formats (-o table|wide|json|yaml|name) ---------------------------------------------------------------

LONG_ID = "instance-" + "0123456789abcdef" * 4  # longer than any narrow terminal's share of an 8-column table


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


async def test_piped_table_shows_full_ids_in_a_narrow_terminal(
    replica: tuple[RunningServer, Replica, FakeAdmin],
) -> None:
    """`llmctl instances | cat` with COLUMNS=40: every id in full, plain columns (no box, no ellipsis, no padding)."""
    server, _, admin = replica
    admin.instances[LONG_ID] = instance(LONG_ID, free=70)
    admin.requests[LONG_ID] = [request_load("r-" + "f" * 50)]
    for args, wanted in ((["instances"], LONG_ID), (["requests"], "r-" + "f" * 50)):
        res = await llmctl("-e", server.address, *args, env={"COLUMNS": "40"})
        assert res.exit_code == 0, res.output
        assert wanted in res.stdout
        assert "…" not in res.stdout and "│" not in res.stdout and "━" not in res.stdout
        assert all(line == line.rstrip() for line in res.stdout.splitlines())
    res = await llmctl("-e", server.address, "instances", env={"COLUMNS": "40"})
    header, *rows = res.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "FREENESS", "BLOCKS", "RUNNING", "WAITING", "PREEMPTED", "MIGRATING"]
    by_id = {row.split()[0]: row.split() for row in rows}
    assert by_id[LONG_ID] == [LONG_ID, "active", "12.5", "30/100", "3", "1", "0", "-"]
    assert by_id["i-2"][2:4] == ["inf", "10/100"]
    # the columns line up: each row's STATE starts where the header's does
    col = header.index("STATE")
    assert all(row[col : col + 6] == "active" for row in rows)


async def test_terminal_table_grows_instead_of_truncating(replica: tuple[RunningServer, Replica, FakeAdmin]) -> None:
    """On a (forced) 40-column terminal the boxed table is widened to fit the long id rather than cut with '…'."""
    server, _, admin = replica
    admin.instances[LONG_ID] = instance(LONG_ID)
    res = await llmctl(
        "-e", server.address, "instances", env={"COLUMNS": "40", "FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"}
    )
    assert res.exit_code == 0, res.output
    out = strip_ansi(res.stdout)
    assert "┃" in out or "│" in out, out  # rich's terminal rendering
    assert LONG_ID in out and "…" not in out


async def test_wide_shows_the_extra_columns(replica: tuple[RunningServer, Replica, FakeAdmin]) -> None:
    server, _, admin = replica
    admin.instances["i-1"].info.engine = "sim"
    admin.instances["i-1"].load.total_migrations_in = 4
    admin.instances["i-1"].load.total_migrations_out = 2
    res = await llmctl("-e", server.address, "instances", "-o", "wide", env={"COLUMNS": "40"})
    assert res.exit_code == 0, res.output
    header, *rows = res.stdout.splitlines()
    for col in ("ADDRESS", "ENGINE", "MODEL", "TRANSPORT", "HOST", "PREEMPTIONS", "MIGRATIONS IN/OUT"):
        assert col in header
    row1 = next(r for r in rows if r.startswith("i-1 "))
    assert "i-1:1" in row1 and " sim " in row1 and "4/2" in row1
    res = await llmctl("-e", server.address, "requests", "-o", "wide")
    assert "DEMAND" in res.stdout and "FRONTEND" in res.stdout and "r-3" in res.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["instances"],
        ["requests"],
        ["requests", "--instance", "i-2"],
        ["leader"],
        ["config", "get"],
        ["config", "get", "migration.max_stages"],
        ["cordon", "i-1"],
        ["uncordon", "i-1"],
        ["drain", "i-2", "--no-wait"],
        ["migrate", "r-1", "--to", "i-2"],
        ["scale", "4"],
        ["config", "set", "migration.max_stages", "4"],
        ["leader", "resign"],
    ],
)
async def test_json_and_yaml_carry_the_same_data(
    replica: tuple[RunningServer, Replica, FakeAdmin], args: list[str]
) -> None:
    """Every command's -o yaml parses to exactly what its -o json parses to (fresh server state for each)."""
    server, _, _ = replica
    as_json = await llmctl("-e", server.address, *args, "-o", "json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data  # not an empty object
    # mutating commands are idempotent on the fake (cordon twice, same target, same value), so re-running is fair
    as_yaml = await llmctl("-e", server.address, *args, "-o", "yaml")
    assert as_yaml.exit_code == 0, as_yaml.output
    if args[0] in ("config",) and args[1] == "set":
        data["revision"] = str(int(data["revision"]) + 1)  # each SetConfig bumps the revision
    assert yaml.safe_load(as_yaml.stdout) == data
    assert not as_yaml.stdout.lstrip().startswith("{")  # block style, not JSON-in-YAML


async def test_name_output_is_kind_slash_id(replica: tuple[RunningServer, Replica, FakeAdmin]) -> None:
    server, _, _ = replica
    ep = ["-e", server.address]

    async def names(*args: str) -> list[str]:
        res = await llmctl(*ep, *args, "-o", "name")
        assert res.exit_code == 0, res.output
        return res.stdout.splitlines()

    assert await names("instances") == ["instance/i-1", "instance/i-2"]
    assert await names("requests") == ["request/r-1", "request/r-2", "request/r-3"]
    assert await names("requests", "--instance", "i-2") == ["request/r-3"]
    assert await names("cordon", "i-1") == ["instance/i-1"]
    assert await names("uncordon", "i-1") == ["instance/i-1"]
    assert await names("drain", "i-2", "--no-wait") == ["instance/i-2"]
    assert await names("migrate", "r-1", "--to", "i-2") == ["request/r-1"]
    assert await names("leader") == ["scheduler/s-leader"]
    assert await names("leader", "resign") == ["scheduler/s-0"]
    assert await names("config", "get", "migration.max_stages") == ["config/migration.max_stages"]
    assert "config/dispatch.policy" in await names("config", "get")
    assert await names("config", "set", "migration.max_stages", "4") == ["config/migration.max_stages"]
    # the group-level option too
    res = await llmctl(*ep, "-o", "name", "instances")
    assert res.stdout.splitlines() == ["instance/i-1", "instance/i-2"]
    res = await llmctl(*ep, "scale", "3", "-o", "name")
    assert res.exit_code == EXIT_USAGE and "scale names no object" in res.output


async def test_watch_yaml_and_name(replica: tuple[RunningServer, Replica, FakeAdmin]) -> None:
    server, _, _ = replica
    res = await llmctl("-e", server.address, "watch", "--interval", "0.05", "--count", "2", "-o", "yaml")
    assert res.exit_code == 0, res.output
    docs = list(yaml.safe_load_all(res.stdout))
    assert len(docs) == 2 and all([i["info"]["instance_id"] for i in d["instances"]] == ["i-1", "i-2"] for d in docs)
    res = await llmctl("-e", server.address, "watch", "--interval", "0.05", "--count", "2", "-o", "name")
    assert res.stdout == "instance/i-1\ninstance/i-2\n\ninstance/i-1\ninstance/i-2\n\n"


# --- the client context file ------------------------------------------------------------------------------------


def write_context(path: Path, body: str, mode: int = 0o600) -> Path:
    path.write_text(body)
    path.chmod(mode)
    return path


async def test_context_file_gives_the_endpoint_when_none_is_given(
    replica: tuple[RunningServer, Replica, FakeAdmin], tmp_path: Path
) -> None:
    server, _, _ = replica
    ctx = write_context(
        tmp_path / "context.yaml",
        "current-context: dev\ncontexts:\n"
        f"- name: dev\n  scheduler: [{server.address}]\n"
        f"- name: broken\n  scheduler: [{dead_address()}]\n",
    )
    env = {"LLUMNIX_CONTEXT": str(ctx)}
    res = await llmctl("instances", "-o", "name", env=env)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["instance/i-1", "instance/i-2"]
    res = await llmctl("--context", "broken", "--timeout", "2", "instances", env=env)
    assert res.exit_code == EXIT_UNAVAILABLE and "cannot reach the cluster" in res.stderr
    res = await llmctl("--context", "nope", "instances", env=env)
    assert res.exit_code == EXIT_USAGE and "no context named 'nope'" in res.output
    res = await llmctl("--context", "dev", "-e", server.address, "instances", env=env)
    assert res.exit_code == EXIT_USAGE and "exclude each other" in res.output
    ctx.chmod(0o644)  # a context file others can read is refused (it holds an API key)
    res = await llmctl("instances", env=env)
    assert res.exit_code == EXIT_USAGE and "accessible by others" in res.output
    res = await llmctl("instances", env={"LLUMNIX_CONTEXT": str(tmp_path / "missing.yaml")})
    assert res.exit_code == EXIT_USAGE and "missing.yaml does not exist" in res.output


@dataclass
class SecureReplica:
    """A role- and key-checked replica over mutual TLS, and the context file `llumnix serve` would write for it."""

    address: str
    admin: FakeAdmin
    ctx_file: Path
    context: ClientContext


@pytest.fixture
async def secure_replica(tmp_path: Path) -> AsyncIterator[SecureReplica]:
    security = bootstrap_local(tmp_path / "pki", "c1")
    store = ApiKeyStore(FakeKV(), KeyLayout("c1"), cache_ttl=0)
    admin = FakeAdmin(Replica("s-0", leader=True))
    # The admin API is guarded by the admin certificate; here it also asks for the admin key, to see llmctl send it.
    keyed = ApiKeyInterceptor(store, rules={"/llumnix.v1.AdminService/*": "admin"})
    server = grpc.aio.server(interceptors=[RoleInterceptor("c1"), keyed])
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
    port = server.add_secure_port("127.0.0.1:0", grpc_server_credentials(security.paths("scheduler", "s0")))
    await server.start()
    try:
        ctx_file = tmp_path / "context.yaml"
        address = f"127.0.0.1:{port}"
        await provision_admin(security, store, context_path=ctx_file, scheduler=[address])
        context = load_context(ctx_file)
        assert context is not None and context.ca and context.cert and context.key and context.api_key
        yield SecureReplica(address, admin, ctx_file, context)
    finally:
        await server.stop(None)


async def test_secure_context_gives_mtls_and_the_api_key(secure_replica: SecureReplica) -> None:
    """The context `llumnix serve` writes (CA, admin certificate, API key) reaches a role- and key-checked replica with
    no flags; the same context without its key is refused by the server, and llmctl says so (exit 1)."""
    sr = secure_replica
    env = {"LLUMNIX_CONTEXT": str(sr.ctx_file)}
    res = await llmctl("instances", "-o", "name", env=env)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["instance/i-1", "instance/i-2"]
    res = await llmctl("cordon", "i-1", env=env)
    assert res.exit_code == 0 and "cordoned i-1" in res.stdout, res.output
    # the same certificates with another key: the server refuses, llmctl reports it
    context = sr.context
    args = ["-e", sr.address, "--ca", str(context.ca), "--cert", str(context.cert)]
    args += ["--key", str(context.key), "--api-key", "llx_wrong", "instances"]
    res = await llmctl(*args)
    assert res.exit_code == EXIT_ERROR and "UNAUTHENTICATED" in res.stderr, res.output
    res = await llmctl(*args[:-3], "instances", env={"LLUMNIX_API_KEY": context.api_key})
    assert res.exit_code == 0, res.output
    # no client certificate: the mTLS handshake fails, nothing is sent
    res = await llmctl("-e", sr.address, "--ca", str(context.ca), "--timeout", "2", "cordon", "i-2")
    assert res.exit_code == EXIT_UNAVAILABLE, res.output
    assert sr.admin.instances["i-2"].state == common_pb2.INSTANCE_STATE_ACTIVE


async def test_a_tls_flag_with_the_context_overrides_only_its_own_part(secure_replica: SecureReplica) -> None:
    """LLUMNIX_API_KEY in the environment (set for `bench serving` or OpenAI scripts) or one TLS flag replaces only
    that part of the context's TLS: its CA still verifies the servers and its admin certificate still authorizes.
    (llmctl used to drop the whole context TLS then: CERTIFICATE_VERIFY_FAILED against the context's endpoints.)"""
    sr = secure_replica
    env = {"LLUMNIX_CONTEXT": str(sr.ctx_file)}
    res = await llmctl("--timeout", "5", "cordon", "i-1", env={**env, "LLUMNIX_API_KEY": sr.context.api_key})
    assert res.exit_code == 0 and "cordoned i-1" in res.stdout, res.output
    # The environment's key is the one sent (the server refuses it), over the context's mutual TLS.
    res = await llmctl("--timeout", "5", "instances", env={**env, "LLUMNIX_API_KEY": "llx_wrong"})
    assert res.exit_code == EXIT_ERROR and "UNAUTHENTICATED" in res.stderr, res.output
    # --ca alone keeps the context's certificate and key; --tls alone changes nothing.
    for flags in (["--ca", str(sr.context.ca)], ["--tls"]):
        res = await llmctl(*flags, "--timeout", "5", "instances", "-o", "name", env=env)
        assert res.exit_code == 0, (flags, res.output)
        assert res.stdout.splitlines() == ["instance/i-1", "instance/i-2"]
    # A flag's own file is still checked, and named.
    res = await llmctl("--cert", str(sr.context.cert), "instances", env=env)
    assert res.exit_code == EXIT_USAGE and "certificate and its key must be given together" in res.output
    res = await llmctl("--ca", "/nonexistent/ca.pem", "instances", env=env)
    assert res.exit_code == EXIT_USAGE and "/nonexistent/ca.pem" in res.output


async def test_plaintext_client_against_a_tls_server_is_told_about_tls(secure_replica: SecureReplica) -> None:
    """A TLS server closes a plaintext client's connection, which grpc reports as "Socket closed" only: the error says
    the server may require TLS (the README promises a hint), in llmctl's message and in the library's error."""
    res = await llmctl("-e", secure_replica.address, "--timeout", "2", "instances")
    assert res.exit_code == EXIT_UNAVAILABLE, res.output
    assert "may require TLS" in res.stderr and "--ca/--cert/--key" in res.stderr, res.output
    async with AsyncLlumnixClient(scheduler_endpoints=[secure_replica.address], timeout=2) as client:
        with pytest.raises(UnavailableError) as err:
            await client.list_instances()
    assert "may require TLS" in err.value.details


async def test_out_of_range_and_non_finite_arguments_are_usage_errors(tmp_path: Path) -> None:
    """Checked before anything is sent: an int beyond the proto field's range (protobuf raised ValueError: a
    traceback), and nan/inf durations, which passed FloatRange (nan compares false) and made every call time out
    at once or `watch` refresh with no pause."""
    ep = ["-e", dead_address()]
    cases = [
        (["scale", "2147483648"], "0<=x<=2147483647"),
        (["config", "set", "dispatch.policy", "round-robin", "--expected-revision", str(2**63)], "--expected-revision"),
        (["--timeout", "nan", "instances"], "nan is not a finite number"),
        (["--timeout", "inf", "instances"], "--timeout"),
        (["--timeout", "1e308", "instances"], "--timeout"),
        (["watch", "--interval", "nan"], "nan is not a finite number"),
        (["watch", "--interval", "inf"], "--interval"),
        (["drain", "i-1", "--timeout", "nan"], "nan is not a finite number"),
        (["drain", "i-1", "--interval", "-inf"], "--interval"),
    ]
    for args, message in cases:
        res = await llmctl(*ep, *args)
        assert res.exit_code == EXIT_USAGE, (args, res.output)
        assert message in res.output and "Traceback" not in res.output, (args, res.output)


async def test_context_file_that_is_not_text_is_a_clear_error(tmp_path: Path) -> None:
    ctx = tmp_path / "context.yaml"
    ctx.write_bytes(b"current-context: dev\n\xff\xfe")
    ctx.chmod(0o600)
    res = await llmctl("instances", env={"LLUMNIX_CONTEXT": str(ctx)})
    assert res.exit_code == EXIT_USAGE, res.output
    assert "is not UTF-8 text" in res.output and "Traceback" not in res.output
    ctx.chmod(0o644)  # refused for its mode before its content is read
    res = await llmctl("instances", env={"LLUMNIX_CONTEXT": str(ctx)})
    assert res.exit_code == EXIT_USAGE and "accessible by others" in res.output, res.output


async def test_a_write_that_times_out_may_have_been_applied(replica: tuple[RunningServer, Replica, FakeAdmin]) -> None:
    """Like a connection lost after sending: the operator is told the write may have happened (exit 3, not 1)."""
    server, r, _ = replica
    r.delay["CordonInstance"] = 3.0
    res = await llmctl("-e", server.address, "--timeout", "0.5", "cordon", "i-1")
    assert res.exit_code == EXIT_UNAVAILABLE, res.output
    assert "no answer within 0.5s (--timeout), the call may or may not have been applied" in res.stderr
    assert r.calls["CordonInstance"] == 1
    # A read that times out says so, not "cannot reach the cluster" (it was reached; it answered too slowly).
    r.delay["ListInstances"] = 3.0
    res = await llmctl("-e", server.address, "--timeout", "0.5", "instances")
    assert res.exit_code == EXIT_UNAVAILABLE, res.output
    assert "no answer within 0.5s (--timeout)" in res.stderr and "may or may not" not in res.stderr


async def test_drain_accepted_then_waiting_fails_says_it_was_accepted(
    replica: tuple[RunningServer, Replica, FakeAdmin],
) -> None:
    server, r, admin = replica
    r.fail["ListClusterRequests"] = (grpc.StatusCode.UNAVAILABLE, "replica went away")
    res = await llmctl("-e", server.address, "--timeout", "2", "drain", "i-1", "--interval", "0.05")
    assert res.exit_code == EXIT_UNAVAILABLE, res.output
    assert "drain of i-1 accepted; waiting for it failed: cannot reach the cluster" in res.stderr
    assert "replica went away" in res.stderr
    assert admin.instances["i-1"].state == common_pb2.INSTANCE_STATE_DRAINING


async def test_bad_endpoint_port_is_a_usage_error(tmp_path: Path) -> None:
    """grpc took port 99999 modulo 65536; a malformed port was reported as an unreachable cluster (exit 3)."""
    for endpoint, message in (
        ("127.0.0.1:99999", "the port must be a number from 1 to 65535, got '99999'"),
        ("host:abc", "the port must be a number from 1 to 65535, got 'abc'"),
        (":5", "the host is missing"),
    ):
        res = await llmctl("-e", endpoint, "--timeout", "1", "instances")
        assert res.exit_code == EXIT_USAGE, (endpoint, res.output)
        assert message in res.output and "Traceback" not in res.output
    # The same check for a context file's endpoints.
    ctx = write_context(tmp_path / "context.yaml", "current-context: dev\ncontexts:\n- name: dev\n  scheduler: [h:0]\n")
    res = await llmctl("--timeout", "1", "instances", env={"LLUMNIX_CONTEXT": str(ctx)})
    assert res.exit_code == EXIT_USAGE and "context 'dev'" in res.output and "got '0'" in res.output, res.output


async def test_api_key_that_cannot_be_sent_is_a_usage_error() -> None:
    """grpc refused it only at the first call ("Illegal metadata"), reported as an unreachable cluster after retries."""
    for key in ("llx_a\nb", "llx_clé"):
        res = await llmctl("-e", dead_address(), "--timeout", "1", "--api-key", key, "instances")
        assert res.exit_code == EXIT_USAGE, res.output
        assert "the API key has a character that is not printable ASCII" in res.output
        assert key not in res.output  # the key itself is not echoed


async def test_config_set_deeply_nested_json_is_a_usage_error(
    replica: tuple[RunningServer, Replica, FakeAdmin],
) -> None:
    server, r, _ = replica
    for value in ("[" * 100_000, "[" + '{"priority":' * 5_000 + "1" + "}" * 5_000 + "]"):
        res = await llmctl("-e", server.address, "config", "set", "priority.headroom", value)
        assert res.exit_code == EXIT_USAGE, res.output[-300:]
        assert "bad value for priority.headroom: the JSON is nested too deeply" in res.stderr
    assert r.calls["SetConfig"] == 0
