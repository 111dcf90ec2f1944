"""Bad inputs, tried as a new user and as a hostile one would: every `fedamole` command
(`run`, `compare`, `generate`, `export`, `serve`) and the server's HTTP API.

In a scratch folder it trains one tiny-model run (seconds), makes an unfinished copy, a damaged
copy and a few bad files, then tries each bad input in its own process (HTTP ones against one
`fedamole serve`). For each it prints the input, the exit code (or HTTP status), the first line of
the message, whether a traceback was printed and whether any file of the scratch folder changed.
A good result: no tracebacks, no files changed, every exit code 2 (or a 4xx status).

    python benchmarks/bad_inputs.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

FEDAMOLE = [sys.executable, "-m", "fedamole.cli"]
TINY = [
    "model.name=tiny-random-llama",
    "model.device=cpu",
    "model.max_length=512",
    "data.synthetic_per_task=10",
    "data.min_client_size=8",
    "federation.num_clients=2",
    "federation.rounds=2",
    "federation.local_steps=2",
    "hmole.num_experts=4",
    "eval.max_new_tokens=3",
]
KEYS = {"sk-org-zero-0000": ["client-0"], "sk-org-one-11111": ["client-1"]}


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@dataclass
class Outcome:
    command: str
    case: str
    code: str
    message: str
    traceback: bool
    changed: bool

    @property
    def clean(self) -> bool:
        refused = self.code == "2" or self.code.startswith("4")
        return refused and not self.traceback and not self.changed


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its hash (and every folder), to see what a case changed."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_file():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            state[key] = "dir"
    return state


def first_line(text: str) -> str:
    """The message: fedamole's `error:` line (with the next one when it ends in a colon), or
    the text of typer's error box."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for n, line in enumerate(lines):
        if line.startswith("error:"):
            message = line.removeprefix("error:").strip()
            if message.endswith(":") and n + 1 < len(lines):
                message += " " + lines[n + 1]
            return message
    boxed = [line.strip("│ ") for line in lines if line.startswith("│")]
    if boxed:
        return " ".join(boxed)
    return lines[-1] if lines else ""


def try_cli(root: Path, command: str, case: str, args: list[str]) -> Outcome:
    before = snapshot(root)
    done = subprocess.run(
        [*FEDAMOLE, command, *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "400"},  # one message, one line
    )
    text = done.stdout + done.stderr
    return Outcome(
        command,
        case,
        str(done.returncode),
        first_line(text),
        "Traceback (most recent call last)" in text,
        snapshot(root) != before,
    )


