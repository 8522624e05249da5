"""The FastAPI app: ``POST /v1/predict``, ``GET /v1/model``, ``/health``, ``/metrics`` and the
web page at ``/``. The model is loaded once, when the app is made; requests share it through
the Batcher. Every refusal is a 4xx with one JSON line ``{"error": ...}``; an unexpected failure
is a 500 with one line too (the traceback goes to the server's log, never to the client)."""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import detfit
from detfit.errors import DetfitError
from detfit.models.registry import iou_types
from detfit.predict.overlay import PALETTE, instance_colour
from detfit.predict.predictor import Prediction, Predictor
from detfit.serve.batching import Batcher
from detfit.serve.metrics import Metrics
from detfit.serve.results import document, overlay_png, subset
from detfit.serve.settings import ServeSettings
from detfit.serve.uploads import UploadError, check_header, decode, read_upload

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("detfit.serve")
# The page loads nothing from elsewhere (it works offline): the browser is told to refuse it too.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def load_predictor(settings: ServeSettings) -> Predictor:
    """The model, once: every detection kept (threshold 0), each request cuts its own."""
    threads = settings.intra_op_threads()
    torch.set_num_threads(threads)
    slicing = None
    if settings.slice_size is not None:  # Slicing checks the size and overlap (one line each)
        from detfit.predict.slicing import Slicing

        slicing = Slicing(settings.slice_size, settings.slice_overlap, settings.slice_full)
    return Predictor(
        settings.model, settings.device, score_threshold=0.0, threads=threads, slicing=slicing
    )


def model_card(predictor: Predictor, settings: ServeSettings) -> dict[str, Any]:
    """What a client needs to know about the model and the server's limits."""
    backend = predictor.backend
    options = backend.info.get("options") or {}
    transform = getattr(getattr(backend.runner, "model", None), "transform", None)
    try:
        tasks = iou_types(predictor.name)
    except DetfitError:  # a model name this detfit no longer registers
        tasks = ["bbox"]
    return {
        "name": predictor.name,
        "kind": predictor.kind,
        "backend": "onnxruntime" if predictor.kind == "onnx" else "torch",
        "device": str(backend.device),
        "file": backend.path.name,
        "outputs": tasks,
        "classes": predictor.classes[1:],
        "category_ids": predictor.category_ids[1:],
        # one per object, in score order, as detfit's overlays colour them
        "colours": ["#{:02x}{:02x}{:02x}".format(*instance_colour(k)) for k in range(len(PALETTE))],
        "slicing": None
        if predictor.slicing is None
        else {
            "size": predictor.slicing.size,
            "overlap": predictor.slicing.overlap,
            "full": predictor.slicing.full,
        },
        "input_size": {
            "min_size": options.get("min_size", getattr(transform, "min_size", [None])[0]),
            "max_size": options.get("max_size", getattr(transform, "max_size", None)),
        },
        "detfit_version": detfit.__version__,
        "limits": {
            "max_batch": settings.max_batch,
            "max_wait_ms": settings.max_wait_ms,
            "max_bytes": settings.max_bytes,
            "max_pixels": settings.max_pixels,
        },
        "score_threshold": settings.score_threshold,
        "api_key": settings.api_key is not None,
    }


def create_app(settings: ServeSettings, predictor: Predictor | None = None) -> FastAPI:
    """The app for ``settings`` (``predictor``: one already loaded, else ``settings.model``)."""
    predictor = predictor or load_predictor(settings)
    metrics = Metrics()

    def run_model(images: list[torch.Tensor]) -> list[Prediction]:
        started = time.perf_counter()
        results = predictor.predict(images)
        metrics.model_seconds.observe(time.perf_counter() - started)
        return results

    batcher: Batcher[Prediction] = Batcher(
        run_model, settings.max_batch, settings.max_wait_ms / 1000, metrics.batch_size.observe
    )
    card = model_card(predictor, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()  # uvicorn has drained the requests in flight by now

    # no /docs: Swagger's page comes from a CDN, and the server works offline (openapi.json stays)
    app = FastAPI(
        title="detfit",
        version=detfit.__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings, app.state.predictor, app.state.metrics = settings, predictor, metrics
    if settings.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization", "X-Filename"],
        )

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            response = await call_next(request)
        except Exception as exc:  # a bug, not the client's fault: one line back, traceback logged
            log.exception("%s %s failed", request.method, request.url.path)
            response = error(500, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            metrics.in_flight.dec()
        route = getattr(request.scope.get("route"), "path", "other")
        metrics.observe(route, response.status_code, time.perf_counter() - started)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code in (404, 405):  # say which route the client asked for
            return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return error(exc.status_code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = " ".join(str(p) for p in first.get("loc", ()))
        return error(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(UploadError)
    async def refused(request: Request, exc: UploadError):
        return error(exc.status, str(exc))

    @app.exception_handler(DetfitError)
    async def bad_input(request: Request, exc: DetfitError):
        return error(400, str(exc))

    def authorised(request: Request) -> None:
        """The API key, when one is set, from X-API-Key or Authorization: Bearer."""
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        # constant time: how long the comparison takes says nothing about the key
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise StarletteHTTPException(401, "missing or wrong API key (header X-API-Key)")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model", dependencies=[Depends(authorised)])
    async def model() -> dict[str, Any]:
        return card

    @app.get("/metrics", dependencies=[Depends(authorised)])
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/predict", dependencies=[Depends(authorised)])
    async def predict(
        request: Request,
        score_threshold: float | None = Query(None, ge=0, le=1),
        classes: list[str] = Query([]),
        format: Literal["json", "png"] = "json",
    ) -> Response:
        """An image (multipart field ``image`` or the raw body) -> ``detfit predict``'s JSON
        for it, or its overlay PNG (``format=png``)."""
        names = [c.strip() for value in classes for c in value.split(",") if c.strip()]
        try:
            labels = predictor._labels(names) if names else None
        except DetfitError as exc:  # "--classes x: not a class of this model (...)"
            raise UploadError(400, str(exc).removeprefix("--")) from None
        upload = await read_upload(request, settings.max_bytes)
        fmt = check_header(upload.data, settings.max_pixels)
        image = await run_in_threadpool(decode, upload.data, fmt)
        found = await batcher.submit(image)
        threshold = settings.score_threshold if score_threshold is None else score_threshold
        kept = subset(found, threshold, labels)
        if format == "png":
            return Response(
                await run_in_threadpool(overlay_png, image, kept), media_type="image/png"
            )
        return JSONResponse(await run_in_threadpool(document, upload.name, kept))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def app_from_environment() -> FastAPI:
    """The factory ``--workers N`` processes call: settings come in one environment variable."""
    import os

    from detfit.serve.settings import SETTINGS_ENV

    return create_app(ServeSettings.model_validate_json(os.environ[SETTINGS_ENV]))
