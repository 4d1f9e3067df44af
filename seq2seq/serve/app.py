"""The HTTP routes: ``POST /translate`` (ours and LibreTranslate's shape), ``GET /health``, ``/info``,
``/languages`` and the page at ``/``. Every refusal is ``{"error": "one line"}`` with a 4xx status, and
the server stays up; an error of ours is a 500 with its one line, and its traceback in the log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from seq2seq.serve.auth import ApiKeys
from seq2seq.serve.libretranslate import languages_json, parse_libre
from seq2seq.serve.protocol import RequestError, parse_native
from seq2seq.serve.service import TranslationService

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def page_html() -> str:
    """The page: its HTML with its script and style inlined (one request, which an API key can open)."""
    text = (PAGE / "index.html").read_text(encoding="utf-8")
    style = (PAGE / "page.css").read_text(encoding="utf-8")
    script = (PAGE / "page.js").read_text(encoding="utf-8")
    return text.replace("/*STYLE*/", style).replace("/*SCRIPT*/", script)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused past ``max_bytes`` without reading the rest."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(
            413, f"a body of {declared} bytes; this server takes at most {max_bytes} (max_bytes)"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"a body of more than {max_bytes} bytes (max_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def form_values(request: Request, body: bytes) -> dict[str, Any]:
    """Form fields (urlencoded or multipart) of a body already read; a repeated field is a list."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form()
    values: dict[str, Any] = {}
    for key in form:
        items = form.getlist(key)
        if any(isinstance(item, UploadFile) for item in items):
            raise RequestError(400, f"{key} is a file; send text fields")
        values[key] = items if len(items) > 1 else items[0]
    return values


async def request_values(request: Request, max_bytes: int) -> tuple[Any, bool]:
    """(the parsed body, whether it came as form fields). A JSON body sent as a form (``curl -d``
    without a content type) is read as JSON."""
    body = await read_body(request, max_bytes)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in FORM_TYPES and not body.lstrip().startswith(b"{"):
        return await form_values(request, body), True
    if not body.strip():
        raise RequestError(400, 'empty request: send JSON such as {"src": ["a sentence"]}')
    try:
        return json.loads(body), False
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f"malformed JSON: {err}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None


def create_app(service: TranslationService, keys: ApiKeys, cors_origins: list[str]) -> FastAPI:
    """The application around a loaded model; the decoding task runs from startup to shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        # uvicorn has answered the requests in flight (SIGTERM, SIGINT) before it gets here.
        await service.stop()
        batcher = service.batcher
        log.info("stopped after %d lines in %d decoding rounds", batcher.lines, batcher.rounds)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=cors_origins,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type"],
    )
    page = page_html()

    @app.exception_handler(RequestError)
    async def refused(_: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(HTTPException)
    async def not_routed(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        message = " ".join(f"{type(error).__name__}: {error}".split())
        return JSONResponse({"error": f"internal error: {message}"}, status_code=500)

    def authorize(request: Request, body_key: Any = None) -> None:
        """403 unless the request has a listed key (where ``api_keys_file`` is set)."""
        header = request.headers.get("authorization", "")
        candidates = [
            header[7:].strip() if header.lower().startswith("bearer ") else None,
            body_key if isinstance(body_key, str) else None,
            request.query_params.get("api_key"),
        ]
        if not any(keys.allows(key) for key in candidates):
            raise RequestError(
                403, "missing or unknown API key: send it as api_key or in an Authorization: Bearer header"
            )

    @app.get("/health")
    async def health() -> JSONResponse:
        if not service.ready:
            return JSONResponse({"error": "the decoding task is not running"}, status_code=503)
        batcher = service.batcher
        return JSONResponse({"status": "ok", "lines": batcher.lines, "rounds": batcher.rounds})

    @app.get("/info")
    async def info(request: Request) -> dict[str, Any]:
        authorize(request)
        return service.info

    @app.get("/languages")
    async def languages(request: Request) -> list[dict[str, Any]]:
        authorize(request)
        return languages_json(service.languages)

    @app.get("/")
    async def index(request: Request) -> HTMLResponse:
        authorize(request)
        return HTMLResponse(page)

    @app.post("/translate")
    async def translate(request: Request) -> dict[str, Any]:
        try:
            values, from_form = await request_values(request, service.limits.max_bytes)
        except (RequestError, HTTPException):  # HTTPException: starlette's form parser refused the body
            authorize(request)  # a request without a key learns nothing about its body
            raise
        authorize(request, values.get("api_key") if isinstance(values, dict) else None)
        if isinstance(values, dict) and "q" in values and "src" not in values:
            libre = parse_libre(values, service.defaults, service.limits, service.languages)
            translations = await service.translate(libre.job)
            nbest = [[text for text, _, _ in t.hypotheses] for t in translations]
            return libre.answer([t.text for t in translations], nbest, service.languages[0])
        if isinstance(values, dict) and "src" not in values:
            raise RequestError(400, "a request needs src (a list of lines), or q in LibreTranslate's shape")
        if from_form:
            raise RequestError(400, 'src needs a JSON body: {"src": ["a sentence", ...]}')
        job = parse_native(values, service.defaults, service.limits)
        translations = await service.translate(job)
        answer: dict[str, Any] = {"tgt": [t.text for t in translations]}
        if job.with_nbest:
            answer["nbest"] = [t.nbest_json() for t in translations]
        if job.attention:
            answer["attention"] = [t.attention_json() for t in translations]
        return answer

    return app