def prepare(root: Path) -> dict[str, Path]:
    """The scratch folder's runs and files."""
    finished = root / "finished"
    subprocess.run(
        [*FEDAMOLE, "run", "--out", str(finished), *sets(*TINY)],
        check=True,
        capture_output=True,
    )
    unfinished = root / "unfinished"
    shutil.copytree(finished, unfinished)
    (unfinished / "summary.json").unlink()
    damaged = root / "damaged"
    shutil.copytree(unfinished, damaged)
    data = (damaged / "checkpoint.safetensors").read_bytes()
    (damaged / "checkpoint.safetensors").write_bytes(data[: len(data) // 2])
    garbled = root / "garbled"
    shutil.copytree(unfinished, garbled)
    with (garbled / "metrics.jsonl").open("r+b") as f:
        f.write(b"{garbage")
    files = {
        "finished": finished,
        "unfinished": unfinished,
        "damaged": damaged,
        "garbled": garbled,
        "latin1": root / "latin1.yaml",
        "badyaml": root / "bad.yaml",
        "listyaml": root / "list.yaml",
        "latin1_jsonl": root / "latin1.jsonl",
        "notjson": root / "notjson.jsonl",
        "array": root / "array.jsonl",
        "prompts_latin1": root / "prompts.txt",
        "answers": root / "answers.jsonl",
        "notamodel": root / "notamodel",
        "afile": root / "afile",
        "papers": root / "papers",
        "keys": root / "keys.json",
        "dupkeys": root / "dupkeys.yaml",
        "listkeys": root / "listkeys.yaml",
        "unknownkeys": root / "unknownkeys.json",
    }
    files["latin1"].write_bytes(b"federation:\n  rounds: 2 # r\xe9sum\xe9\n")
    files["badyaml"].write_text("federation: [rounds: 2\n")
    files["listyaml"].write_text("- federation\n")
    files["latin1_jsonl"].write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    files["notjson"].write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    files["array"].write_text('["instruction", "output"]\n')
    files["prompts_latin1"].write_bytes(b"Name a caf\xe9.\n")
    files["answers"].write_text("earlier answers\n")
    files["notamodel"].mkdir()
    (files["notamodel"] / "weights.bin").write_bytes(b"\0")
    files["afile"].write_text("a file")
    files["papers"].mkdir()
    (files["papers"] / "thesis.tex").write_text("mine")
    files["keys"].write_text(json.dumps(KEYS))
    files["keys"].chmod(0o600)
    files["dupkeys"].write_text('"sk-org-zero-0000": [client-0]\n"sk-org-zero-0000": ["*"]\n')
    files["listkeys"].write_text("- sk-org-zero-0000\n")
    files["unknownkeys"].write_text(json.dumps({"sk-org-zero-0000": ["client-7"]}))
    return files


def cli_cases(f: dict[str, Path], busy_port: int) -> list[tuple[str, str, list[str]]]:
    fin, unf = str(f["finished"]), str(f["unfinished"])
    new = "new-run"
    return [
        ("run", "--config that does not exist", ["--config", "missing.yaml"]),
        ("run", "--config not UTF-8", ["--config", str(f["latin1"])]),
        ("run", "--config not YAML", ["--config", str(f["badyaml"])]),
        ("run", "--config a YAML list", ["--config", str(f["listyaml"])]),
        ("run", "unknown key", sets("federation.roundz=2")),
        ("run", "negative rounds", sets("federation.rounds=-1")),
        ("run", "rounds not a number", sets("federation.rounds=abc")),
        ("run", "LoRA rank 0", sets("hmole.rank=0")),
        ("run", "0 clients", sets("federation.num_clients=0")),
        ("run", "negative learning rate", sets("optim.lr=-1")),
        ("run", "model folder missing", sets("model.name=/nonexistent/model")),
        ("run", "model folder is not a model", sets(f"model.name={f['notamodel']}")),
        ("run", "hub id that cannot resolve", sets("model.name=nosuch-org/nosuch-model")),
        ("run", "cuda without a GPU", sets(*TINY, "model.device=cuda")),
        ("run", "unknown device", sets("model.device=tpu")),
        ("run", "unknown dtype", sets("model.dtype=float8")),
        ("run", "unknown data source", sets("data.source=nosuch")),
        ("run", "data file missing", sets(*TINY, "data.source=jsonl", "data.path=no.jsonl")),
        (
            "run",
            "data file not UTF-8",
            sets(*TINY, "data.source=jsonl", f"data.path={f['latin1_jsonl']}", f"output.dir={new}"),
        ),
        (
            "run",
            "data file with a non-JSON line",
            sets(*TINY, "data.source=jsonl", f"data.path={f['notjson']}", f"output.dir={new}"),
        ),
        (
            "run",
            "data file with an array row",
            sets(*TINY, "data.source=jsonl", f"data.path={f['array']}", f"output.dir={new}"),
        ),
        ("run", "top_k above the experts", sets("hmole.top_k=9", "hmole.num_experts=4")),
        ("run", "clients_per_expert 0", sets("rsea.clients_per_expert=0")),
        ("run", "unknown method", ["--method", "nosuch"]),
        ("run", "two methods", ["--method", "fedit,local"]),
        ("run", "unknown transport", ["--transport", "nosuch"]),
        ("run", "--num-cpus 0", ["--transport", "flower-simulation", "--num-cpus", "0"]),
        ("run", "--out a finished run, no --resume", ["--out", fin, *sets(*TINY)]),
        ("run", "--resume a finished run", ["--out", fin, "--resume", *sets(*TINY)]),
        ("run", "--resume a folder that is no run", ["--out", "nowhere", "--resume"]),
        (
            "run",
            "--resume with other settings",
            ["--out", unf, "--resume", *sets(*TINY, "federation.local_steps=5")],
        ),
        (
            "run",
            "--resume with another method",
            ["--out", unf, "--resume", "--method", "fedit", *sets(*TINY)],
        ),
        (
            "run",
            "--resume a truncated checkpoint",
            ["--out", str(f["damaged"]), "--resume", *sets(*TINY)],
        ),
        (
            "run",
            "--resume a garbled metrics.jsonl",
            ["--out", str(f["garbled"]), "--resume", *sets(*TINY)],
        ),
        ("run", "--out where nothing can be written", ["--out", "/sys/fedamole-run", *sets(*TINY)]),
        ("run", "--out is a file", ["--out", str(f["afile"]), *sets(*TINY)]),
        ("compare", "unknown method", ["--out", "cmp", "--methods", "nosuch"]),
        ("compare", "empty method list", ["--out", "cmp", "--methods", ","]),
        ("compare", "seeds not numbers", ["--out", "cmp", "--seeds", "a,b"]),
        ("compare", "--out a finished run", ["--out", fin, "--methods", "fedit", *sets(*TINY)]),
        (
            "compare",
            "--out a folder of other files",
            ["--out", str(f["papers"]), "--methods", "fedit"],
        ),
        ("generate", "--run missing", ["--run", "nowhere", "hi"]),
        ("generate", "--run unfinished", ["--run", unf, "hi"]),
        ("generate", "--client without a model", ["--run", fin, "--client", "99", "hi"]),
        ("generate", "--input-file missing", ["--run", fin, "--input-file", "none.txt"]),
        (
            "generate",
            "--input-file not UTF-8",
            ["--run", fin, "--input-file", str(f["prompts_latin1"])],
        ),
        (
            "generate",
            "--input-file bad JSON line",
            ["--run", fin, "--input-file", str(f["notjson"])],
        ),
        (
            "generate",
            "--output an existing file",
            ["--run", fin, "hi", "--output", str(f["answers"])],
        ),
        ("generate", "--output a folder", ["--run", fin, "hi", "--output", str(f["papers"])]),
        (
            "generate",
            "--output in a missing folder",
            ["--run", fin, "hi", "--output", "no/where.jsonl"],
        ),
        (
            "generate",
            "sampling at temperature 0",
            ["--run", fin, "hi", "--do-sample", "--temperature", "0"],
        ),
        ("generate", "no prompt at all", ["--run", fin]),
        ("export", "--run missing", ["--run", "nowhere", "--out", "exported"]),
        ("export", "--run unfinished", ["--run", unf, "--out", "exported"]),
        (
            "export",
            "--client without a model",
            ["--run", fin, "--client", "99", "--out", "exported"],
        ),
        ("export", "--out a folder with files", ["--run", fin, "--out", str(f["papers"])]),
        ("serve", "--run missing", ["--run", "nowhere"]),
        ("serve", "--run unfinished", ["--run", unf]),
        ("serve", "open server on 0.0.0.0", ["--run", fin, "--host", "0.0.0.0"]),
        ("serve", "--api-keys missing", ["--run", fin, "--api-keys", "none.json"]),
        ("serve", "--api-keys with a key twice", ["--run", fin, "--api-keys", str(f["dupkeys"])]),
        ("serve", "--api-keys a list", ["--run", fin, "--api-keys", str(f["listkeys"])]),
        ("serve", "--api-keys unknown model", ["--run", fin, "--api-keys", str(f["unknownkeys"])]),
        ("serve", "--port in use", ["--run", fin, "--port", str(busy_port)]),
        ("serve", "--ssl-certfile without key", ["--run", fin, "--ssl-certfile", str(f["afile"])]),
    ]


def http_cases() -> list[tuple[str, str, str, dict | bytes | None, str | None]]:
    """(case, method, path, JSON body or raw bytes, key)."""
    zero, chat = "sk-org-zero-0000", "/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    return [
        ("no key", "POST", chat, {"model": "client-0", "messages": hi}, None),
        ("wrong key", "POST", chat, {"model": "client-0", "messages": hi}, "sk-nobody-00000"),
        ("malformed JSON", "POST", chat, b"{not json", zero),
        ("no messages", "POST", chat, {"model": "client-0"}, zero),
        ("empty messages", "POST", chat, {"model": "client-0", "messages": []}, zero),
        ("unknown model", "POST", chat, {"model": "client-9", "messages": hi}, zero),
        ("another organisation's model", "POST", chat, {"model": "client-1", "messages": hi}, zero),
        (
            "unknown role",
            "POST",
            chat,
            {"model": "client-0", "messages": [{"role": "tool", "content": "x"}]},
            zero,
        ),
        (
            "empty completion prompt",
            "POST",
            "/v1/completions",
            {"model": "client-0", "prompt": ""},
            zero,
        ),
        (
            "seed beyond 2^64",
            "POST",
            "/v1/completions",
            {"model": "client-0", "prompt": "hi", "seed": 2**64},
            zero,
        ),
        (
            "lone surrogate",
            "POST",
            chat,
            b'{"model": "client-0", "messages": [{"role": "user", "content": "a\\ud800"}]}',
            zero,
        ),
        (
            "max_tokens too large",
            "POST",
            chat,
            {"model": "client-0", "messages": hi, "max_tokens": 10**6},
            zero,
        ),
        (
            "max_tokens 0",
            "POST",
            chat,
            {"model": "client-0", "messages": hi, "max_tokens": 0},
            zero,
        ),
        (
            "prompt beyond the context",
            "POST",
            chat,
            {"model": "client-0", "messages": [{"role": "user", "content": "word " * 5000}]},
            zero,
        ),
        (
            "five stop strings",
            "POST",
            chat,
            {"model": "client-0", "messages": hi, "stop": list("abcde")},
            zero,
        ),
        ("n=2", "POST", chat, {"model": "client-0", "messages": hi, "n": 2}, zero),
        (
            "temperature 5",
            "POST",
            chat,
            {"model": "client-0", "messages": hi, "temperature": 5},
            zero,
        ),
        ("top_p 0", "POST", chat, {"model": "client-0", "messages": hi, "top_p": 0}, zero),
        ("body over the limit", "POST", chat, b"{" + b" " * (2 << 20) + b"}", zero),
        ("unknown path", "GET", "/v1/nope", None, zero),
        ("wrong method", "DELETE", "/v1/models", None, zero),
        ("another organisation's model card", "GET", "/v1/models/client-1", None, zero),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def try_http(root: Path, files: dict[str, Path]) -> list[Outcome]:
    port = free_port()
    log = root.parent / "serve.log"
    with log.open("w") as sink:
        server = subprocess.Popen(
            [*FEDAMOLE, "serve", "--run", str(files["finished"]), "--api-keys", str(files["keys"])]
            + ["--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text())
            time.sleep(0.3)
        outcomes = []
        for case, method, path, body, key in http_cases():
            before = snapshot(root)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            content = body if isinstance(body, bytes) else None
            payload = body if isinstance(body, dict) else None
            answer = httpx.request(
                method, url + path, json=payload, content=content, headers=headers, timeout=120
            )
            try:
                message = answer.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = answer.text[:120]
            outcomes.append(
                Outcome(
                    "HTTP", case, str(answer.status_code), message, False, snapshot(root) != before
                )
            )
    finally:
        server.terminate()
        server.wait(timeout=60)
    if "Traceback (most recent call last)" in log.read_text():
        for outcome in outcomes:
            if outcome.code.startswith("5"):
                outcome.traceback = True
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=Path, help="scratch folder to keep (default: temporary)")
    args = parser.parse_args()
    scratch = (
        Path(tempfile.mkdtemp(prefix="fedamole-bad-inputs-")) if args.keep is None else args.keep
    )
    root = scratch / "work"
    root.mkdir(parents=True)
    started = time.time()
    files = prepare(root)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        outcomes = [
            try_cli(root, command, case, cli_args)
            for command, case, cli_args in cli_cases(files, busy.getsockname()[1])
        ]
    outcomes += try_http(root, files)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
        f"{len(outcomes)} bad inputs in {time.time() - started:.0f} s\n"
    )
    print("| command | input | exit / status | message (first line) | traceback | files changed |")
    print("|---|---|---|---|---|---|")
    for o in outcomes:
        message = o.message.replace("|", "\\|")[:140]
        print(
            f"| {o.command} | {o.case} | {o.code} | {message} | {'yes' if o.traceback else 'no'} | {'yes' if o.changed else 'no'} |"
        )
    tracebacks = sum(o.traceback for o in outcomes)
    changed = sum(o.changed for o in outcomes)
    unclean = [o.case for o in outcomes if not o.clean]
    print(
        f"\n{len(outcomes)} bad inputs: {tracebacks} tracebacks, {changed} with files changed, "
        f"{len(outcomes) - len(unclean)} refused cleanly (exit 2 or a 4xx status)"
    )
    if unclean:
        print(f"not clean: {', '.join(unclean)}")
    if args.keep is None:
        shutil.rmtree(scratch, ignore_errors=True)
    sys.exit(1 if unclean else 0)


if __name__ == "__main__":
    main()
