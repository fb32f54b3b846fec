"""``llumnix serve``: a complete local cluster in one command.

Embedded etcd (unless ``--etcd`` is given), scheduler replicas (default 2, so failover works out of the box), N
llumlets (default 4: the simulated engine with the LLaMA-7B-on-A10 latency profile, in real time) and a frontend
(OpenAI HTTP API + gRPC). Each component is a child process with its own log file under ``--log-dir``. Ctrl-C or
SIGTERM stops them all (frontend first, etcd last).

A YAML ``--config`` file may set any option (keys are the option names with dashes or underscores); flags given on
the command line win over the file.

The sim engine's KV payload is scaled down by default (``--bytes-per-token 8192``: 128 KiB blocks instead of 7B's
8 MiB), so four instances fit in a laptop's memory; the latency model stays LLaMA-7B. Pass ``--bytes-per-token
524288`` for full-size KV.

``--engine vllm --model PATH`` serves a real model (a local Hugging Face directory) with vLLM V1: every llumlet gets
``--engine vllm --model PATH --max-model-len N`` and the CPU settings that work on a small machine (one OpenMP thread
per instance, no thread pinning, in-process engine core, offline hub; any already set in the environment win), and the
frontend gets the model's own tokenizer (``--tokenizer hf``) and the same maximum length. The OpenAI model id is PATH.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import click
import yaml

from pyllumnix.tools.launch import Launcher, LaunchError

DEFAULTS: dict[str, Any] = {
    "etcd": "",
    "cluster": "default",
    "schedulers": 2,
    "llumlets": 4,
    "engine": "sim",
    "profile": "llama-7b-a10",
    "model": "",
    "max_model_len": 0,
    "bytes_per_token": 8192,
    "transport": "auto",
    "host": "127.0.0.1",
    "http_port": 8000,
    "grpc_port": 50051,
    "log_dir": "",
    "provider": "local",
    "llumlet_args": "",
}


def load_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from exc
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of option: value", param_hint="--config")
    config = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise click.BadParameter(f"unknown keys in {path}: {', '.join(unknown)}", param_hint="--config")
    return config


def resolve(ctx: click.Context, file_config: dict[str, Any]) -> dict[str, Any]:
    """Defaults < config file < flags given on the command line."""
    merged = dict(DEFAULTS)
    merged.update(file_config)
    for name, value in ctx.params.items():
        if name in DEFAULTS and ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
            merged[name] = value
    return merged


# vLLM on a CPU machine (docs: PLATFORM.md): one OpenMP thread per instance and no pinning, or instances fight over
# the cores; the engine core in the llumlet's process; no hub access; quiet logs.
VLLM_CPU_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}
VLLM_MAX_MODEL_LEN = 512


def _model_max_len(path: str) -> int | None:
    """The model's own limit (config.json's max_position_embeddings), when it has one."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def engine_settings(opts: dict[str, Any]) -> tuple[list[str], list[str], dict[str, str]]:
    """(llumlet args, frontend args, environment of every child) for the chosen engine."""
    engine = str(opts["engine"])
    if engine == "vllm":
        model = str(opts["model"])
        if not model:
            raise click.UsageError("--engine vllm needs --model PATH (a local Hugging Face model directory)")
        max_len = int(opts["max_model_len"] or 0)
        if not max_len:
            max_len = min(VLLM_MAX_MODEL_LEN, _model_max_len(model) or VLLM_MAX_MODEL_LEN)
        llumlet = ["--engine", "vllm", "--model", model, "--max-model-len", str(max_len)]
        frontend = ["--model", model, "--tokenizer", "hf", "--tokenizer-path", model, "--max-model-len", str(max_len)]
        env = {k: v for k, v in VLLM_CPU_ENV.items() if k not in os.environ}
        return llumlet, frontend, env
    llumlet = ["--engine", engine, "--profile", str(opts["profile"])]
    if opts["bytes_per_token"]:
        llumlet += ["--bytes-per-token", str(opts["bytes_per_token"])]
    if opts["model"] and engine != "sim":
        llumlet += ["--model", str(opts["model"])]
    frontend = ["--model", str(opts["model"] or opts["profile"])]
    if engine == "sim":
        from pyllumnix.data_plane.engine.profile import get_profile

        max_len = int(opts["max_model_len"] or 0) or get_profile(str(opts["profile"])).max_model_len
        frontend += ["--max-model-len", str(max_len)]
    return llumlet, frontend, {}


