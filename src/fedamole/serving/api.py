"""The OpenAI-compatible HTTP API over a :class:`~fedamole.serving.pool.ModelPool` (FastAPI).

``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` as
server-sent events in OpenAI's chunk shape) and ``GET /health``. Every error is OpenAI's JSON error
shape with its status: 400 bad request, 401 no or wrong key, 404 unknown model (also a model the
key may not use: its existence is not revealed), 429 queue full, 500 anything else (logged here,
never sent). Requests are checked (model, key, prompt length, ``max_tokens``) before they queue.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from fedamole.config import ConfigError
from fedamole.data.example import UNLABELLED, Example
from fedamole.files import TextFileError, read_utf8
from fedamole.serving.decoding import DecodeResult, DecodeRow, Sampling
from fedamole.serving.pool import ModelPool
from fedamole.serving.scheduler import BatchScheduler, Pending, QueueFull
from fedamole.serving.settings import ServeSettings

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.kind, self.param)


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def model_not_found(name: str) -> APIError:
    return APIError(
        404,
        f"The model {name!r} does not exist or you do not have access to it.",
        "invalid_request_error",
        "model",
    )


# ---------------------------------------------------------------------------------- keys
class KeyFileError(ConfigError):
    """A key file that cannot be used; the message names the file and the entry."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML (and so JSON) whose mappings refuse a key given twice: PyYAML keeps the last entry
    silently, which would grant a key listed for one client and again for ``"*"`` everything."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise KeyFileError(
                    f"the entries at lines {lines[key]} and {line} give the same key; "
                    "each key must appear once, with every model it may use"
                )
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def readable_by_others(path: Path) -> bool:
    """Whether the group or anyone else may read ``path`` (POSIX permission bits)."""
    return bool(path.stat().st_mode & 0o044)


class KeyRing:
    """API keys and the models each may use, from a YAML/JSON file mapping each key to a list
    of model names (``"*"``: every model). Keys are compared in constant time, never logged."""

    def __init__(self, grants: dict[str, frozenset[str]]) -> None:
        self._grants = [(key.encode(), models) for key, models in grants.items()]

    @classmethod
    def read(cls, path: Path) -> dict[str, list[str]]:
        """The key file's grants, checked for shape (before any model loads)."""
        if not path.is_file():
            raise KeyFileError(f"--api-keys {path}: no such file")
        try:
            doc = yaml.load(read_utf8(path), Loader=_UniqueKeyLoader)
        except (KeyFileError, TextFileError) as exc:
            raise KeyFileError(f"--api-keys {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise KeyFileError(f"--api-keys {path}: not YAML/JSON ({exc})") from None
        if not isinstance(doc, dict) or not doc:
            raise KeyFileError(
                f"--api-keys {path}: expected a mapping of key -> model names, e.g. "
                f'{{"sk-hospital-1": ["client-0"], "sk-admin": ["*"]}}'
            )
        for n, (key, models) in enumerate(doc.items(), 1):
            where = f"--api-keys {path}, entry {n}"  # never the key itself
            if not isinstance(key, str) or len(key) < 8:
                raise KeyFileError(f"{where}: a key must be a string of at least 8 characters")
            if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
                raise KeyFileError(f"{where}: expected a list of model names")
        return doc

    @classmethod
    def load(cls, path: Path, served: list[str]) -> KeyRing:
        """The key file's grants for the models being served; unknown names are an error."""
        grants: dict[str, frozenset[str]] = {}
        for n, (key, models) in enumerate(cls.read(path).items(), 1):
            unknown = sorted(set(models) - {"*", *served})
            if unknown:
                raise KeyFileError(
                    f"--api-keys {path}, entry {n}: unknown model(s) {unknown}; "
                    f"served: {', '.join(served)}"
                )
            grants[key] = frozenset(served) if "*" in models else frozenset(models)
        return cls(grants)

    def models_for(self, key: str | None) -> frozenset[str] | None:
        """The models this key may use; None for a missing or unknown key."""
        if key is None:
            return None
        given, found = key.encode(), None
        for stored, models in self._grants:  # no early exit: same time for every key
            if hmac.compare_digest(given, stored):
                found = models
        return found


# ---------------------------------------------------------------------------------- bodies
class BodyLimit:
    """Reads each request's body before the app sees it: refused with 413 as soon as it is
    declared or found larger than ``max_bytes`` (nothing more is read), with 408 when it pauses
    longer than ``idle_s``; only a body that fits reaches parsing, so one request cannot make
    the server parse, hold or wait for an unbounded body."""

    def __init__(self, app: ASGIApp, max_bytes: int, idle_s: float) -> None:
        self.app, self.max_bytes, self.idle_s = app, max_bytes, idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        body = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.idle_s)
            except TimeoutError:
                response = error_response(
                    408, f"The request body paused over {self.idle_s:g} s.", "invalid_request_error"
                )
                return await response(scope, receive, send)
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            f"The request body is larger than this server's limit of {self.max_bytes} bytes "
            "(--max-body-bytes).",
            "invalid_request_error",
        )
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, then the connection's own messages (e.g. its disconnect)."""
    sent = False

    async def replayed() -> ASGIMessage:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


