"""The `fedamole` command line: run a federation, ask a client's personalised model."""

from __future__ import annotations

import logging
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
    for noisy in ("httpx", "urllib3", "matplotlib", "filelock"):
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run FedAMoLE in one process (clients in sequence on one shared backbone)."""
    from fedamole.data.example import DataError
    from fedamole.rsea.solver import InfeasibleAssignmentError
    from fedamole.runners.simulation import RunDirError, run_simulation

    _setup_logging(verbose)
    overrides = list(set_ or []) + ([f"output.dir={out}"] if out else [])
    try:
        cfg = load_config(config, overrides)
        run_simulation(cfg, resume=resume, console=console)
    except (ConfigError, DataError, RunDirError, InfeasibleAssignmentError) as exc:
        raise _fail(str(exc)) from None


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the instruction to answer")],
    run_dir: Annotated[Path, typer.Option("--run", help="a finished run directory")],
    client: Annotated[int, typer.Option("--client", help="whose personalised model answers")] = 0,
    input_: Annotated[str, typer.Option("--input", help="optional input/context")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="generation length")] = 64,
) -> None:
    """Answer a prompt with one client's personalised model from a run."""
    from fedamole.personalised import load_client_model

    _setup_logging(False)
    try:
        answer = load_client_model(run_dir, client).answer(prompt, input_, max_new_tokens)
    except (ConfigError, FileNotFoundError, KeyError) as exc:
        raise _fail(str(exc)) from None
    console.print(answer)


if __name__ == "__main__":
    app()
