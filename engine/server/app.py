"""The FastAPI app over AsyncLLM: /v1/completions, /v1/chat/completions (JSON or SSE), /v1/models, /health, /metrics.

Bodies are parsed here (strict pydantic, engine/server/protocol.py) so that every failure is an OpenAI error body:
malformed JSON, unknown fields and wrong types are 400, a missing or wrong API key 401, an unknown model 404, a
full waiting queue or a closing engine 503 (with Retry-After), anything unexpected 500 — never a traceback page.
`run_server` serves it with uvicorn; on SIGINT / SIGTERM the engine ends every in-flight stream with an error
chunk before uvicorn waits for the connections, so nothing hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.async_llm import AsyncLLM
from engine.server.metrics import Metrics
from engine.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from engine.server.serving import Serving

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20


def build_app(llm: AsyncLLM, model_name: str, api_key: str | None = None) -> FastAPI:
    metrics = Metrics(llm)
    serving = Serving(llm, model_name, metrics)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        llm.start()
        try:
            yield
        finally:
            llm.shutdown()

    app = FastAPI(title="anvil", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llm, app.state.metrics = llm, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error").response()

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), api_key.encode())):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")

    async def parse(request: Request, model):
        check_auth(request)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        try:
            body = model.model_validate_json(raw or b"null")
        except ValidationError as e:
            raise validation_error(e) from None
        if body.model not in (None, "", model_name):
            raise APIError(404, f"the model {body.model!r} does not exist (this server has {model_name!r})", "model",
                           "model_not_found")  # fmt: skip
        session = request.headers.get("x-session-id") or body.user
        return body, session

    async def respond(request: Request, job):
        streams = serving.submit(job)
        if job.stream:
            return StreamingResponse(serving.sse(job, streams), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        task = asyncio.ensure_future(serving.full(job, streams))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not task.done():  # the client left: abort its requests (their blocks are freed before the next step)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, APIError):
                await task
            return Response(status_code=499)
        return JSONResponse(task.result())

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, session = await parse(request, CompletionRequest)
        return await respond(request, serving.completion_job(body, session))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, session = await parse(request, ChatCompletionRequest)
        return await respond(request, serving.chat_job(body, session))

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "anvil",
                "max_model_len": llm.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        if llm.closed:
            return APIError(503, llm.dead or "shutting down", code="unavailable").response()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has been read already)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               graceful_timeout_s: float = 10.0) -> None:  # fmt: skip
    """Serve until SIGINT / SIGTERM; in-flight streams end with an error chunk, then uvicorn drains connections."""
    import uvicorn

    llm: AsyncLLM = app.state.llm

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            llm.shutdown("the server is shutting down")
            await super().shutdown(sockets)

    loop, http = server_io()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s,
                            access_log=False, loop=loop, http=http)  # fmt: skip
    _Server(config).run()


def server_io() -> tuple[str, str]:
    """(event loop, HTTP implementation) for uvicorn: uvloop and httptools (C) where installed — the `serve` extra
    installs them; on the 2-core CPU they cut the event loop's CPU per streamed token by ~20% — else asyncio / h11.
    Env ANVIL_SERVE_IO=LOOP/HTTP (e.g. asyncio/h11) picks them instead (A/B runs)."""
    import importlib.util

    if os.environ.get("ANVIL_SERVE_IO"):
        loop, _, http = os.environ["ANVIL_SERVE_IO"].partition("/")
        return loop, http or "auto"

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return loop, "httptools" if importlib.util.find_spec("httptools") else "h11"
