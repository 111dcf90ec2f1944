"""The `fedamole` command line: run a federation, compare methods, ask a client's model."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from fedamole.config import ConfigError, load_config

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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run FedAMoLE (or another method) in one process (clients in sequence on one backbone)."""
    from fedamole.compare import parse_methods
    from fedamole.transports.in_process import run_simulation

    _setup_logging(verbose)
    overrides = list(set_ or []) + ([f"output.dir={out}"] if out else [])
    with _user_errors():
        names = parse_methods(method, "--method") if method else [None]
        if len(names) != 1:
            raise ConfigError(f"--method takes one method, got {method!r} (compare runs several)")
        cfg = load_config(config, overrides)
        run_simulation(cfg, resume=resume, console=console, method=names[0])


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
    """Errors in what the user asked for end the command with their message, no traceback."""
    from fedamole.compare import ComparisonError
    from fedamole.data.example import DataError
    from fedamole.device import DeviceError
    from fedamole.reporting import RunDirError
    from fedamole.rsea.solver import InfeasibleAssignmentError

    try:
        yield
    except (
        ConfigError,
        DataError,
        DeviceError,
        RunDirError,
        InfeasibleAssignmentError,
        ComparisonError,
    ) as exc:
        raise _fail(str(exc)) from None


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the instruction to answer")],
    run_dir: Annotated[Path, typer.Option("--run", help="a finished run directory")],
    client: Annotated[int, typer.Option("--client", help="whose personalised model answers")] = 0,
    input_: Annotated[str, typer.Option("--input", help="optional input/context")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="generation length")] = 64,
) -> None:
    """Answer a prompt with one client's personalised model from a FedAMoLE run."""
    from fedamole.methods import FEDAMOLE_VARIANTS
    from fedamole.personalised import load_client_model
    from fedamole.reporting import RunDir, RunDirError

    _setup_logging(False)
    try:
        method = RunDir(run_dir).method
        if method not in FEDAMOLE_VARIANTS:
            raise ConfigError(
                f"{run_dir} is a {method!r} run; generate answers with FedAMoLE client models. "
                f"Its client models are clients/<id>/adapter.safetensors (described by "
                f"adapter.json)"
            )
        answer = load_client_model(run_dir, client).answer(prompt, input_, max_new_tokens)
    except (ConfigError, RunDirError, FileNotFoundError, KeyError) as exc:
        raise _fail(str(exc)) from None
    console.print(answer)


if __name__ == "__main__":
    app()
