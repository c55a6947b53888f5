"""The REST API: a FastAPI app over one :class:`prodclass.serving.predictor.Predictor`, loaded once at start-up.

Endpoints (OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

- ``POST /v1/predict``: multipart ``files`` (1 to ``max_files`` images), optional ``top_k`` and ``title``
  form fields → ``{"model_id", "predictions": [{"filename", "labels", "probs", "abstain"}], ...}``.
- ``GET /v1/model``: classes, backbone, metrics summary, calibration, abstention threshold, versions.
- ``GET /health``: ``{"status": "ok", "model_id"}``.

Every error the app answers has one body, :class:`ErrorBody` ``{"detail": "<what was wrong>"}``
(``application/json``), and each route declares its error statuses in the OpenAPI document:

- 400: more than ``max_files`` files (the multipart parser stops at the first file too many), or a
  malformed ``Content-Length``/multipart body.
- 401: ``api_key`` is set and the request has neither ``X-API-Key: <key>`` nor
  ``Authorization: Bearer <key>`` (compared in constant time, :func:`hmac.compare_digest`), checked
  before any of the body is read. ``/health``, ``/docs``, ``/redoc`` and ``/openapi.json`` stay open.
- 408: the request body did not arrive within ``read_timeout`` seconds of its headers
  (:class:`ReadTimeout`); the connection is then closed.
- 413: request body over ``max_body_bytes`` (:class:`BodyLimit`: a too-large ``Content-Length`` is
  refused before any of the body is read, a chunked body is counted as it arrives); an image over
  ``max_pixels`` pixels; or all images of a request together over ``max_request_pixels`` — both read
  from the image headers before any pixel is decoded (Pillow opens images lazily).
- 415: not JPEG/PNG/WebP: the format is sniffed from the bytes by Pillow (restricted to those three
  decoders); the client's filename and content type are never trusted.
- 422: a truncated or corrupt image of an allowed type, an empty file, ``top_k`` outside ``1..C``,
  a missing ``files`` field.
- 503 (with ``Retry-After``, seconds): ``max_concurrent`` prediction requests are already in the
  server (waiting for or running inference) — :class:`Admission`.
- 500: an unexpected error (a bug): the same body, never a traceback.

Outside the app, :func:`serve` runs uvicorn with a deadline on request headers too
(:func:`read_timeout_protocol`: a client has ``read_timeout`` seconds from connecting, or from the
end of its previous response, to send a complete request head; slow-header connections are closed)
and ``limit_concurrency = max_connections`` (uvicorn answers further requests with its own
plain-text 503 while that many connections are open). CORS is off unless ``cors_origins`` lists the
allowed origins (Starlette's ``CORSMiddleware``, :class:`Cors`).

Uploads are read into memory from the parser's spooled temporary files only once admitted; no
endpoint reads or writes a path named by the client. Inference runs in a worker thread (``workers``
at a time, default 1: the Predictor is CPU-bound and already uses every core through torch's or ONNX
Runtime's intra-op threads), so the event loop stays free.
"""

import hmac
import io
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import FastAPI, File, Form, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from prodclass import __version__
from prodclass.preprocess import MAX_PIXELS
from prodclass.runs import FORMAT_VERSION, RunDir

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_BODY_BYTES = 16 * 1024 * 1024  # a 12-megapixel phone JPEG is 3-8 MB
MAX_FILES = 16
# All images of one request together, width x height summed over the files: a catalog photo is at most
# ~1 MP, a phone photo 12 MP; 16 images of 64 MP each (1 Gpx, 6.4 s of decoding) are refused.
MAX_REQUEST_PIXELS = 64_000_000
MAX_CONCURRENT = 64  # prediction requests admitted at once (queued for or running inference)
READ_TIMEOUT = 30.0  # seconds to send a request's headers, and again to send its whole body
MAX_CONNECTIONS = 512  # open connections before uvicorn answers 503 (its limit_concurrency)
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
_METRIC_KEYS = ("accuracy", "macro_f1", "top5_accuracy", "log_loss", "n", "num_classes", "num_images")


class ErrorBody(BaseModel):
    """The body of every error response of the app (4xx and 5xx)."""

    detail: str  # what was wrong, naming the file or the field


