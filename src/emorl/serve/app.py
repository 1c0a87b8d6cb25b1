"""The HTTP side of ``emorl serve``: a FastAPI app over an :class:`~emorl.serve.engine.Engine`.

Routes: ``POST /v1/chat/completions`` (OpenAI's, plain or ``stream: true`` server-sent events), ``GET /v1/models``,
``POST /v1/score``, ``GET /v1/objectives``, ``GET /health``, and the web page (``GET /``, files in ``static/``).
Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status naming the field;
an unexpected failure is a 500 in the same shape without a traceback (it goes to the server log). With an API key
every route but ``/health`` and the page's static files needs ``Authorization: Bearer KEY`` (compared in constant
time). JSON routes take ``Content-Type: application/json`` only (415 otherwise): a browser sends a cross-origin
"simple" POST (text/plain, form data) without a preflight, so any page a user visits could otherwise drive a local
server; no CORS headers are sent, so browsers keep other origins' scripts from reading replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from emorl.serve.engine import Engine, Job, Overloaded, TooLarge
from emorl.serve.protocol import (
    ApiError,
    ChatRequest,
    chunk,
    completion,
    last_user,
    new_id,
    parse_chat,
    parse_score,
    usage,
)
from emorl.utils import EmorlError

log = logging.getLogger("emorl.serve")
STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/health", "/", "/static/")
TRAINED_ON = ("the adapters were trained on single client statements; earlier turns of a conversation go through the "
              "chat template, but replies to them are outside what was trained")


def create_app(engine: Engine, *, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               manage_engine: bool = True) -> Any:
    """The app. ``manage_engine``: start the engine's scheduler on startup and close it on shutdown."""
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        yield
        if manage_engine:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="emorl serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def error(e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
        if e.retry_after is not None:
            headers["Retry-After"] = str(e.retry_after)
        return JSONResponse(e.body(), status_code=e.status, headers=headers or None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        if e.status_code == 404:
            msg += "; routes: POST /v1/chat/completions, GET /v1/models, POST /v1/score, GET /v1/objectives, " \
                   "GET /health, GET /"
        return error(ApiError(e.status_code, msg, None, code))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return error(ApiError(400, f"invalid request: {e.errors()}", None, "invalid_value"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(ApiError(500, f"internal error ({type(e).__name__}); see the server log", None,
                              "internal_error", "server_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        path = request.url.path
        if api_key and not (path in OPEN_PATHS or path.startswith("/static/")):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                           "with the key the server was started with", None, "invalid_api_key",
                                      "authentication_error"))
        return await call_next(request)

    async def read_json(request: Request) -> Any:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"Content-Type is {ctype or 'missing'!r}; send the JSON body with 'Content-Type: "
                                "application/json'", None, "unsupported_media_type")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise ApiError(413, f"the request body is {size} bytes; the limit is {max_body_bytes}", None,
                           "body_too_large")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > max_body_bytes:
                raise ApiError(413, f"the request body is over the limit of {max_body_bytes} bytes", None,
                               "body_too_large")
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object with "
                                "'Content-Type: application/json'", None, "invalid_json") from e

    def submit(key: str, pairs: list[Any], stream: bool = False, prompt_tokens: int = 0) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple[str, Any, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
                loop.call_soon_threadsafe(queue.put_nowait, event)

        job = Job(key, pairs, emit, stream=stream, prompt_tokens=prompt_tokens)
        try:
            engine.submit(job)
        except Overloaded as e:
            raise ApiError(429, str(e), None, "rate_limit_exceeded", "rate_limit_error", retry_after=e.retry_after) \
                from e
        except TooLarge as e:
            raise ApiError(400, str(e), "max_tokens", "context_length_exceeded") from e
        except EmorlError as e:
            raise ApiError(503, str(e), None, "shutting_down", "server_error") from e
        return job, queue

    async def watch_disconnect(request: Request, job: Job) -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                engine.cancel(job)
                return

    async def collect(request: Request, job: Job, queue: asyncio.Queue) -> list[tuple[str, Any, Any]]:
        """Events of a job until it is done; a client that disconnects cancels it."""
        watcher = asyncio.ensure_future(watch_disconnect(request, job))
        events = []
        try:
            while True:
                ev = await queue.get()
                events.append(ev)
                if ev[0] in ("done", "error"):
                    return events
        finally:
            watcher.cancel()
            if not events or events[-1][0] not in ("done", "error"):
                engine.cancel(job)  # this task was cancelled (client gone): free the job's rows

    # ------------------------------------------------------------------------------------------- routes

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "run": str(engine.run), "pending": engine.pending(), "stats": engine.stats}

    @app.get("/")
    async def page() -> Any:
        return FileResponse(STATIC / "index.html")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": now, "owned_by": "emorl",
             "emorl": {"kind": m.kind, "mode": m.mode, "anchor": m.anchor, "label": m.label, "note": TRAINED_ON,
                       "searched": any(s["method"] == m.name for s in engine.searched.values())}}
            for m in engine.methods.values()]}

    @app.get("/v1/objectives")
    async def objectives() -> dict[str, Any]:
        gen = engine.cfg.eval.generation
        return {"objectives": engine.objectives, "adapters": engine.adapters, "searched": engine.searched,
                "methods": [{"id": m.name, "kind": m.kind, "mode": m.mode, "anchor": m.anchor, "label": m.label}
                            for m in engine.methods.values()],
                "generation": {"max_tokens": engine.default_max_tokens, "do_sample": gen.do_sample,
                               "temperature": gen.temperature, "top_k": gen.top_k, "top_p": gen.top_p},
                "max_tokens": engine.max_tokens, "max_prompt_tokens": engine.prompt_limit, "note": TRAINED_ON,
                **engine.front_data()}

    @app.post("/v1/score")
    async def score(request: Request) -> dict[str, Any]:
        statements, replies = parse_score(await read_json(request))
        try:
            scores = await asyncio.wrap_future(engine.score_async(statements, replies))
        except RuntimeError as e:  # the worker is shut down
            raise ApiError(503, f"the server is shutting down ({e})", None, "shutting_down", "server_error") from e
        return {"object": "emorl.scores", "objectives": engine.objectives,
                "scores": [{o: scores[o][i] for o in engine.objectives} for i in range(len(statements))]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        raw = await read_json(request)
        routed = None
        ext = raw.get("emorl") if isinstance(raw, dict) else None
        if isinstance(ext, dict) and ext.get("weights") == "auto" and last_user(raw):
            routed = await engine.route_async(str(last_user(raw)))  # on the worker, never on the event loop
        req = parse_chat(raw, engine, routed)
        cid = new_id()
        job, queue = submit(req.key, req.pairs, stream=req.stream, prompt_tokens=req.prompt_tokens)
        if req.stream:
            return StreamingResponse(sse(req, cid, job, queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        events = await collect(request, job, queue)
        err = [e for e in events if e[0] == "error"]
        if err:
            raise ApiError(503 if "shutting down" in err[0][1] else 500, err[0][1], None, "decoding_failed",
                           "server_error")
        results = [None] * len(req.pairs)
        for kind, c, res in events:
            if kind == "finish":
                results[c] = res
        return completion(req, cid, results)

    async def sse(req: ChatRequest, cid: str, job: Job, queue: asyncio.Queue) -> AsyncIterator[str]:
        """OpenAI's chunk stream: a role delta per choice, content deltas, a finish chunk each, [DONE]."""
        created = int(time.time())
        tok = engine.request_tokenizer  # the event loop's own tokenizer (the decode thread has another)
        n = len(req.pairs)
        texts = [StreamText(tok, list(req.pairs[c].stop)) for c in range(n)]
        done_tokens = 0
        try:
            first = [{"index": c, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                      "logprobs": None} for c in range(n)]
            yield data(chunk(req, cid, created, first, {"emorl": req.extension()}))
            while True:
                kind, c, value = await queue.get()
                if kind == "token":
                    delta = texts[c].add(value)
                    if delta:
                        yield data(chunk(req, cid, created, [{"index": c, "delta": {"content": delta},
                                                             "finish_reason": None, "logprobs": None}]))
                elif kind == "finish":
                    done_tokens += len(value.token_ids)
                    rest = texts[c].finish(value.text)
                    choices = []
                    if rest:
                        choices.append({"index": c, "delta": {"content": rest}, "finish_reason": None,
                                        "logprobs": None})
                    choices.append({"index": c, "delta": {}, "finish_reason": value.finish_reason, "logprobs": None})
                    for ch in choices:
                        yield data(chunk(req, cid, created, [ch]))
                elif kind == "error":
                    yield data(ApiError(500, c, None, "decoding_failed", "server_error").body())
                    break
                elif kind == "done":
                    if req.include_usage:
                        yield data(chunk(req, cid, created, [], {"usage": usage(req, done_tokens)}))
                    break
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(job)  # no-op once done; a client that went away frees its rows at the next step

    return app


def data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class StreamText:
    """Incremental text of one streamed choice whose pieces concatenate to the non-streamed reply: the decoded
    tokens, cut at a stop string and stripped like ``EnsembleModel``'s text, minus a tail that may still change
    (an incomplete character, trailing spaces, a possible stop string's start)."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tok, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.stops:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        text = text.lstrip()
        if text.endswith("\ufffd"):
            return ""
        safe = text[: len(text) - self.hold].rstrip()
        if not safe.startswith(self.sent) or len(safe) <= len(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def finish(self, final: str) -> str:
        if not final.startswith(self.sent):  # a tokenizer that rewrites earlier text: cannot be unsent
            log.warning("streamed text %r is not a prefix of the reply %r", self.sent, final)
            return ""
        rest, self.sent = final[len(self.sent):], final
        return rest