# ---------------------------------------------------------------------------------- schemas
def _unicode(text: str) -> str:
    """JSON may spell a lone UTF-16 surrogate ("\\ud800"), which is no character: refused here
    (400) rather than by the tokenizer (500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"holds a lone UTF-16 surrogate ({text[exc.start]!r}) at character {exc.start}; "
            "send valid Unicode"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
# What torch.Generator.manual_seed accepts.
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: Text | list[Text] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, bool] | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise bad_request("stop: up to 4 non-empty strings", "stop")
        return tuple(stops)

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed)


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Request):
    prompt: Annotated[Text, Field(min_length=1)] | list[Annotated[Text, Field(min_length=1)]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions


# ---------------------------------------------------------------------------------- the app
@dataclass
class _Job:
    """One request, checked and ready to queue, with what its response needs."""

    row: DecodeRow
    kind: Literal["chat", "text"]
    include_usage: bool


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def _visible(request: Request) -> frozenset[str]:
    """The models the request's key may use (every model without --api-keys); 401 otherwise."""
    keys: KeyRing | None = request.app.state.keys
    if keys is None:
        return request.app.state.names
    key = _bearer(request)
    models = keys.models_for(key)
    if models is None:
        message = (
            "Incorrect API key provided."
            if key
            else "Missing API key: send 'Authorization: Bearer <key>'."
        )
        raise APIError(401, message, "invalid_request_error")
    return models


# A dependency, so the key is checked before the body is.
Visible = Annotated[frozenset[str], Depends(_visible)]


