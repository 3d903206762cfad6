"""The HTTP API: OpenAI-compatible `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`.

A chat request is read (size-limited), checked (`schemas`), its images loaded (`media`), turned into
a conversation (`prompt`) and tokenized here, so that every problem with the request is a 4xx before
anything is streamed; then it waits for the batch scheduler (`scheduler`), which owns the model.
Every error is an OpenAI-style JSON body (`errors`).
"""
import asyncio
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import ChatResult, PromptTooLongError
from .errors import APIError
from .media import MediaLoader
from .prompt import build_conversation
from .responses import SSE_DONE, Completion
from .scheduler import BatchScheduler, Job
from .schemas import parse_chat_request
from .settings import ServerSettings

logger = logging.getLogger(__name__)


def create_app(engine, settings: ServerSettings) -> FastAPI:
    """The app for `engine` (a ChatEngine, or anything with its prepare_one / chat_batch)."""
    scheduler = BatchScheduler(engine, settings.max_batch_size)
    media = MediaLoader(settings.allowed_local_media_path, settings.allow_remote_media, settings.max_image_pixels,
                        settings.max_request_bytes)
    tokenizer_lock = threading.Lock()  # the processor is not meant for concurrent use
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="DeepSeek-VL2", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return APIError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        logger.exception("unexpected error")
        return APIError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error").response()

    def prepare(conversation, images):
        try:
            with tokenizer_lock:
                return engine.prepare_one(conversation, images)
        except PromptTooLongError as error:
            raise APIError(400, str(error), param="messages", code="context_length_exceeded") from error
        except ValueError as error:
            raise APIError(400, str(error), param="messages", code="invalid_conversation") from error

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_chat_request(await read_json(request, settings.max_request_bytes), settings.max_images)
        if chat.model is not None and chat.model != settings.model_id:
            raise APIError(404, f"the model {chat.model!r} does not exist; this server serves {settings.model_id!r}",
                           param="model", code="model_not_found")
        images = []
        for ref in chat.images:
            images.append(await run_in_threadpool(media.decode, await media.read(ref.url, ref.param), ref.param))
        conversation = build_conversation(chat.messages, images)
        sample = await run_in_threadpool(prepare, conversation, images)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.request_timeout_s
        job = Job(sample, chat.params, loop)
        scheduler.submit(job)
        completion = Completion(settings.model_id, images)
        if chat.stream:
            return StreamingResponse(stream_answer(job, completion, chat.include_usage, deadline),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while True:
                kind, value = await next_event(job, deadline)
                if kind == "done":
                    return JSONResponse(completion.body(value))
        finally:
            job.cancel()  # frees the row if this handler was cancelled or timed out

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": settings.model_id, "object": "model", "created": started, "owned_by": "deepseek"}]}

    @app.get("/health")
    async def health():
        status = "ok" if scheduler.alive else "scheduler stopped"
        body = {"status": status, "model": settings.model_id,
                "scheduler": {**asdict(scheduler.stats), "waiting": scheduler.waiting}}
        return JSONResponse(body, status_code=200 if scheduler.alive else 503)

    return app


async def read_json(request: Request, limit: int):
    """The JSON body, refused with 413 past `limit` bytes (declared or received)."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                         code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from error


async def next_event(job: Job, deadline: float):
    """The job's next ("text", piece) or ("done", result); its error as an APIError."""
    try:
        kind, value = await asyncio.wait_for(job.events.get(), deadline - asyncio.get_running_loop().time())
    except TimeoutError:
        raise APIError(504, "the answer took longer than the server's request timeout", code="timeout") from None
    if kind == "error":
        raise APIError(500, f"generation failed: {type(value).__name__}: {value}", code="generation_failed")
    return kind, value


async def stream_answer(job: Job, completion: Completion, include_usage: bool, deadline: float):
    """Server-sent events: a role chunk, text chunks, a final chunk (finish_reason, grounding), the
    usage chunk if asked for, then [DONE]. A client that goes away cancels this generator, and with
    it the job's row."""
    try:
        yield completion.chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await next_event(job, deadline)
            if kind == "text":
                yield completion.chunk({"content": value})
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
