"""The ASGI app: the OpenAI-compatible API, FlexSelect's own endpoints for the page, and the page itself.

POST /v1/chat/completions               a question about a video (plain JSON or `stream: true` SSE)
GET  /v1/models                         the one loaded model
GET  /v1/flexselect/media               videos in the media folders
GET  /v1/flexselect/media/{name}        one of them (or an upload), for the page's player (Range requests)
POST /v1/flexselect/uploads             raw video bytes -> {"url": "upload:ID"}
GET  /v1/flexselect/runs/{id}/heatmap.png   contact sheet of a recent run's kept tokens (flexselect.show)
GET  /v1/flexselect/status              the run queue
GET  /                                  the page (static/index.html)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..errors import FlexSelectError
from ..pipeline import FlexSelect
from ..video import probe
from . import openai_api as api
from .openai_api import ApiError
from .runs import Job, QueueFull, Run, RunQueue
from .security import Media, Refused, is_loopback, key_matches

log = logging.getLogger("flexselect")
STATIC = files("flexselect.serve") / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
KEY_COOKIE = "flexselect_key"
DISCONNECT_CHECK_S = 0.25  # how often a waiting request asks whether its client is still there
PROGRESS_INTERVAL_S = 0.1  # progress events are thinned to this rate; stage changes and the last one always go


@dataclass
class Settings:
    model_id: str
    media_dirs: list[str]
    host: str = "127.0.0.1"
    api_key: str | None = None
    max_waiting: int = 4
    max_upload_mb: int = 2048
    heartbeat_s: float = 2.0


def create_app(pipe: FlexSelect, settings: Settings) -> FastAPI:
    media = Media(settings.media_dirs, settings.max_upload_mb * 2**20)
    runs = RunQueue(pipe, settings.max_waiting)
    recent: OrderedDict[str, tuple] = OrderedDict()  # run id -> (video, sampling, visual, selection), for heatmaps

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(KEY_COOKIE)
        if request.url.path == "/" and "api_key" in request.query_params:
            given = request.query_params["api_key"]  # the page's login link; answered with a cookie below
        if not key_matches(given, settings.api_key):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'" if not given else "wrong API key",
                "invalid_api_key",
            )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        runs.close()  # cancels the running question and stops the worker
        media.close()  # uploads go with the server

    app = FastAPI(
        title="flexselect serve",
        dependencies=[Depends(check_key)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    if is_loopback(settings.host):
        # a page on another site can reach 127.0.0.1 through DNS rebinding; its requests carry a foreign Host
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1"])
    app.state.runs, app.state.media = runs, media

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Refused)
    async def _refused(request: Request, e: Refused) -> JSONResponse:
        return await _api_error(request, ApiError.from_refused(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return await _api_error(
            request, ApiError(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else None)
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("request %s failed", request.url.path)
        return await _api_error(
            request, ApiError(500, "internal server error (see the server's log)", "internal_error")
        )

    # -- the page --------------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index(request: Request) -> Response:
        if settings.api_key is not None and "api_key" in request.query_params:
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(KEY_COOKIE, settings.api_key, httponly=True, samesite="strict")
            return response
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise ApiError(404, f"no static file {name!r}", "not_found")
        return Response(
            (STATIC / name).read_bytes(), media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"}
        )

    # -- OpenAI-compatible -----------------------------------------------------------------------------------------
    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": settings.model_id, "object": "model", "created": 0, "owned_by": "flexselect"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request, media.max_upload_bytes * 4 // 3 + 2**20)
        model = body.get("model")
        if model not in (None, settings.model_id, "flexselect"):
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {settings.model_id!r} (GET /v1/models)",
                "model_not_found",
                "model",
            )
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", "invalid_value", "stream")
        url, question = api.conversation_video_and_question(body.get("messages"))
        sampling, options, generation = api.parse_options(body)
        if url.startswith("data:"):
            url = media.save_data_url(url, "messages")
        video = media.resolve(url, "messages")
        try:
            await run_in_threadpool(probe, video)  # an unreadable file is refused before it waits for the model
        except FlexSelectError as e:
            raise ApiError(400, str(e).replace(str(video), url), "invalid_video", "messages") from None
        run = Run(Job(video, question, sampling, options, generation), asyncio.get_running_loop(), api.completion_id())
        try:
            runs.submit(run)
        except QueueFull as e:
            raise ApiError(
                429,
                f"the server is busy ({runs.max_waiting} questions already wait); retry in {e.retry_after}s",
                "queue_full",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if stream:
            return StreamingResponse(
                sse(request, run, generation.max_new_tokens, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await wait_for_result(request, run)
        if result is None:
            return Response(status_code=499)  # the client went away; nobody reads this
        return JSONResponse(
            api.completion(run.id, settings.model_id, result, generation.max_new_tokens, report(run, result))
        )

    def report(run: Run, result: dict) -> dict:
        # the heatmap needs the token layout, not the embeddings (hundreds of MiB for a long video on a real model)
        layout = dataclasses.replace(result["visual"], embeds=result["visual"].embeds[:0])
        recent[run.id] = (run.job.video, run.job.sampling, layout, result["selection"])
        while len(recent) > 16:
            recent.popitem(last=False)
        return api.flexselect_report(result, f"/v1/flexselect/runs/{run.id}/heatmap.png")

    async def wait_for_result(request: Request, run: Run) -> dict | None:
        gone = Disconnected(request)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(run.events.get(), timeout=DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    event = None
                if await gone():
                    return None  # the finally below cancels the run
                if event is None:
                    continue
                if event["type"] == "done":
                    return event["result"]
                if event["type"] == "error":
                    raise ApiError(event["status"], event["message"], event["code"])
                if event["type"] == "cancelled":
                    raise ApiError(499, "the run was cancelled", "cancelled")
        finally:
            run.cancel()  # no-op once finished; stops the run if this coroutine was itself cancelled

    async def sse(request: Request, run: Run, max_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        model = settings.model_id

        def data(obj: dict) -> str:
            return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

        last_progress: tuple[str, float] = ("", 0.0)
        gone = Disconnected(request)
        idle_since = time.monotonic()
        try:
            yield data(api.chunk(run.id, model, {"role": "assistant", "content": ""}))
            while True:
                try:
                    event = await asyncio.wait_for(run.events.get(), timeout=DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    event = None
                if await gone():
                    return  # the finally below cancels the run
                if event is None:
                    if time.monotonic() - idle_since > settings.heartbeat_s:
                        idle_since = time.monotonic()
                        yield ": waiting\n\n"  # a comment line: keeps proxies from closing an idle stream
                    continue
                idle_since = time.monotonic()
                kind = event["type"]
                if kind == "progress":
                    now = time.monotonic()
                    if (
                        event["stage"] == last_progress[0]
                        and event["done"] < event["total"]
                        and now - last_progress[1] < PROGRESS_INTERVAL_S
                    ):
                        continue
                    last_progress = (event["stage"], now)
                    progress = {k: event[k] for k in ("stage", "done", "total")}
                    yield data(api.chunk(run.id, model, {}, flexselect={"progress": progress}))
                elif kind == "text":
                    yield data(api.chunk(run.id, model, {"content": event["delta"]}))
                elif kind == "done":
                    result = event["result"]
                    yield data(
                        api.chunk(
                            run.id, model, {}, api.finish_reason(result, max_tokens), flexselect=report(run, result)
                        )
                    )
                    if include_usage:
                        yield data(api.chunk(run.id, model, None, usage=api.usage(result)))
                    break
                elif kind == "error":
                    yield data(ApiError(event["status"], event["message"], event["code"]).body())
                    break
                elif kind == "cancelled":
                    yield data(ApiError(499, "the run was cancelled", "cancelled").body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            run.cancel()  # the client went away mid-stream (or we are done): stop at the next token or frame set

    # -- for the page ----------------------------------------------------------------------------------------------
    @app.get("/v1/flexselect/media")
    def list_media() -> dict:
        return {"object": "list", "data": media.list_videos()}

    @app.get("/v1/flexselect/media/{name:path}")
    def get_media(name: str) -> FileResponse:
        return FileResponse(media.resolve(name, "name"))

    @app.post("/v1/flexselect/uploads")
    async def upload(request: Request) -> dict:
        declared = request.headers.get("content-length")
        url = await media.save_upload(
            request.stream(),
            request.query_params.get("filename", ""),
            int(declared) if declared and declared.isdigit() else None,
        )
        return {"object": "upload", "url": url}

    @app.get("/v1/flexselect/runs/{run_id}/heatmap.png")
    async def heatmap(run_id: str) -> Response:
        if run_id not in recent:
            raise ApiError(404, f"no recent run {run_id!r} (the last 16 are kept)", "not_found")
        png = await run_in_threadpool(render_sheet, *recent[run_id])
        return Response(png, media_type="image/png")

    @app.get("/v1/flexselect/status")
    def status() -> dict:
        return {"object": "status", "model": settings.model_id, **runs.status()}

    return app


class Disconnected:
    """`await gone()`: has the client hung up? Asks the server at most every DISCONNECT_CHECK_S, so a run that
    streams events without pause is still noticed (each check is a receive() that returns at once)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.checked = 0.0

    async def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.checked < DISCONNECT_CHECK_S:
            return False
        self.checked = now
        return await self.request.is_disconnected()


async def read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit // 2**20} MiB", "request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"the request body is larger than {limit // 2**20} MiB", "request_too_large")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    return body


def render_sheet(video: Path, sampling, visual, selection) -> bytes:
    """The contact sheet of `flexselect show` for a finished run: its frames decoded again, small."""
    import io

    from PIL import Image

    from ..show import selection_sheet
    from ..video import load_clip

    frames = visual.num_frames * visual.frames_per_unit
    clip = load_clip(video, num_frames=frames, start=sampling.start, end=sampling.end, max_side=224)
    sheet = selection_sheet(clip.frames, visual, selection, max_frames=12, timestamps=clip.timestamps, max_width=1200)
    out = io.BytesIO()
    Image.fromarray(sheet).save(out, format="PNG")
    return out.getvalue()