def start_cluster(opts: dict[str, Any], launcher: Launcher) -> dict[str, Any]:
    """Starts every component; returns what to print (addresses)."""
    info: dict[str, Any] = {"log_dir": str(launcher.log_dir)}
    engine_args, frontend_args, env = engine_settings(opts)
    etcd_endpoints = opts["etcd"]
    if not etcd_endpoints:
        from pyllumnix.control_plane.etcd.embedded import EmbeddedEtcd

        etcd = EmbeddedEtcd(1, data_dir=launcher.log_dir / "etcd-data").start()
        launcher_etcd.append(etcd)
        etcd_endpoints = ",".join(etcd.endpoints)
        info["embedded_etcd"] = etcd.endpoints
    common = ["--etcd", etcd_endpoints, "--cluster", str(opts["cluster"])]
    llumlet_args = [*engine_args, "--transport", str(opts["transport"]), "--host", str(opts["host"])]
    llumlet_args += str(opts["llumlet_args"]).split()
    schedulers = []
    for i in range(int(opts["schedulers"])):
        provider_args = []
        if opts["provider"] == "local":
            provider_args = [
                "--provider",
                "local",
                "--llumlet-args",
                " ".join([*llumlet_args, *common]),
                "--log-dir",
                str(launcher.log_dir),
            ]
        comp = launcher.start(
            f"scheduler-{i}",
            "scheduler",
            *common,
            "--replica-id",
            f"scheduler-{i}",
            "--host",
            str(opts["host"]),
            *provider_args,
            env=env,
        )
        schedulers.append(comp.address)
    info["schedulers"] = schedulers
    llumlets = []
    for i in range(int(opts["llumlets"])):
        comp = launcher.start(
            f"llumlet-{i}",
            "llumlet",
            *common,
            "--instance-id",
            f"instance-{i}",
            *llumlet_args,
            timeout=300.0 if opts["engine"] == "vllm" else 120.0,
            env=env,
        )
        llumlets.append(comp.ready["instance_id"])
    info["instances"] = llumlets
    frontend = launcher.start(
        "frontend",
        "frontend",
        *common,
        "--scheduler",
        ",".join(schedulers),
        "--host",
        str(opts["host"]),
        "--http-port",
        str(opts["http_port"]),
        "--grpc-port",
        str(opts["grpc_port"]),
        *frontend_args,
        timeout=120.0,
        env=env,
    )
    info["http"] = f"http://{opts['host']}:{frontend.ready['http_port']}"
    info["grpc"] = frontend.ready["grpc_address"]
    return info


launcher_etcd: list[Any] = []


@click.command("serve")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="YAML file with any of these options; flags override it.",
)
@click.option("--etcd", default=DEFAULTS["etcd"], help="etcd endpoints (default: start an embedded etcd).")
@click.option("--cluster", default=DEFAULTS["cluster"], show_default=True)
@click.option("--schedulers", type=int, default=DEFAULTS["schedulers"], show_default=True, help="Scheduler replicas.")
@click.option("--llumlets", type=int, default=DEFAULTS["llumlets"], show_default=True, help="Engine instances.")
@click.option("--engine", default=DEFAULTS["engine"], show_default=True, help="sim or vllm.")
@click.option("--profile", default=DEFAULTS["profile"], show_default=True, help="Sim engine latency profile.")
@click.option("--model", default=DEFAULTS["model"], help="Model name (sim) or path (vllm).")
@click.option(
    "--max-model-len",
    type=int,
    default=DEFAULTS["max_model_len"],
    help=f"Prompt + output limit (default: the sim profile's; vllm: min({VLLM_MAX_MODEL_LEN}, the model's)).",
)
@click.option(
    "--bytes-per-token",
    type=int,
    default=DEFAULTS["bytes_per_token"],
    show_default=True,
    help="Sim engine KV payload per token (0: the profile's full size).",
)
@click.option("--transport", default=DEFAULTS["transport"], show_default=True, help="Data plane: auto|ucx|tcp.")
@click.option("--host", default=DEFAULTS["host"], show_default=True, help="Bind host for every component.")
@click.option("--http-port", type=int, default=DEFAULTS["http_port"], show_default=True)
@click.option("--grpc-port", type=int, default=DEFAULTS["grpc_port"], show_default=True)
@click.option("--log-dir", default=DEFAULTS["log_dir"], help="Per-component logs (default: a temp dir).")
@click.option(
    "--provider",
    type=click.Choice(["local", "none"]),
    default=DEFAULTS["provider"],
    show_default=True,
    help="Instance provider for autoscaling and `llmctl scale`.",
)
@click.option("--llumlet-args", default=DEFAULTS["llumlet_args"], help="Extra arguments for every llumlet.")
@click.pass_context
def serve_command(ctx: click.Context, /, config_path: Path | None, **_: Any) -> None:
    """Run a complete local cluster: etcd, schedulers, llumlets and a frontend."""
    opts = resolve(ctx, load_config(config_path))
    log_dir = Path(opts["log_dir"]) if opts["log_dir"] else Path(tempfile.mkdtemp(prefix="llumnix-serve-"))
    launcher = Launcher(log_dir)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    code = 0
    try:
        info = start_cluster(opts, launcher)
        click.echo(json.dumps({"event": "ready", **info}), nl=True)
        click.echo(
            f"llumnix serving: OpenAI API at {info['http']}/v1, gRPC at {info['grpc']}, "
            f"admin (llmctl -e) at {','.join(info['schedulers'])}; logs in {log_dir}",
            err=True,
        )
        sys.stdout.flush()
        while not stop.wait(0.5):
            dead = [c.name for c in launcher.components if not c.alive() and c.name.startswith("frontend")]
            if dead:
                click.echo(f"{dead[0]} exited; stopping the cluster (see {log_dir})", err=True)
                code = 1
                break
    except LaunchError as exc:
        click.echo(f"error: {exc}", err=True)
        code = 1
    finally:
        launcher.stop_all()
        for etcd in launcher_etcd:
            with contextlib.suppress(Exception):
                etcd.stop()
        launcher_etcd.clear()
    sys.exit(code)
