"""The ASGI app: OpenAI-compatible completions over an ``Engine``, built by ``create_app`` (no globals).

``create_app(engine_or_model, api_key=..., cors=...)`` returns a Starlette app that any ASGI server can run
(``gpt2deploy serve`` runs it under uvicorn); the app starts the engine's decode loop when it starts and
drains it when it stops. Endpoints: ``GET /health`` (open, 200 once the model is loaded and the loop runs),
``GET /metrics`` (Prometheus text), ``GET /v1/models``, ``POST /v1/completions`` (JSON or server-sent events).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..errors import Gpt2DeployError
from .engine import Engine, NotAccepting, QueueFull
from .protocol import ApiError, Limits, error_body, parse_completion

#: Seconds a client is told to wait (Retry-After) when the queue is full or the model is not ready.
RETRY_AFTER = 1
_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled", "error": "error"}


def create_app(
    engine_or_model,
    *,
    api_key: str | None = None,
    cors: tuple[str, ...] | list[str] = (),
    max_batch: int = 8,
    max_queue: int = 64,
    limits: Limits | None = None,
    shutdown_timeout: float = 10.0,
    model_id: str | None = None,
) -> Starlette:
    """The server app. ``engine_or_model``: an ``Engine`` or a loaded ``gpt2deploy.Model`` (then wrapped in
    an ``Engine(max_batch, max_queue)``). With ``api_key`` every endpoint but ``/health`` needs
    ``Authorization: Bearer KEY``; ``cors`` lists the origins allowed to call it from a browser (none by default).
    """
    engine = (
        engine_or_model
        if isinstance(engine_or_model, Engine)
        else Engine(engine_or_model, max_batch=max_batch, max_queue=max_queue, model_id=model_id)
    )
    limits = limits or Limits()
    api = _Api(engine, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop, shutdown_timeout)

    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat, methods=["GET", "POST"]),
    ]
    middleware = []
    if cors:
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    if api_key:
        middleware.append(Middleware(_BearerAuth, api_key=api_key, open_paths=("/health",)))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, ApiError: _api_error, Exception: _server_error},
    )
    app.state.engine = engine
    return app


# -- errors ----------------------------------------------------------------------------------------
def _json_error(status: int, message: str, param=None, code=None, headers=None, kind=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code, kind), status_code=status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        msg = f"no route {request.url.path}; endpoints: GET /health, /metrics, /v1/models; POST /v1/completions"
        return _json_error(404, msg, code="not_found")
    if exc.status_code == 405:
        return _json_error(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    return _json_error(exc.status_code, str(exc.detail)[:200])


async def _api_error(request: Request, exc: ApiError) -> Response:
    return _json_error(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    return _json_error(500, "internal server error; see the server log", code="internal_error")


class _BearerAuth:
    """Every HTTP request but the open paths needs ``Authorization: Bearer <api_key>`` (constant-time compare)."""

    def __init__(self, app, api_key: str, open_paths: tuple[str, ...]):
        self.app = app
        self.key = f"Bearer {api_key}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.key):
            msg = "missing or wrong API key; send the header 'Authorization: Bearer KEY'"
            resp = _json_error(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


# -- helpers ---------------------------------------------------------------------------------------
def _token_str(model, token: int) -> str:
    b = model.token_bytes.bytes_of(token)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


class _Logprobs:
    """The OpenAI completions ``logprobs`` object, built token by token."""

    def __init__(self, model, offset: int = 0):
        self.model = model
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list = []
        self.top_logprobs: list = []
        self.text_offset: list[int] = []

    def add(self, lp) -> None:
        s = _token_str(self.model, lp.token)
        self.tokens.append(s)
        self.token_logprobs.append(lp.logprob)
        self.top_logprobs.append(None if lp.top is None else {_token_str(self.model, t): v for t, v in lp.top})
        self.text_offset.append(self.offset)
        self.offset += len(s)

    def body(self) -> dict:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


async def _read_body(request: Request, limit: int) -> bytes:
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > limit):
        raise ApiError(413, f"request body over the limit of {limit} bytes", code="body_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _watch_disconnect(receive, on_gone) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_gone()
            return


class _EventStream(Response):
    """Server-sent events from an async iterator; a client that goes away cancels ``handle`` at once."""

    media_type = "text/event-stream"

    def __init__(self, events, handle):
        self.events, self.handle = events, handle
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        gone = False

        def on_gone():
            nonlocal gone
            gone = True
            self.handle.cancel()

        watcher = asyncio.ensure_future(_watch_disconnect(receive, on_gone))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.events:
                if gone:
                    break
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            if not gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we were sending
            pass
        finally:
            watcher.cancel()
            self.handle.cancel()  # no-op when every sequence finished
            with contextlib.suppress(Exception):
                await self.events.aclose()


# -- endpoints -------------------------------------------------------------------------------------
class _Api:
    def __init__(self, engine: Engine, limits: Limits):
        self.engine = engine
        self.limits = limits

    async def health(self, request: Request) -> Response:
        if self.engine.ready.is_set() and self.engine.running:
            return JSONResponse({"status": "ok", "model": self.engine.model_id})
        return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER)})

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(self.engine.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.engine.describe()]})

    async def model(self, request: Request) -> Response:
        if request.path_params["model_id"] != self.engine.model_id:
            raise self._unknown_model(request.path_params["model_id"])
        return JSONResponse(self.engine.describe())

    async def chat(self, request: Request) -> Response:
        msg = (
            "chat completions are not supported: GPT-2 models have no chat template; "
            "use POST /v1/completions with a 'prompt'"
        )
        return _json_error(404, msg, code="unsupported_endpoint")

    def _unknown_model(self, name: str) -> ApiError:
        return ApiError(
            404, f"model '{name[:80]}' is not served here; use '{self.engine.model_id}'", "model", "model_not_found"
        )

    def _unavailable(self, message: str) -> ApiError:
        return ApiError(503, message, code="unavailable", headers={"Retry-After": str(RETRY_AFTER)})

    async def completions(self, request: Request) -> Response:
        engine, m = self.engine, self.engine.metrics
        try:
            raw = await _read_body(request, self.limits.max_body_bytes)
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
            req = parse_completion(body, self.limits, engine.vocab, engine.context)
            if req.model is not None and req.model != engine.model_id:
                raise self._unknown_model(req.model)
            if not (engine.ready.is_set() and engine.running):
                raise self._unavailable("the model is not ready (loading or shutting down); retry shortly")
            seqs = await asyncio.get_running_loop().run_in_executor(None, self._sequences, req)
        except ApiError as e:
            m.request("rejected" if e.status == 503 else "invalid")
            raise
        try:
            handle = engine.submit(seqs, asyncio.get_running_loop())
        except QueueFull as e:
            m.request("rejected")
            raise self._unavailable(f"the server is busy ({e}); retry shortly") from None
        except NotAccepting as e:
            m.request("rejected")
            raise self._unavailable(str(e)) from None
        job = _Job(engine, req, seqs, handle)
        if req.stream:
            return _EventStream(job.stream(), handle)
        return await job.collect(request.receive)

    def _sequences(self, req) -> list:
        """Tokenize and fit every prompt x choice; a prompt that does not fit gives 400 naming the fix."""
        seqs = []
        want_prompt = req.echo and req.logprobs is not None
        for p in req.prompts:
            for j in range(req.n):
                try:
                    score = req.max_tokens == 0
                    seqs.append(self.engine.sequence(p, req.options(j), req.logprobs, want_prompt, score))
                except Gpt2DeployError as e:
                    param = "max_tokens" if "max_new_tokens" in str(e) or "context" in str(e) else "prompt"
                    msg = (
                        str(e).replace("max_new_tokens", "max_tokens").replace("--truncate / truncate=True", "truncate")
                    )
                    raise ApiError(400, msg, param, "context_length_exceeded" if "context" in msg else None) from None
        return seqs


class _Job:
    """One accepted request: turns the engine's events into an OpenAI response or a stream of chunks."""

    def __init__(self, engine: Engine, req, seqs, handle):
        self.engine, self.req, self.seqs, self.handle = engine, req, seqs, handle
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        model = engine.model
        self.texts = [[] for _ in seqs]
        self.finish: list[str | None] = [None] * len(seqs)
        self.counts = [0] * len(seqs)
        self.errors: list[str] = []
        self.logprobs = [_Logprobs(model) if req.logprobs is not None else None for _ in seqs]
        self.echoes = [self._echo_text(s) if req.echo else "" for s in seqs]
        self.done = 0

    def _echo_text(self, seq) -> str:
        prompt = self.req.prompts[self.seqs.index(seq) // self.req.n]
        if isinstance(prompt, str) and not seq.truncated:
            return prompt
        return self.engine.model.decode(seq.ids)

    def usage(self) -> dict:
        prompt = sum(len(s.ids) for i, s in enumerate(self.seqs) if i % self.req.n == 0)
        completion = sum(self.counts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _apply(self, event) -> tuple[int, str, dict | None]:
        """Fold one event into the job; returns (choice, new text, logprobs of this event or None)."""
        kind, i, payload = event
        if kind == "error":
            self.errors.append(payload)
            self.finish[i] = "error"
            self.done += 1
            return i, "", None
        lps = self.logprobs[i]
        before = len(lps.tokens) if lps is not None else 0
        if kind == "prompt":
            for lp in payload:
                lps.add(lp)
            return i, "", self._slice(lps, before)
        emit = payload
        if emit.token >= 0:
            self.counts[i] += 1
            if lps is not None and emit.logprob is not None:
                lps.add(emit.logprob)
        if emit.text:
            self.texts[i].append(emit.text)
        if emit.finish is not None:
            self.finish[i] = _FINISH.get(emit.finish, emit.finish)
            self.done += 1
        return i, emit.text, self._slice(lps, before) if lps is not None else None

    @staticmethod
    def _slice(lps, start: int) -> dict:
        body = lps.body()
        return {k: v[start:] for k, v in body.items()}

    def _outcome(self) -> str:
        if self.errors:
            return "error"
        return "cancelled" if "cancelled" in self.finish else "ok"

    async def collect(self, receive) -> Response:
        handle = self.handle
        watcher = asyncio.ensure_future(_watch_disconnect(receive, handle.cancel))
        try:
            while self.done < len(self.seqs):
                self._apply(await handle.events.get())
        finally:
            watcher.cancel()
            if self.done < len(self.seqs):
                handle.cancel()
        self.engine.metrics.request(self._outcome())
        if self.errors:
            return _json_error(500, self.errors[0], code="generation_failed")
        choices = []
        for i in range(len(self.seqs)):
            choices.append(
                {
                    "text": self.echoes[i] + "".join(self.texts[i]),
                    "index": i,
                    "logprobs": self.logprobs[i].body() if self.logprobs[i] is not None else None,
                    "finish_reason": self.finish[i],
                }
            )
        return JSONResponse(
            {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.engine.model_id,
                "choices": choices,
                "usage": self.usage(),
            }
        )

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.engine.model_id,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def stream(self):
        handle = self.handle
        try:
            if self.req.echo:
                for i, text in enumerate(self.echoes):
                    if self.logprobs[i] is None:  # with logprobs the prompt's scores come with the echo
                        yield self._chunk([{"text": text, "index": i, "logprobs": None, "finish_reason": None}])
            while self.done < len(self.seqs):
                event = await handle.events.get()
                i, text, lps = self._apply(event)
                if event[0] == "error":
                    yield f"data: {json.dumps(error_body(500, event[2], code='generation_failed'))}\n\n"
                    continue
                if event[0] == "prompt":
                    text = self.echoes[i]
                if text or lps is not None or self.finish[i] is not None:
                    choice = {"text": text, "index": i, "logprobs": lps, "finish_reason": self.finish[i]}
                    yield self._chunk([choice])
            if self.req.include_usage:
                yield self._chunk([], self.usage())
            yield "data: [DONE]\n\n"
        finally:
            self.engine.metrics.request(self._outcome() if self.done == len(self.seqs) else "cancelled")
