"""The FastAPI app of ``leantune serve``: OpenAI-compatible routes over an :class:`Engine`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``: server-sent
events), ``GET /v1/models``, ``GET /v1/leantune/info``, ``GET /health`` and the chat page ``GET /``.

One request generates at a time: jobs go to a single worker thread, in arrival order (the executor's
queue is the waiting line), so the event loop stays free to accept connections, stream tokens and
notice clients that went away. The worker never waits for a client: tokens go into a queue that the
response drains, so a slow reader cannot hold up the requests behind it. A streaming client that
disconnects sets its job's cancel flag, and the job stops before its next token; a job whose client
left while it was still waiting in line is skipped.

Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``: pydantic's
validation errors and malformed JSON become 400s of that shape too. A failed generation is a 500
(``code`` ``draft_error`` when the draft model of speculative decoding failed); once a stream has
started, it is an error event instead, and the server goes on with the next request.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leantune.serve.engine import CANCELLED, Engine, Job, JobResult, RequestError
from leantune.serve.openai_schema import ChatCompletionRequest, CompletionRequest
from leantune.speculative.common import DraftError

__all__ = ["DEFAULT_MAX_BODY", "create_app", "error_body"]

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: far more than any prompt that fits a context


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The error object of the OpenAI API (what its client libraries parse)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error(status: int, message: str, **kw: Any) -> JSONResponse:
    return JSONResponse(error_body(message, **kw), status_code=status)


def _failure(err: Exception) -> dict[str, Any]:
    """The error body of a generation that failed (a 500, or the last event of a stream)."""
    code = "draft_error" if isinstance(err, DraftError) else None
    return error_body(f"generation failed: {type(err).__name__}: {err}", type="server_error", code=code)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is a 413 with the OpenAI error body, whether
    its Content-Length says so up front or a chunked body grows past it (then the read fails as it
    crosses the limit). FastAPI's own ``max_body_size`` (0.165+) answers a too-long Content-Length
    with a plain-text 413 that no exception handler can reshape, hence this."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = _error(413, self.message(), code="request_too_large")
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI lets an HTTPException from the body read through to its handler
                    raise StarletteHTTPException(413, self.message())
            return message

        await self.app(scope, limited, send)

    def message(self) -> str:
        return f"the request body is over this server's limit of {self.max_bytes} bytes"


def _param_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages.[0].role"`` (OpenAI's ``param``), without
    the union-member tags pydantic puts in a location (``"prompt", "list[int]", 0``)."""
    parts = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif isinstance(p, str) and p.isidentifier() and p not in _TYPE_TAGS and not p[:1].isupper():
            parts.append(p)
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_BEARER = HTTPBearer(auto_error=False)


def _key_error(api_key: str | None, given: str) -> RequestError | None:
    """The 401 for a missing or wrong bearer token, or None when it is right (or none is needed)."""
    if api_key is None:
        return None
    # constant time: the comparison must not tell how much of a guessed key was right
    if secrets.compare_digest(given.encode(), api_key.encode()):
        return None
    message = "missing API key (Authorization: Bearer KEY)" if not given else "incorrect API key"
    return RequestError(message, code="invalid_api_key", status=401)


