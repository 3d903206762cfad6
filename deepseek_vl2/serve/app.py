"""The HTTP API: OpenAI-compatible `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`.

A chat request is read (JSON only, size-limited), checked (`schemas`), its images loaded (`media`),
turned into a conversation (`prompt`) and tokenized here, so that every problem with the request is
a 4xx before anything is streamed; then it waits for the batch scheduler (`scheduler`), which owns
the model. Every error is an OpenAI-style JSON body (`errors`), without internals.

Against hostile clients: with an API key every /v1 route needs `Authorization: Bearer KEY`
(`/health` stays open); a body that is not `application/json` is refused with 415 (a web page
cannot send one to a local server without a CORS preflight); past `max_concurrent_requests` chat
requests in flight a request gets 429 with Retry-After; a body must arrive within BODY_DEADLINE_S
(408), and hold no more JSON values than its text could need (it is parsed on the event loop); its
images must arrive within its request timeout (504); a request whose client goes away is cancelled
(streamed or not); at most PREPARING_AT_ONCE requests have their images decoded and tiled at once,
and a queued request keeps only its processed sample, not its images.
An unrecoverable device error (a CUDA error) turns `/health` to 503 with the reason, refuses new
chat requests with 503 and calls `on_fatal`, with which the command line ends the process.
"""
import asyncio
import hmac
import json
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from typing import Callable, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine import ChatResult, PromptTooLongError
from .engine_process import EngineProcess
from .errors import APIError
from .media import MediaLoader
from .prompt import ControlTokens, build_conversation
from .responses import SSE_DONE, Completion
from .scheduler import Job, create_scheduler
from .schemas import parse_chat_request
from .settings import ServerSettings

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there
RETRY_AFTER_S = 1  # the Retry-After of a 429
BODY_DEADLINE_S = 60.0  # a request's body must arrive within this from its arrival (and within its request timeout)
# JSON values a body may hold beyond one per character of text allowed, counted as commas and brackets (those
# typed in text count too): parsing holds the event loop, 70-150 ns a value, and 32 MiB hold 11 million of them
MAX_JSON_VALUES_BEYOND_TEXT = 65_536
# requests whose images are decoded and tiled at once: each may hold a few hundred MB of pixels meanwhile
PREPARING_AT_ONCE = os.cpu_count() or 2