def create_app(
    pool: ModelPool, scheduler: BatchScheduler, keys: KeyRing | None, settings: ServeSettings
) -> FastAPI:
    app = FastAPI(title="fedamole serve", version="1", docs_url=None, redoc_url=None)
    app.state.keys, app.state.names = keys, frozenset(pool.names())
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, idle_s=settings.http.idle_timeout_s
    )

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        if first.get("type") == "json_invalid":
            return error_response(
                400, "We could not parse the JSON body of your request.", "invalid_request_error"
            )
        message = f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}"
        return error_response(400, message, "invalid_request_error", where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(
            500, "The server had an error processing your request.", "server_error"
        )

    def checked_model(visible: frozenset[str], name: str) -> str:
        if name not in visible or name not in pool.names():
            raise model_not_found(name)
        return name

    @app.get("/health")
    async def health(request: Request) -> dict[str, object]:
        """Up or not for anyone; how many models only for a key that may use them."""
        visible = keys.models_for(_bearer(request)) if keys is not None else app.state.names
        return {"status": "ok"} | ({"models": len(visible)} if visible else {})

    @app.get("/v1/models")
    async def models(visible: Visible) -> dict[str, object]:
        data = [_model_card(name) for name in pool.names() if name in visible]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name}")
    async def model(name: str, visible: Visible) -> dict[str, object]:
        return _model_card(checked_model(visible, name))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, visible: Visible) -> JSONResponse | StreamingResponse:
        name = checked_model(visible, body.model)
        prompter = pool.prompter(name)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        _check_characters(pool, name, sum(len(m["content"]) for m in messages), "messages")
        try:  # tokenising is CPU work: off the event loop, so other requests go on meanwhile
            prompt_ids = await run_in_threadpool(prompter.chat_ids, messages)
        except (ValueError, TemplateError) as exc:  # e.g. roles the chat template refuses
            raise bad_request(f"messages: {exc}", "messages") from None
        example = _instruction(messages)
        if example is None and pool.needs_instruction(name):
            raise bad_request(
                f"{name} mixes its adapters by comparing the prompt with its own data: send one "
                "user message",
                "messages",
            )
        wanted = body.max_completion_tokens or body.max_tokens
        job = _job(pool, settings.max_new_tokens, body, name, prompt_ids, wanted, example, "chat")
        return await _respond(scheduler, job, body.stream)

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, visible: Visible
    ) -> JSONResponse | StreamingResponse:
        name = checked_model(visible, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise bad_request("prompt: one prompt per request", "prompt")
        if pool.needs_instruction(name):
            raise bad_request(
                f"{name} mixes its adapters per instruction: use /v1/chat/completions", "model"
            )
        _check_characters(pool, name, len(prompts[0]), "prompt")
        prompt_ids = await run_in_threadpool(pool.prompter(name).text_ids, prompts[0])
        job = _job(
            pool, settings.max_new_tokens, body, name, prompt_ids, body.max_tokens, None, "text"
        )
        return await _respond(scheduler, job, body.stream)

    return app


def _model_card(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "fedamole"}


def _check_characters(pool: ModelPool, name: str, chars: int, param: str) -> None:
    """Refuse a prompt that cannot fit the context before spending CPU on tokenising it."""
    context = pool.max_length(name)
    if chars > context * pool.prompter(name).longest_token_chars:
        raise bad_request(
            f"This model's maximum context length is {context} tokens (model.max_length), "
            f"and a prompt of {chars} characters is longer than that. Please reduce the length "
            "of the prompt.",
            param,
        )


def _instruction(messages: list[dict[str, str]]) -> Example | None:
    """A single user message as the instruction it is (what FedDPA's mix reads)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return Example(messages[0]["content"], "", "", UNLABELLED)
    return None


def _job(
    pool: ModelPool,
    max_new_tokens: int,
    body: _Request,
    name: str,
    prompt_ids: list[int],
    wanted: int | None,
    example: Example | None,
    kind: Literal["chat", "text"],
) -> _Job:
    """The request as a row to decode, once its lengths are known to fit."""
    context = pool.max_length(name)
    room = context - len(prompt_ids)
    if wanted is not None and wanted > max_new_tokens:
        raise bad_request(
            f"max_tokens is {wanted}, above this server's limit of {max_new_tokens} "
            "(--max-new-tokens)",
            "max_tokens",
        )
    if room < 1 or (wanted is not None and wanted > room):
        raise bad_request(
            f"This model's maximum context length is {context} tokens (model.max_length). "
            f"However, you requested {len(prompt_ids) + (wanted or 1)} tokens "
            f"({len(prompt_ids)} in the prompt, {wanted or 1} for the completion). "
            "Please reduce the length of the prompt or max_tokens.",
            "messages",
        )
    max_new = min(wanted or max_new_tokens, room)
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    row = DecodeRow(name, prompt_ids, max_new, body.sampling(), body.stops(), example)
    return _Job(row, kind, include_usage)


async def _respond(
    scheduler: BatchScheduler, job: _Job, stream: bool
) -> JSONResponse | StreamingResponse:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()

    def emit(kind: str) -> Callable[[object], None]:
        return lambda value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    if stream:
        job.row.on_text = emit("text")
    try:
        scheduler.submit(Pending(job.row, emit("done")))
    except QueueFull as exc:
        raise APIError(
            429, f"The server is busy ({exc}); retry shortly.", "rate_limit_error"
        ) from None
    meta = _Meta.new(job)
    if stream:
        return StreamingResponse(_stream(events, job, meta), media_type="text/event-stream")
    try:
        while True:
            kind, value = await events.get()
            if kind == "done":
                return JSONResponse(_full_response(job, meta, _result(value)))
    finally:  # also when the client disconnects (the task is cancelled): stop decoding it
        job.row.cancelled = True


def _result(value: object) -> DecodeResult:
    if isinstance(value, BaseException):
        raise value
    assert isinstance(value, DecodeResult)
    return value


@dataclass(frozen=True)
class _Meta:
    id: str
    created: int

    @classmethod
    def new(cls, job: _Job) -> _Meta:
        prefix = "chatcmpl" if job.kind == "chat" else "cmpl"
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()))


def _usage(job: _Job, result: DecodeResult) -> dict[str, int]:
    prompt = len(job.row.prompt_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": result.completion_tokens,
        "total_tokens": prompt + result.completion_tokens,
    }


def _envelope(job: _Job, meta: _Meta, kind: str, choices: list[dict]) -> dict[str, object]:
    return {
        "id": meta.id,
        "object": kind,
        "created": meta.created,
        "model": job.row.served,
        "choices": choices,
    }


def _full_response(job: _Job, meta: _Meta, result: DecodeResult) -> dict[str, object]:
    choice: dict[str, object] = {
        "index": 0,
        "logprobs": None,
        "finish_reason": result.finish_reason,
    }
    if job.kind == "chat":
        choice["message"] = {"role": "assistant", "content": result.text}
        kind = "chat.completion"
    else:
        choice["text"], kind = result.text, "text_completion"
    return _envelope(job, meta, kind, [choice]) | {"usage": _usage(job, result)}


def _chunk_kind(job: _Job) -> str:
    return "chat.completion.chunk" if job.kind == "chat" else "text_completion"


def _chunk(job: _Job, meta: _Meta, text: str | None, finish: str | None) -> dict[str, object]:
    choice: dict[str, object] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if job.kind == "chat":
        choice["delta"] = {} if text is None else {"content": text}
    else:
        choice["text"] = text or ""
    return _envelope(job, meta, _chunk_kind(job), [choice])


def _sse(payload: dict[str, object]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


_STREAM_ERROR = {
    "error": {
        "message": "The server had an error processing your request.",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


async def _stream(events: asyncio.Queue, job: _Job, meta: _Meta) -> AsyncIterator[str]:
    try:
        if job.kind == "chat":
            first = _chunk(job, meta, None, None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}  # type: ignore[index]
            yield _sse(first)
        while (event := await events.get())[0] == "text":
            yield _sse(_chunk(job, meta, str(event[1]), None))
        result = event[1]
        if isinstance(result, BaseException):
            log.error("stream failed: %s", result)
            yield _sse(_STREAM_ERROR)
        else:
            yield _sse(_chunk(job, meta, None, result.finish_reason))
            if job.include_usage:
                usage = _envelope(job, meta, _chunk_kind(job), []) | {"usage": _usage(job, result)}
                yield _sse(usage)
        yield "data: [DONE]\n\n"
    finally:  # the client may have gone away mid-stream: stop decoding its row
        job.row.cancelled = True
