"""The `fedamole` command line: run a federation, compare methods, ask or export a client's
model."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from fedamole.config import Config, ConfigError, load_config
from fedamole.errors import UserError
from fedamole.files import atomic_write_text
from fedamole.http_server import HTTPSettings
from fedamole.serving.settings import ServeSettings

app = typer.Typer(
    help="Personalised federated fine-tuning of LLMs with heterogeneous mixtures of LoRA experts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (see configs/)")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="override a setting, e.g. --set federation.rounds=2 (repeatable)"
    ),
]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    for noisy in ("httpx", "urllib3", "matplotlib", "filelock", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


class TransportName(StrEnum):
    """How `fedamole run` reaches its clients."""

    IN_PROCESS = "in-process"
    FLOWER_SIMULATION = "flower-simulation"


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="run directory (output.dir)")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="continue the run in --out from its last checkpoint")
    ] = False,
    method: Annotated[
        str | None,
        typer.Option(help="fedamole (default, as rsea.mode says), a variant or a baseline"),
    ] = None,
    transport: Annotated[
        TransportName,
        typer.Option(
            help="in-process: one process, clients in sequence on one backbone; "
            "flower-simulation: the Flower apps on Flower's Simulation Engine (Ray), one virtual "
            "SuperNode per client (needs fedamole[simulation])"
        ),
    ] = TransportName.IN_PROCESS,
    num_cpus: Annotated[
        float, typer.Option(min=0.01, help="flower-simulation: CPUs Ray reserves per client")
    ] = 1.0,
    num_gpus: Annotated[
        float,
        typer.Option(min=0.0, help="flower-simulation: GPUs per client (0.25: four per GPU)"),
    ] = 0.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run FedAMoLE (or another method): in one process, or on Flower's Simulation Engine."""
    _setup_logging(verbose)
    overrides = list(set_ or []) + ([f"output.dir={out}"] if out else [])
    with _user_errors():
        cfg = load_config(config, overrides)  # first: it needs no torch, so its errors are quick
        from fedamole.compare import parse_methods

        names = parse_methods(method, "--method") if method else [None]
        if len(names) != 1:
            raise ConfigError(f"--method takes one method, got {method!r} (compare runs several)")
        if transport is TransportName.IN_PROCESS:
            from fedamole.transports.in_process import run_in_process

            run_in_process(cfg, resume=resume, console=console, method=names[0])
            return
        _check_simulation_run(cfg, names[0], resume)
    _run_on_simulation_engine(cfg, config, overrides, names[0], resume, num_cpus, num_gpus)


def _check_simulation_run(cfg: Config, method: str | None, resume: bool) -> None:
    """What the ServerApp would refuse, refused before Ray starts: the method, the run
    directory, Ray itself."""
    import importlib.util

    from fedamole.transports.setup import open_run

    if importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "--transport flower-simulation needs Ray: pip install 'fedamole[simulation]'"
        )
    open_run(cfg, method, resume, with_data=False).run_dir.release()  # the child writes it


def _run_on_simulation_engine(
    cfg: Config,
    config: Path | None,
    overrides: list[str],
    method: str | None,
    resume: bool,
    num_cpus: float,
    num_gpus: float,
) -> None:
    from fedamole.transports.flower.simulation import (
        Resources,
        SimulationSpec,
        launch,
        run_config,
    )

    spec = SimulationSpec(
        num_supernodes=cfg.federation.num_clients,
        run_config=run_config(config, overrides, method, resume),
        resources=Resources(num_cpus, num_gpus),
    )
    status = launch(spec)
    if status != 0:
        raise _fail(f"the simulation ended with exit status {status} (its log is above)")