def _check_key(api_key: str | None) -> Callable[..., Any]:
    async def check(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        error = _key_error(api_key, creds.credentials if creds is not None else "")
        if error is not None:
            raise error

    return check


def _bearer_of(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(
    engine: Engine, *, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY
) -> FastAPI:
    """The app serving ``engine``. ``api_key``: required as a bearer token on every ``/v1`` route
    (``/health`` and the chat page ``/`` stay open: the page asks for the key itself)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leantune-generate")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="leantune serve",
        summary=f"OpenAI-compatible API for {engine.model_name}",
        lifespan=lifespan,
        docs_url=None,  # the Swagger / ReDoc pages load their scripts from a CDN: nothing offline
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.engine = engine
    app.state.executor = executor
    auth = [Depends(_check_key(api_key))]
    page = resources.files("leantune.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return _error(err.status, err.message, param=err.param, code=err.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI reads and checks the body before it runs the key check: a client without the key
        # must learn nothing about what the routes accept, so the 401 comes first here too
        if request.url.path.startswith("/v1/") and (denied := _key_error(api_key, _bearer_of(request))):
            return _error(denied.status, denied.message, code=denied.code)
        errors = err.errors()
        first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in ctype:
            # FastAPI reads a body as JSON only when it says so: this also keeps a web page of another
            # origin from posting here with a form or text/plain (JSON needs a CORS preflight)
            return _error(
                400, f"send the body as JSON (Content-Type: application/json), not {ctype or 'untyped'}"
            )
        if first.get("type") == "json_invalid":
            return _error(
                400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(": ")
            )
        param = _param_of(first.get("loc", ()))
        # a value that fits no member of a union (prompt=3) fails each member: say them all, once
        same = [e for e in errors if _param_of(e.get("loc", ())) == param]
        msgs = list(dict.fromkeys(str(e.get("msg")) for e in same))
        more = len(errors) - len(same)
        tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        return _error(400, f"{param or 'body'}: {' or '.join(msgs)}{tail}", param=param)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        # e.g. CUDA out of memory in a generation: the client gets a parseable 500, the log the trace
        return JSONResponse(_failure(err), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        code = "request_too_large" if err.status_code == 413 else None
        return _error(err.status_code, str(err.detail), type=kind, code=code)

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        if engine.speculative is not None:  # which decoding, for a client that cares about speed
            return {"status": "ok", "decoding": engine.decoding}
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        card = {
            "id": engine.model_name,
            "object": "model",
            "created": engine.created,
            "owned_by": "leantune",
            "decoding": engine.decoding,  # ar, or sd / duo with a draft model (not in OpenAI's card)
        }
        return {"object": "list", "data": [card]}

    @app.get("/v1/leantune/info", dependencies=auth)
    async def info() -> dict[str, Any]:
        return engine.info()

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        job = engine.prepare_chat([m.as_dict() for m in body.messages], body.sampling())
        return await _respond(request, job, body.stream, body.include_usage, chat=True)

    @app.post("/v1/completions", dependencies=auth, response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        job = engine.prepare_completion(body.prompt, body.sampling())
        return await _respond(request, job, body.stream, body.include_usage, chat=False)

    async def _respond(
        request: Request, job: Job, stream: bool, include_usage: bool, *, chat: bool
    ) -> JSONResponse | StreamingResponse:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if stream:
            return StreamingResponse(
                _stream(request, job, rid, created, include_usage, chat=chat),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await _run_until_done(request, job)
        if result is None:  # the client went away; nobody reads this
            return _error(499, "client closed the request")
        if chat:
            choices = [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for c in result.choices
            ]
        else:
            choices = [
                {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                for c in result.choices
            ]
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": engine.model_name,
                "choices": choices,
                "usage": result.usage(),
            }
        )

    async def _run_until_done(request: Request, job: Job) -> JobResult | None:
        cancel = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(executor, lambda: engine.run(job, cancel=cancel))
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.5)
                if done:
                    return future.result()
                if await request.is_disconnected():
                    cancel.set()
                    return None
        finally:
            cancel.set()  # the handler was cancelled (shutdown): the job must not run on

    async def _stream(
        request: Request, job: Job, rid: str, created: int, include_usage: bool, *, chat: bool
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, str, str | None] | None] = asyncio.Queue()
        cancel = threading.Event()

        def on_delta(index: int, text: str, finish: str | None) -> None:  # in the worker thread
            loop.call_soon_threadsafe(events.put_nowait, (index, text, finish))

        future = loop.run_in_executor(executor, lambda: engine.run(job, on_delta=on_delta, cancel=cancel))
        future.add_done_callback(lambda _: events.put_nowait(None))
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {
                "id": rid,
                "object": kind,
                "created": created,
                "model": engine.model_name,
                "choices": choices,
            }
            return _sse({**body, **extra})

        def choice(index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

        try:
            if chat:  # the role first, as OpenAI does, for every choice
                yield chunk([choice(i, "", None, role=True) for i in range(job.params.n * len(job.prompts))])
            while (event := await events.get()) is not None:
                if await request.is_disconnected():
                    return
                index, text, finish = event
                yield chunk([choice(index, None if (chat and finish) else text, finish)])
            try:
                result = future.result()
            except Exception as err:  # e.g. out of memory: the status is sent already, say it here
                yield _sse(_failure(err))
                return
            if include_usage:
                yield chunk([], usage=result.usage())
            if all(c.finish_reason != CANCELLED for c in result.choices):
                yield "data: [DONE]\n\n"
        finally:
            # Also reached when the server cancels this generator because the client disconnected:
            # the job stops before its next token and the worker is free for the next request.
            cancel.set()

    return app
