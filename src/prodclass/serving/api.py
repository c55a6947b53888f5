"""The REST API: a FastAPI app over one :class:`prodclass.serving.predictor.Predictor`, loaded once at start-up.

Endpoints (OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

- ``POST /v1/predict``: multipart ``files`` (one or more images), optional ``top_k`` and ``title``
  form fields → ``{"model_id", "predictions": [{"filename", "labels", "probs", "abstain"}], ...}``.
- ``GET /v1/model``: classes, backbone, metrics summary, calibration, abstention threshold, versions.
- ``GET /health``: ``{"status": "ok", "model_id"}``.

Limits, each answered with a 4xx JSON ``{"detail": "..."}`` (never a 500):

- request body over ``max_body_bytes`` → 413 (:class:`BodyLimit`): a too-large ``Content-Length`` is
  refused before any of the body is read, and the bytes of a streamed (chunked) body are counted as
  they arrive.
- more than ``max_files`` files → 400 (the multipart parser stops at the first file too many).
- not JPEG/PNG/WebP → 415: the format is sniffed from the bytes by Pillow (restricted to those three
  decoders); the client's filename and content type are never trusted.
- more than ``max_pixels`` pixels → 413, checked on the header before any pixel is decoded
  (a decompression-bomb guard; Pillow opens images lazily).
- a truncated or corrupt image of an allowed type → 422; ``top_k`` outside ``1..C`` → 422.

Uploads are read into memory from the parser's spooled temporary files; no endpoint reads or writes
a path named by the client. Inference runs in a worker thread (``workers`` at a time, default 1: the
Predictor is CPU-bound and already uses every core through torch's or ONNX Runtime's intra-op
threads), so the event loop stays free.
"""

import io
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from prodclass import __version__
from prodclass.preprocess import MAX_PIXELS
from prodclass.runs import FORMAT_VERSION, RunDir

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_BODY_BYTES = 16 * 1024 * 1024  # a 12-megapixel phone JPEG is 3-8 MB
MAX_FILES = 16
_METRIC_KEYS = ("accuracy", "macro_f1", "top5_accuracy", "log_loss", "n", "num_classes", "num_images")


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


def check_image(data: bytes, name: str, max_pixels: int) -> None:
    """Refuse an upload that is not a JPEG/PNG/WebP image of at most ``max_pixels`` pixels.

    Only the header is parsed (Pillow decodes pixels lazily, on ``load()``).

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
            return await JSONResponse({"detail": f"bad Content-Length {declared[:40]!r}"}, 400)(scope, receive, send)
        if declared is not None and int(declared) > self.max_bytes:
            detail = f"request body of {declared} bytes is over the limit of {self.max_bytes} bytes"
            return await JSONResponse({"detail": detail}, 413)(scope, receive, send)
        total = 0

        async def counted():
            nonlocal total
            message = await receive()
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                raise HTTPException(413, f"request body is over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


def create_app(run_dir: str | Path, predictor=None, max_body_bytes: int = MAX_BODY_BYTES,
               max_pixels: int = MAX_PIXELS, max_files: int = MAX_FILES, workers: int = 1,
               backend: str = "torch") -> FastAPI:
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

    Raises:
        FileNotFoundError, ValueError: not a loadable run directory.
    """
    from prodclass.serving.predictor import Predictor

    predictor = predictor or Predictor.from_run(run_dir, backend=backend)
    info = model_info(run_dir, predictor)
    mid = info["model_id"]
    app = FastAPI(title="prodclass", version=__version__,
                  form_limits={"max_files": max_files, "max_fields": 8, "max_part_size": 64 * 1024},
                  description=f"Product-type classifier `{mid}` ({len(predictor.classes)} classes). Limits: body "
                              f"{max_body_bytes} bytes, {max_files} files, {max_pixels} pixels per image, "
                              "JPEG/PNG/WebP only.")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.get("/health")(lambda: Health(status="ok", model_id=mid))
    app.get("/v1/model", summary="Classes, backbone, test metrics, calibration and abstention threshold")(lambda: info)
    _add_predict_route(app, predictor, mid, max_files, max_pixels, anyio.CapacityLimiter(workers))
    return app


async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """422 with one ``detail`` string naming each bad field."""
    errs = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(errs)}, status_code=422)


def classify_uploads(predictor, blobs: list[bytes], names: list[str], top_k: int,
                     max_pixels: int) -> list[ImagePrediction]:
    """Check every upload (:func:`check_image`), then classify them in one Predictor call.

    Raises:
        HTTPException: 413/415/422 for the first bad upload (named in the message).
    """
    for data, name in zip(blobs, names, strict=True):
        check_image(data, name, max_pixels)
    out = []
    for name, p in zip(names, predictor.predict(blobs, top_k=top_k), strict=True):
        if p.error:
            raise HTTPException(422, f"{name}: {p.error.removeprefix('<bytes>: ')}")
        out.append(ImagePrediction(filename=name, labels=p.labels, probs=[round(q, 6) for q in p.probs],
                                   abstain=p.abstain))
    return out


def _add_predict_route(app: FastAPI, predictor, mid: str, max_files: int, max_pixels: int, limiter) -> None:
    n_classes = len(predictor.classes)

    @app.post("/v1/predict")
    async def predict(
        files: Annotated[list[UploadFile], File(description=f"JPEG, PNG or WebP images (at most {max_files})")],
        top_k: Annotated[int, Form(ge=1, le=n_classes, description="labels per image")] = min(5, n_classes),
        title: Annotated[str | None, Form(max_length=1000, description="product title (used only by text models)")] = None,
    ) -> PredictResponse:
        """Top-k product types with calibrated probabilities and an abstain flag, one entry per image."""
        blobs = [await f.read() for f in files]
        names = [(f.filename or f"file {i}")[:200] for i, f in enumerate(files)]
        preds = await anyio.to_thread.run_sync(classify_uploads, predictor, blobs, names, top_k, max_pixels,
                                               limiter=limiter)
        note = TitleNote(used=False, note="ignored: this model takes images only") if title is not None else None
        return PredictResponse(model_id=mid, threshold=predictor.threshold, predictions=preds, title=note)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs) -> None:
    """Load the model and serve the API with uvicorn until interrupted (``kwargs``: limits and backend,
    see :func:`create_app`)."""
    import uvicorn

    uvicorn.run(create_app(run_dir, **kwargs), host=host, port=port, log_level=log_level)