@app.command()
def compare(
    out: Annotated[Path, typer.Option("--out", "-o", help="comparison directory")],
    config: ConfigOpt = None,
    methods: Annotated[
        str,
        typer.Option(help="comma-separated methods, e.g. fedamole,fedit,local"),
    ] = (
        "local,fedit,fedit-ft,ffa-lora,feddpa,fedprompt,fedptuning,fdlora,"
        "fedamole,fedamole-r,fedamole-h"
    ),
    seeds: Annotated[str, typer.Option(help="comma-separated seeds, one run each")] = "42",
    jobs: Annotated[
        int,
        typer.Option(
            min=1, help="runs at once, each its own process and log (one GPU: enable CUDA MPS)"
        ),
    ] = 1,
    set_: SetOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Compare methods on identical splits, seeds and budgets, with 95 % intervals and paired
    differences to FedAMoLE (report.md); finished runs are skipped, killed ones resumed."""
    from fedamole.compare import compare as run_comparison
    from fedamole.compare import parse_methods

    _setup_logging(verbose)
    with _user_errors():
        names = parse_methods(methods)
        seed_list = _parse_seeds(seeds)
        run_comparison(config, names, seed_list, list(set_ or []), out, console, jobs)


def _parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected integers, e.g. 42,62") from None


@contextmanager
def _user_errors() -> Iterator[None]:
    """Errors in what the user asked for end the command with their message, no traceback: every
    :class:`UserError`, and a file the system refuses to read or write (named with its reason)."""
    try:
        yield
    except UserError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        if exc.filename is None:
            raise
        raise _fail(f"{exc.filename}: {exc.strerror}") from None


RunOpt = Annotated[Path, typer.Option("--run", help="a finished run directory")]
ClientOpt = Annotated[int, typer.Option("--client", help="whose personalised model (from 0)")]
DeviceOpt = Annotated[
    str | None, typer.Option(help="where the model runs (cpu, cuda, ...); default: the run's")
]


@app.command()
def generate(
    run_dir: RunOpt,
    prompt: Annotated[
        str | None, typer.Argument(help="the instruction to answer (or give --input-file)")
    ] = None,
    client: ClientOpt = 0,
    input_: Annotated[str, typer.Option("--input", help="optional input/context")] = "",
    input_file: Annotated[
        Path | None,
        typer.Option(
            help='many prompts: *.jsonl = one {"instruction": ..., "input": ...} per line, '
            "any other file = one instruction per non-empty line"
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="write the JSON lines here instead of stdout")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="generation length")] = 64,
    do_sample: Annotated[
        bool, typer.Option("--do-sample", help="sample instead of greedy decoding")
    ] = False,
    temperature: Annotated[float, typer.Option(help="with --do-sample; > 0")] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="with --do-sample")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="makes sampled answers repeatable")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts generated together")] = 8,
    device: DeviceOpt = None,
    base: Annotated[
        bool,
        typer.Option(
            "--base", help="answer with the run's frozen base model instead (no adapters)"
        ),
    ] = False,
) -> None:
    """Answer prompts with one client's personalised model (any method), or with the run's base
    model (--base) to see what fine-tuning changed; one JSON line each."""
    import json

    from fedamole.serving.loading import load_base_model_of, load_client_model
    from fedamole.serving.personalised import read_prompt_file

    # No rich log handler here: stdout carries only the answers (warnings go to stderr).
    if (prompt is None) == (input_file is None):
        raise typer.BadParameter("give one instruction or --input-file", param_hint="PROMPT")
    if input_file is not None and input_:
        raise typer.BadParameter("--input goes with a single instruction", param_hint="--input")
    if do_sample and temperature <= 0:
        raise typer.BadParameter(
            "must be > 0 to sample (greedy: leave out --do-sample)", param_hint="--temperature"
        )
    with _user_errors():
        if output is not None:
            _check_new_file(output, "--output")
        instructions, inputs = read_prompt_file(input_file) if input_file else ([prompt], [input_])
        model = (
            load_base_model_of(run_dir, device)
            if base
            else load_client_model(run_dir, client, device)
        )
        answers = model.generate(
            instructions,
            inputs,
            max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
        )
    lines = [
        json.dumps(
            {"client": "base" if base else client, "instruction": i, "input": x, "output": a}
        )
        for i, x, a in zip(instructions, inputs, answers, strict=True)
    ]
    if output is None:
        for line in lines:
            typer.echo(line)
    else:
        atomic_write_text(output, "".join(line + "\n" for line in lines))
        console.print(f"{len(lines)} answers written to {output}")


def _check_new_file(path: Path, option: str) -> None:
    """A file about to be written: it must not exist yet (nothing is overwritten) and its
    folder must; checked before any work."""
    if path.exists():
        kind = "a folder" if path.is_dir() else "an existing file"
        raise ConfigError(f"{option} {path} is {kind}; name a new file (nothing is overwritten)")
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"{option} {path}: the folder {path.parent} is not writable")


@app.command()
def export(
    run_dir: RunOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="new folder for the exported model")],
    client: ClientOpt = 0,
    static_lora: Annotated[
        bool,
        typer.Option(
            "--static-lora",
            help="FedAMoLE: fold the experts into one plain PEFT LoRA (approximate)",
        ),
    ] = False,
    device: DeviceOpt = None,
) -> None:
    """Export a client's personalised model as a folder that loads without the run: a PEFT
    adapter (baselines, --static-lora) or a fedamole.load_pretrained folder (FedAMoLE)."""
    from fedamole.serving.export import export_client

    _setup_logging(False)
    with _user_errors():
        result = export_client(run_dir, client, out, static_lora, device)
    console.print(f"{result.kind} export of client {client} written to {result.folder}/")
    if result.fidelity is not None:
        f = result.fidelity
        table = Table(title="static LoRA vs routed model, client's validation split")
        for column in ("", f.metric, f"mean |logit diff| ({f.prompts} prompts)"):
            table.add_column(column, justify="right")
        table.add_row("routed (FedAMoLE)", f"{f.routed:.4f}", "")
        table.add_row("static LoRA", f"{f.static:.4f}", f"{f.mean_abs_logit_diff:.4g}")
        console.print(table)


SERVE = ServeSettings()  # the defaults of `fedamole serve`


@app.command()
def serve(
    run_dir: Annotated[
        Path | None, typer.Option("--run", help="a finished run: serve its clients' models")
    ] = None,
    clients: Annotated[
        list[int] | None,
        typer.Option("--client", help="only these clients of --run (repeatable; default: all)"),
    ] = None,
    models: Annotated[
        list[Path] | None,
        typer.Option("--model", help="an exported folder to serve instead (repeatable)"),
    ] = None,
    host: Annotated[str, typer.Option(help="address to bind (loopback unless --api-keys)")] = (
        SERVE.http.host
    ),
    port: Annotated[int, typer.Option(min=0, max=65535)] = SERVE.http.port,
    api_keys: Annotated[
        Path | None,
        typer.Option(help='YAML/JSON file: {"<key>": ["client-0", ...]}; "*" = every model'),
    ] = SERVE.api_keys,
    max_batch: Annotated[
        int, typer.Option(min=1, help="requests decoded together")
    ] = SERVE.max_batch,
    max_queue: Annotated[
        int, typer.Option(min=1, help="waiting requests before 429")
    ] = SERVE.max_queue,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="the largest max_tokens allowed")] = (
        SERVE.max_new_tokens
    ),
    batch_window_ms: Annotated[
        float, typer.Option(min=0.0, help="how long an idle server gathers a batch")
    ] = SERVE.batch_window_s * 1000,
    max_loaded: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="at most this many clients' adapters on the device at once, the least recently "
            "used reloaded from disk when asked for (default: all)",
        ),
    ] = SERVE.max_loaded,
    device: DeviceOpt = None,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="serve HTTPS (uvicorn's TLS)")
    ] = SERVE.http.ssl_certfile,
    ssl_keyfile: Annotated[
        Path | None, typer.Option(help="the key of --ssl-certfile")
    ] = SERVE.http.ssl_keyfile,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="larger request bodies get 413 before they are read")
    ] = SERVE.max_body_bytes,
    header_timeout: Annotated[
        float, typer.Option(min=0.1, help="s a connection has to send its request headers")
    ] = SERVE.http.header_timeout_s,
    idle_timeout: Annotated[
        float, typer.Option(min=0.1, help="s an idle connection or a paused body is kept")
    ] = SERVE.http.idle_timeout_s,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve personalised models behind one OpenAI-compatible endpoint (/v1/chat/completions,
    /v1/completions, /v1/models): one frozen backbone, every client's own adapter on it, requests
    for different clients decoded together."""
    from fedamole.serving.server import run_server

    _setup_logging(verbose)
    if (run_dir is None) == (not models):
        raise typer.BadParameter("give --run DIR or one or more --model FOLDER", param_hint="--run")
    if clients and run_dir is None:
        raise typer.BadParameter("--client goes with --run", param_hint="--client")
    settings = ServeSettings(
        HTTPSettings(host, port, ssl_certfile, ssl_keyfile, header_timeout, idle_timeout),
        api_keys,
        max_batch,
        max_queue,
        max_new_tokens,
        batch_window_ms / 1000,
        max_body_bytes,
        max_loaded,
    )
    with _user_errors():
        run_server(settings, run_dir, clients or None, models or [], device, console)


@app.command("fleet-gateway")
def fleet_gateway(
    superlink: Annotated[
        str, typer.Option(help="the SuperLink's loopback address, e.g. 127.0.0.1:9093")
    ],
    host: Annotated[str, typer.Option(help="public address SuperNodes connect to")] = "0.0.0.0",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 9092,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="certificate SuperNodes verify (the SuperLink's)")
    ] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="the key of --ssl-certfile")] = None,
    superlink_ca: Annotated[
        Path | None, typer.Option(help="CA of the SuperLink's TLS (when it has TLS)")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="plain HTTP outside: local try-outs only")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Expose only the SuperLink's Fleet API (what SuperNodes use) on a public address; its
    Control API (register nodes, submit runs) stays on loopback for the operator."""
    from fedamole.transports.flower.gateway import GatewaySettings, run_gateway

    _setup_logging(verbose)
    settings = GatewaySettings(
        superlink, host, port, ssl_certfile, ssl_keyfile, superlink_ca, insecure
    )
    with _user_errors():
        run_gateway(settings)  # checks the settings, says where it listens, serves


if __name__ == "__main__":
    app()