_ERRORS = {
    400: "Too many files, or a malformed body or Content-Length",
    401: "Missing or wrong API key (X-API-Key or Authorization: Bearer)",
    408: "The request body did not arrive in time",
    413: "Body, image or request over its size or pixel limit",
    415: "Not a JPEG, PNG or WebP image (sniffed from the bytes)",
    422: "Invalid field, or an image of an allowed type that cannot be decoded",
    500: "Unexpected server error",
    503: "Too many requests in the server; retry after Retry-After seconds",
}


def error_responses(*codes: int) -> dict:
    """``responses=`` for a route: each status in ``codes`` documented with :class:`ErrorBody`."""
    out = {c: {"model": ErrorBody, "description": _ERRORS[c]} for c in codes}
    if 503 in out:
        out[503]["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
    return out


def error_response(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    """An :class:`ErrorBody` JSON response."""
    return JSONResponse(ErrorBody(detail=detail).model_dump(), status_code=status, headers=headers)


class ImagePrediction(BaseModel):
    filename: str
    labels: list[str]  # top-k class names, most probable first
    probs: list[float]  # their calibrated probabilities
    abstain: bool  # top-1 probability under the threshold: send to human review


class TitleNote(BaseModel):
    used: bool
    note: str


class PredictResponse(BaseModel):
    model_id: str
    threshold: float | None
    predictions: list[ImagePrediction]
    title: TitleNote | None = None


class Health(BaseModel):
    status: str
    model_id: str


def model_id(run_dir: str | Path) -> str:
    """``<run directory name>-<first 8 hex digits of the SHA-1 of the model's weights file>``."""
    from prodclass.io import file_sha1

    run = RunDir(run_dir)
    return f"{run.path.resolve().name}-{file_sha1(run.weights_file)[:8]}"


def model_info(run_dir: str | Path, predictor) -> dict:
    """What ``GET /v1/model`` answers: classes, backbone, test metrics, calibration, threshold, versions.

    Only the scalar entries of the run's metrics, calibration and abstention records are returned
    (``{}`` when a record is absent).
    """
    run = RunDir(run_dir)
    metrics = run.read_metrics() if run.metrics_file.is_file() else {}

    def scalars(d: dict, keys=None) -> dict:
        return {k: v for k, v in d.items() if (keys is None or k in keys) and isinstance(v, (int, float, str, bool))}

    return {
        "model_id": model_id(run_dir),
        "classes": predictor.classes,
        "num_classes": len(predictor.classes),
        "backbone": predictor.meta.get("backbone"),
        "backend": predictor.meta.get("backend"),
        "inputs": ["image"],
        "metrics": scalars(metrics, _METRIC_KEYS),
        "calibration": scalars(run.read_calibration()),
        "abstention": scalars(run.read_abstention()),
        "threshold": predictor.threshold,
        "version": {"prodclass": __version__, "model_format": FORMAT_VERSION},
    }


def check_image(data: bytes, name: str, max_pixels: int) -> tuple[int, int]:
    """Refuse an upload that is not a JPEG/PNG/WebP image of at most ``max_pixels`` pixels.

    Only the header is parsed (Pillow decodes pixels lazily, on ``load()``).

    Returns:
        The image's (width, height), pixels.

    Raises:
        HTTPException: 415 (other or unknown format), 413 (too many pixels), 422 (empty).
    """
    if not data:
        raise HTTPException(422, f"{name}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            w, h = img.size
    except Image.DecompressionBombError as e:  # Pillow's own guard (over ~179 MP) fires inside open()
        raise HTTPException(413, f"{name}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise HTTPException(415, f"{name}: not a JPEG, PNG or WebP image (format sniffed from the bytes)") from None
    if w * h > max_pixels:
        raise HTTPException(413, f"{name}: {w}x{h} is {w * h} pixels, over the limit of {max_pixels}")
    return w, h


def check_uploads(blobs: list[bytes], names: list[str], max_pixels: int, max_request_pixels: int) -> None:
    """:func:`check_image` on every upload, then the request's pixel budget, all from the headers.

    Raises:
        HTTPException: as :func:`check_image` for the first bad upload (named in the message); 413 when
            the width × height of all images together is over ``max_request_pixels``.
    """
    total = sum(w * h for w, h in (check_image(d, n, max_pixels) for d, n in zip(blobs, names, strict=True)))
    if total > max_request_pixels:
        raise HTTPException(413, f"the {len(blobs)} images have {total} pixels together, over the request's "
                                 f"limit of {max_request_pixels}: send fewer or smaller images per request")


def classify_checked(predictor, blobs: list[bytes], names: list[str], top_k: int) -> list[ImagePrediction]:
    """Classify uploads that passed :func:`check_uploads`, in one Predictor call.

    Raises:
        HTTPException: 422 for the first image that fails to decode (named in the message).
    """
    out = []
    for name, p in zip(names, predictor.predict(blobs, top_k=top_k), strict=True):
        if p.error:
            raise HTTPException(422, f"{name}: {p.error.removeprefix('<bytes>: ')}")
        out.append(ImagePrediction(filename=name, labels=p.labels, probs=[round(q, 6) for q in p.probs],
                                   abstain=p.abstain))
    return out


class BodyLimit:
    """ASGI middleware: a JSON 413 for a request body over ``max_bytes`` bytes.

    ``Content-Length`` is checked before the app runs; a body without one (chunked) is counted
    message by message and refused as soon as the count passes the limit. (FastAPI's own
    ``max_body_size`` answers the first case in plain text, so it is not used.)
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and not declared.isdigit():
            return await error_response(400, f"bad Content-Length {declared[:40]!r}")(scope, receive, send)
        if declared is not None and int(declared) > self.max_bytes:
            detail = f"request body of {declared} bytes is over the limit of {self.max_bytes} bytes"
            return await error_response(413, detail, {"Connection": "close"})(scope, receive, send)
        total = 0

        async def counted():
            nonlocal total
            message = await receive()
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                raise HTTPException(413, f"request body is over the limit of {self.max_bytes} bytes",
                                    headers={"Connection": "close"})
            return message

        await self.app(scope, counted, send)


class ReadTimeout:
    """ASGI middleware: the whole request body must arrive within ``seconds`` of the request's start.

    Each ``receive()`` of the app waits at most until that deadline; past it the request is answered
    408 (:class:`ErrorBody`, ``Connection: close``, so uvicorn drops the slow connection). Once the body
    is complete, later ``receive()`` calls (disconnect detection) are not bounded. Slow *headers* never
    reach an ASGI app: :func:`read_timeout_protocol` bounds them in the server.
    """

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline, complete = anyio.current_time() + self.seconds, False

        async def timed():
            nonlocal complete
            if complete:
                return await receive()
            with anyio.move_on_after(deadline - anyio.current_time()) as waited:
                message = await receive()
            if waited.cancelled_caught:
                raise HTTPException(408, f"the request body did not arrive within {self.seconds:g} s",
                                    headers={"Connection": "close"})
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


class ApiKey:
    """ASGI middleware: 401 unless the request carries the key, before any of its body is read.

    The key is accepted in ``X-API-Key: <key>`` or ``Authorization: Bearer <key>`` and compared with
    :func:`hmac.compare_digest` (constant time). :data:`OPEN_PATHS` (health check and API docs) and
    requests other than HTTP (lifespan) pass without one.
    """

    def __init__(self, app, key: str):
        if not key:
            raise ValueError("the API key must not be empty")
        self.app, self.key = app, key.encode()

    def authorized(self, scope) -> bool:
        """True when a header of the request holds the key."""
        found = False
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                found |= hmac.compare_digest(value.strip(), self.key)
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                found |= hmac.compare_digest(value[7:].strip(), self.key)
        return found

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self.authorized(scope):
            return await self.app(scope, receive, send)
        response = error_response(401, "missing or wrong API key: send it as X-API-Key or Authorization: Bearer",
                                  {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class Cors(CORSMiddleware):
    """Starlette's ``CORSMiddleware`` with its refused preflight (400) as :class:`ErrorBody` JSON."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
        return error_response(400, bytes(response.body).decode(), headers)


class Admission:
    """At most ``limit`` prediction requests admitted at once (waiting for or running inference).

    A request over the limit is answered 503 with ``Retry-After``: the mean time recent requests spent
    in the server (exponential moving average, seconds, rounded up, at least 1). Counted only once a
    request's body has been received, so slow uploads (bounded by :class:`ReadTimeout`) never take a
    slot from clients that have sent theirs. Runs on the event loop only (no lock needed).
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"max_concurrent must be at least 1, not {limit}")
        self.limit, self.active, self.mean_s = limit, 0, 1.0

    def retry_after(self) -> int:
        """Seconds a refused client should wait before retrying."""
        return max(1, math.ceil(self.mean_s))

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the block. Raises HTTPException 503 when all are taken."""
        if self.active >= self.limit:
            raise HTTPException(503, f"{self.active} requests are already being answered (limit {self.limit}); "
                                     f"retry in {self.retry_after()} s", headers={"Retry-After": str(self.retry_after())})
        self.active += 1
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.active -= 1
            self.mean_s = 0.8 * self.mean_s + 0.2 * (time.monotonic() - t0)


def create_app(run_dir: str | Path, predictor=None, max_body_bytes: int = MAX_BODY_BYTES,
               max_pixels: int = MAX_PIXELS, max_files: int = MAX_FILES, workers: int = 1,
               backend: str = "torch", max_request_pixels: int = MAX_REQUEST_PIXELS,
               max_concurrent: int = MAX_CONCURRENT, read_timeout: float = READ_TIMEOUT,
               api_key: str | None = None, cors_origins: tuple[str, ...] | list[str] = ()) -> FastAPI:
    """Build the API for one run directory.

    Args:
        run_dir: a run directory written by ``prodclass run``.
        predictor: an already loaded Predictor for it (default: ``Predictor.from_run(run_dir)``).
        max_body_bytes: largest request body, bytes (multipart overhead included).
        max_pixels: largest image, width × height.
        max_files: most images in one request.
        workers: inferences running at the same time (each in a worker thread).
        backend: the Predictor's backend when it is loaded here (``torch``, ``onnx``, ``onnx-int8``
            or ``auto``: see :meth:`prodclass.serving.predictor.Predictor.from_run`).
        max_request_pixels: most pixels (width × height summed over the files) in one request.
        max_concurrent: most prediction requests admitted at once; more → 503 + ``Retry-After``.
        read_timeout: seconds a request's body may take to arrive; more → 408.
        api_key: when set, every path but :data:`OPEN_PATHS` needs it (``X-API-Key`` or
            ``Authorization: Bearer``), else 401.
        cors_origins: origins allowed to call the API from a browser (CORS); empty: CORS off.

    Raises:
        FileNotFoundError, ValueError: not a loadable run directory; an empty ``api_key``; a limit < 1.
    """
    from prodclass.serving.predictor import Predictor

    if min(max_body_bytes, max_pixels, max_files, workers, max_request_pixels, max_concurrent) < 1 or read_timeout <= 0:
        raise ValueError("every limit must be positive")
    admission = Admission(max_concurrent)
    if api_key is not None and not api_key:
        raise ValueError("the API key must not be empty")
    predictor = predictor or Predictor.from_run(run_dir, backend=backend)
    info = model_info(run_dir, predictor)
    mid = info["model_id"]
    auth = "API key required (X-API-Key or Authorization: Bearer) except on /health and the docs. " if api_key else ""
    app = FastAPI(title="prodclass", version=__version__,
                  form_limits={"max_files": max_files, "max_fields": 8, "max_part_size": 64 * 1024},
                  description=f"Product-type classifier `{mid}` ({len(predictor.classes)} classes). {auth}Limits: "
                              f"body {max_body_bytes} bytes, {max_files} files, {max_pixels} pixels per image, "
                              f"{max_request_pixels} pixels per request, {max_concurrent} requests at once, "
                              f"body within {read_timeout:g} s; JPEG/PNG/WebP only. Every error is "
                              '`{"detail": "..."}`.')
    app.add_middleware(ReadTimeout, seconds=read_timeout)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    if cors_origins:  # outermost: preflights and error responses get the CORS headers too
        app.add_middleware(Cors, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type"], max_age=600)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    secured = ({"dependencies": [Security(APIKeyHeader(name="X-API-Key", auto_error=False)),
                                 Security(HTTPBearer(auto_error=False))]} if api_key else {})
    app.get("/health", responses=error_responses(500))(lambda: Health(status="ok", model_id=mid))
    app.get("/v1/model", summary="Classes, backbone, test metrics, calibration and abstention threshold",
            responses=error_responses(*([401] if api_key else []), 500), **secured)(lambda: info)
    limits = {"max_files": max_files, "max_pixels": max_pixels, "max_request_pixels": max_request_pixels}
    _add_predict_route(app, predictor, mid, limits, anyio.CapacityLimiter(workers), admission,
                       error_responses(400, *([401] if api_key else []), 408, 413, 415, 422, 500, 503), secured)
    return app


async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """422 with one ``detail`` string naming each bad field."""
    errs = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return error_response(422, "; ".join(errs))


async def _http_error(request, exc: HTTPException) -> JSONResponse:
    """Any HTTPException (the app's, the router's 404/405, the form parser's 400) as :class:`ErrorBody`."""
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def _server_error(request, exc: Exception) -> JSONResponse:
    """500 as :class:`ErrorBody`; the traceback goes to the server log only (Starlette re-raises it)."""
    return error_response(500, f"internal error ({type(exc).__name__}); see the server log")


def _add_predict_route(app: FastAPI, predictor, mid: str, limits: dict, limiter, admission: Admission,
                       responses: dict, secured: dict) -> None:
    n_classes, max_files = len(predictor.classes), limits["max_files"]

    @app.post("/v1/predict", responses=responses, **secured)
    async def predict(
        files: Annotated[list[UploadFile], File(min_length=1, max_length=max_files,
                                                description=f"JPEG, PNG or WebP images (1 to {max_files})")],
        top_k: Annotated[int, Form(ge=1, le=n_classes, description="labels per image")] = min(5, n_classes),
        title: Annotated[str | None, Form(max_length=1000, description="product title (used only by text models)")] = None,
    ) -> PredictResponse:
        """Top-k product types with calibrated probabilities and an abstain flag, one entry per image."""
        with admission.slot():
            blobs = [await f.read() for f in files]
            names = [(f.filename or f"file {i}")[:200] for i, f in enumerate(files)]
            # headers checked beside inference (refusals do not queue behind it), then inference
            await anyio.to_thread.run_sync(check_uploads, blobs, names, limits["max_pixels"],
                                           limits["max_request_pixels"])
            preds = await anyio.to_thread.run_sync(classify_checked, predictor, blobs, names, top_k, limiter=limiter)
        note = TitleNote(used=False, note="ignored: this model takes images only") if title is not None else None
        return PredictResponse(model_id=mid, threshold=predictor.threshold, predictions=preds, title=note)


def read_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline on request heads (slow-header clients).

    A connection must deliver a complete request head within ``seconds`` of being opened, and again
    within ``seconds`` of the end of each response (keep-alive); otherwise it is closed. While a request
    is in the app, the deadline is off (:class:`ReadTimeout` bounds its body; inference may queue).
    uvicorn's own ``timeout_keep_alive`` is reset by every byte received, so a client trickling one byte
    at a time would otherwise hold its connection forever.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a new request head arrived: it is the app's now
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # the next request head has `seconds` too (pipelined ones disarm at once)
            super().on_response_complete()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self.transport.is_closing():
                self.transport.close()

    return DeadlineH11Protocol


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          read_timeout: float = READ_TIMEOUT, max_connections: int = MAX_CONNECTIONS, **kwargs) -> None:
    """Load the model and serve the API with uvicorn until interrupted.

    Args:
        read_timeout: seconds for a request head (:func:`read_timeout_protocol`) and for a body
            (:class:`ReadTimeout`).
        max_connections: open connections before uvicorn answers a new request 503 (``limit_concurrency``).
        kwargs: limits, key, CORS origins and backend, see :func:`create_app`.

    Raises:
        FileNotFoundError, ValueError: as :func:`create_app`.
    """
    import uvicorn

    app = create_app(run_dir, read_timeout=read_timeout, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=read_timeout_protocol(read_timeout),
                limit_concurrency=max_connections, timeout_keep_alive=5)