def create_app(engine, settings: ServerSettings, on_fatal: Optional[Callable[[str], None]] = None) -> FastAPI:
    """The app for `engine` (a ChatEngine, or anything with its tokenizer, model, prepare_one and
    chat_batch; or an EngineProcess, which is then the scheduler). `on_fatal(reason)` is called once,
    from the scheduler thread, after an unrecoverable device error (or from the event loop when an
    engine process has ended)."""
    state = ServerState()
    guarded = DeviceGuard(engine, state, on_fatal)
    limit = context_length(engine)
    if isinstance(engine, EngineProcess):  # the continuous engine, in its own process already
        if settings.scheduler == "static":
            raise ValueError("an engine process serves with the continuous engine, not static batching")
        scheduler = engine
        scheduler.on_error = guarded.check
        scheduler.on_ended = lambda reason: state.fail(reason, on_fatal)
    else:
        scheduler = create_scheduler(engine, settings.max_batch_size, context_length=limit,
                                     scheduler=settings.scheduler, max_num_seqs=settings.max_num_seqs,
                                     prefill=settings.prefill, batch_engine=guarded, on_error=guarded.check)
    media = MediaLoader(settings.allowed_local_media_path, settings.allow_remote_media, settings.max_image_pixels,
                        settings.max_request_bytes)
    control_tokens = ControlTokens(engine.tokenizer)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="DeepSeek-VL2", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.server = state
    app.state.media = media
    if settings.api_key is not None:
        app.add_middleware(BearerKey, key=settings.api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return APIError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        logger.exception("unexpected error")  # the details go to the log, not to the client
        return APIError(500, "internal server error", code="internal_error").response()

    def prepare(conversation, images, params, max_tokens_param):
        """The processed sample, and `params` with max_tokens fitted to the context."""
        try:
            sample = engine.prepare_one(conversation, images)  # thread-safe: requests are tiled in parallel
        except PromptTooLongError as error:
            raise APIError(400, str(error), param="messages", code="context_length_exceeded") from error
        except ValueError as error:
            raise APIError(400, str(error), param="messages", code="invalid_conversation") from error
        room = limit - len(sample)
        if params.max_new_tokens > room:
            if max_tokens_param is not None:
                raise APIError(400, f"'{max_tokens_param}' is {params.max_new_tokens}, but the prompt is "
                                    f"{len(sample)} tokens and the model's context is {limit} tokens: at most {room} "
                                    "tokens can follow this prompt", param=max_tokens_param,
                               code="context_length_exceeded")
            params = replace(params, max_new_tokens=room)  # the default max_tokens: what the prompt leaves
        return sample, params

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if state.fatal_reason is not None:
            raise APIError(503, f"the server is unhealthy and restarting: {state.fatal_reason}",
                           code="server_unhealthy")
        arrival = asyncio.get_running_loop().time()
        slot = state.acquire(settings.max_concurrent_requests)
        try:
            response = await answer(request, slot, arrival)
        except BaseException:
            slot.release()
            raise
        if not isinstance(response, GuardedStream):
            slot.release()
        return response

    async def answer(request: Request, slot: "Slot", arrival: float):
        deadline = arrival + settings.request_timeout_s
        body = await read_json(request, settings.max_request_bytes,
                               settings.max_text_chars + MAX_JSON_VALUES_BEYOND_TEXT,
                               min(deadline, arrival + BODY_DEADLINE_S))
        chat = parse_chat_request(body, settings.max_images, settings.max_text_chars)
        del body
        if chat.model is not None and chat.model != settings.model_id:
            raise APIError(404, f"the model {chat.model!r} does not exist; this server serves {settings.model_id!r}",
                           param="model", code="model_not_found")
        try:  # fetched before a place among the preparations is taken: a slow image host holds up no one else
            async with asyncio.timeout_at(deadline):
                files = [await media.read(ref.url, ref.param) for ref in chat.images]
        except TimeoutError:
            raise APIError(504, "the request's images did not arrive within the server's request timeout",
                           code="timeout") from None
        async with state.preparing:
            images = [await run_in_threadpool(media.decode, data, ref.param) for data, ref in zip(files, chat.images)]
            del files
            conversation = build_conversation(chat.messages, images, control_tokens)
            sample, params = await run_in_threadpool(prepare, conversation, images, chat.params,
                                                     chat.max_tokens_param)
        completion = Completion(settings.model_id, [image.size for image in images])
        stream, include_usage = chat.stream, chat.include_usage
        del images, conversation, chat  # a queued request keeps its processed sample only
        loop = asyncio.get_running_loop()
        job = Job(sample, params, loop, streams=stream)
        job.expire_at(deadline)
        try:  # off the event loop: the engine makes the request's host tensors (batch, cast, pinned copy) here,
            # milliseconds during which the loop would send no other request's tokens
            await run_in_threadpool(scheduler.submit, job)
        except BaseException:
            job.cancel()  # a handler cancelled meanwhile leaves no request running
            raise
        if stream:
            def close():
                job.cancel()
                slot.release()

            return GuardedStream(stream_answer(job, completion, include_usage), on_close=close,
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            result = await wait_for_result(job, request)
            if result is None:  # the client has gone: nobody reads this
                return JSONResponse({}, status_code=499)
            return JSONResponse(completion.body(result))
        finally:
            job.cancel()  # frees the row if the client left, this handler was cancelled or timed out

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": settings.model_id, "object": "model", "created": started, "owned_by": "deepseek"}]}

    @app.get("/health")
    async def health():
        healthy = scheduler.alive and state.fatal_reason is None
        body = {"status": "ok" if healthy else "unhealthy", "model": settings.model_id,
                "scheduler": {**asdict(scheduler.stats), "waiting": scheduler.waiting},
                "in_flight": state.in_flight}
        if not healthy:
            body["reason"] = state.fatal_reason or stopped_reason(scheduler)
        return JSONResponse(body, status_code=200 if healthy else 503)

    return app


def stopped_reason(scheduler) -> str:
    """/health's reason for a scheduler that is not alive when no request has failed the server."""
    if isinstance(scheduler, EngineProcess):
        return scheduler.ended_reason
    return "the scheduler has stopped"


def context_length(engine) -> int:
    """The model's context in tokens (prompt and answer together)."""
    if isinstance(engine, EngineProcess):
        return engine.context_length
    return engine.model.config.language_config.max_position_embeddings


class ServerState:
    """Requests in flight, those being prepared, and the reason the server became unhealthy (None
    while healthy)."""

    def __init__(self):
        self.in_flight = 0
        self.preparing = asyncio.Semaphore(PREPARING_AT_ONCE)
        self.fatal_reason: Optional[str] = None

    def fail(self, reason: str, on_fatal: Optional[Callable[[str], None]]) -> None:
        """The server cannot answer any more (a device error, its engine's process ended): /health
        says why from now on, and `on_fatal(reason)` is called, once."""
        if self.fatal_reason is None:
            self.fatal_reason = reason
            if on_fatal is not None:
                on_fatal(reason)

    def acquire(self, limit: int) -> "Slot":
        """A place for one request (the event loop is single-threaded: no lock needed), or a 429."""
        if self.in_flight >= limit:
            raise APIError(429, f"the server is busy: {limit} requests are in flight already; retry shortly",
                           code="too_many_requests", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += 1
        return Slot(self)


class Slot:
    def __init__(self, state: ServerState):
        self.state = state
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state.in_flight -= 1


class GuardedStream(StreamingResponse):
    """A streaming response that calls `on_close` once it ends, however it ends (also when the client
    left before the first chunk, when the body generator never ran)."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def is_fatal_device_error(error: BaseException) -> bool:
    """An error after which the device cannot be trusted (a CUDA error, such as a device-side assert)."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(error, accelerator_error)) or "CUDA error" in str(error)


class DeviceGuard:
    """The engine as the scheduler sees it: a batch that fails with an unrecoverable device error
    marks the server unhealthy and calls `on_fatal` once; later batches fail at once."""

    def __init__(self, engine, state: ServerState, on_fatal: Optional[Callable[[str], None]]):
        self.engine = engine
        self.state = state
        self.on_fatal = on_fatal

    def chat_batch(self, rows):
        if self.state.fatal_reason is not None:
            raise RuntimeError(f"the device failed earlier: {self.state.fatal_reason}")
        try:
            return self.engine.chat_batch(rows)
        except Exception as error:
            self.check(error)
            raise

    def check(self, error: BaseException) -> None:
        """Called with each failure (of a batch, or of a continuous engine's request): the first
        unrecoverable device error marks the server unhealthy and calls `on_fatal`."""
        if is_fatal_device_error(error) and self.state.fatal_reason is None:
            reason = f"unrecoverable device error: {type(error).__name__}: {error}"
            logger.critical("%s; the server must be restarted", reason)
            self.state.fail(reason, self.on_fatal)

    def __getattr__(self, name):
        return getattr(self.engine, name)


class BearerKey:
    """ASGI middleware: every /v1 route needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                error = APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


async def read_json(request: Request, limit: int, max_values: int, arrive_by: float):
    """The JSON body (Content-Type application/json), refused with 413 past `limit` bytes (declared or
    received), with 408 unless it has arrived by loop time `arrive_by`, and with 400 if it holds more
    than about `max_values` values (counted as commas and brackets); NaN, Infinity and numbers beyond
    a float's range are not JSON and are refused."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"the request body must be JSON sent as Content-Type: application/json, not "
                            f"{media_type or 'no content type'}", code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                         code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout_at(arrive_by):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive in time: a body must arrive within {BODY_DEADLINE_S:g} s "
                            "of its request, and within the server's request timeout", code="request_timeout") from None
    except ClientDisconnect:  # nobody reads the answer; no traceback in the log either
        raise APIError(499, "the client left before its request body arrived", code="client_disconnected") from None
    values = body.count(b",") + body.count(b"{") + body.count(b"[")
    if values > max_values:
        raise APIError(400, f"the request body holds about {values} JSON values (counted as commas and brackets, "
                            f"those in text too); this server takes at most {max_values}", code="too_many_json_values")
    try:
        return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, and the refusals above
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None


async def next_event(job: Job):
    """The job's next ("text", piece) or ("done", result); its error or expiry as an APIError."""
    kind, value = await job.events.get()
    if kind == "error":
        raise APIError(500, f"generation failed: {type(value).__name__}: {value}", code="generation_failed")
    if kind == "expired":
        raise APIError(504, "the answer took longer than the server's request timeout", code="timeout")
    return kind, value


async def wait_for_result(job: Job, request: Request) -> Optional[ChatResult]:
    """The job's result, or None once its client has disconnected (checked every DISCONNECT_POLL_S)."""
    while True:
        try:
            kind, value = await asyncio.wait_for(next_event(job), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                return None
            continue
        if kind == "done":
            return value


async def stream_answer(job: Job, completion: Completion, include_usage: bool):
    """Server-sent events: a role chunk, text chunks, a final chunk (finish_reason, grounding), the
    usage chunk if asked for, then [DONE]. A client that goes away cancels this generator, and the
    response's on_close cancels the job's row."""
    try:
        yield completion.chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await next_event(job)
            if kind == "text":
                yield completion.text_chunk(value)
                continue
            result: ChatResult = value
            yield completion.final_chunk(result)
            if include_usage:
                yield completion.usage_chunk(result)
            yield SSE_DONE
            return
    except APIError as error:
        yield f"data: {json.dumps(error.body())}\n\n"
    finally:
        job.cancel()
