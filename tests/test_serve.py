"""The REST API: every endpoint and every limit with FastAPI's TestClient, then the real CLI server
(uvicorn on a free 127.0.0.1 port) over HTTP."""

import copy
import io
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import stop_process
from prodclass.io import read_json
from prodclass.serving.api import create_app
from prodclass.serving.predictor import Predictor

MAX_BODY, MAX_FILES, MAX_PIXELS = 300_000, 3, 1_000_000


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return Predictor.from_run(tiny_run)


@pytest.fixture(scope="module")
def client(tiny_run, predictor):
    app = create_app(tiny_run, predictor=predictor, max_body_bytes=MAX_BODY, max_files=MAX_FILES, max_pixels=MAX_PIXELS)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def test_images(tiny_run) -> list[Path]:
    t = pd.read_parquet(tiny_run / "dataset.parquet")
    return [Path(p) for p in t.loc[t["split"] == "test", "image_path"]]


def jpeg(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/jpeg")


def png_header(w: int, h: int) -> bytes:
    """A PNG claiming ``w``×``h`` RGB pixels but holding only one row of them: what a decompression
    bomb shows before its pixels are inflated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj()
    row = z.compress(bytes(1 + 3 * w)) + z.flush(zlib.Z_SYNC_FLUSH)  # the stream goes on: truncated
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", row) + chunk(b"IEND", b""))


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def assert_error(r, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert isinstance(detail, str) and all(w in detail for w in words), detail


def test_health(client, tiny_run):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    name, digest = body["model_id"].rsplit("-", 1)
    assert name == tiny_run.name and len(digest) == 8 and int(digest, 16) >= 0


def test_model_info(client, tiny_run, predictor):
    info = client.get("/v1/model").json()
    metrics = read_json(tiny_run / "metrics.json")
    assert info["classes"] == predictor.classes and info["num_classes"] == len(predictor.classes)
    assert info["backbone"] == predictor.meta["backbone"] == "efficientnet_lite0"
    assert info["metrics"]["accuracy"] == metrics["accuracy"] and info["metrics"]["n"] == metrics["n"]
    assert "embedding" not in info["metrics"]  # the summary, not the whole file
    assert info["threshold"] == predictor.threshold
    assert info["version"]["prodclass"] and info["version"]["model_format"] == 2
    assert info["model_id"] == client.get("/health").json()["model_id"]


def test_predict_matches_predictor(client, predictor, test_images):
    r = client.post("/v1/predict", files=[("files", jpeg(test_images[0]))])
    assert r.status_code == 200, r.text
    body = r.json()
    (p,) = body["predictions"]
    (want,) = predictor.predict([test_images[0].read_bytes()], top_k=5)
    assert body["model_id"] == client.get("/health").json()["model_id"]
    assert p["filename"] == test_images[0].name
    assert p["labels"] == want.labels and len(p["labels"]) == 5
    np.testing.assert_allclose(p["probs"], want.probs, atol=1e-5)
    assert p["probs"] == sorted(p["probs"], reverse=True) and sum(p["probs"]) <= 1 + 1e-5
    assert p["abstain"] is False and body["title"] is None


def test_predict_several_images_top_k_and_title(client, test_images):
    files = [("files", jpeg(p)) for p in test_images[:3]]
    r = client.post("/v1/predict", files=files, data={"top_k": "2", "title": "Men's leather running shoe"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["filename"] for p in body["predictions"]] == [p.name for p in test_images[:3]]
    assert all(len(p["labels"]) == 2 == len(p["probs"]) for p in body["predictions"])
    assert body["title"]["used"] is False and "ignored" in body["title"]["note"]


def test_predict_abstains_under_threshold(tiny_run, predictor, test_images):
    unsure = copy.copy(predictor)
    unsure.threshold = 1.01  # no probability reaches it
    with TestClient(create_app(tiny_run, predictor=unsure)) as c:
        body = c.post("/v1/predict", files=[("files", jpeg(test_images[0]))]).json()
        assert body["predictions"][0]["abstain"] is True and body["threshold"] == 1.01
        assert c.get("/v1/model").json()["threshold"] == 1.01


def test_format_is_sniffed_not_trusted(client, test_images):
    # a real JPEG under a misleading name and content type is accepted ...
    r = client.post("/v1/predict", files=[("files", ("notes.txt", test_images[0].read_bytes(), "text/plain"))])
    assert r.status_code == 200 and r.json()["predictions"][0]["labels"]
    # ... and PNG / WebP are accepted too
    img = Image.open(test_images[0])
    for fmt in ("PNG", "WEBP"):
        r = client.post("/v1/predict", files=[("files", (f"x.{fmt.lower()}", encoded(img, fmt), "image/png"))])
        assert r.status_code == 200, r.text
    # while a GIF or a text file dressed up as a JPEG is not
    r = client.post("/v1/predict", files=[("files", ("x.jpg", encoded(img, "GIF"), "image/jpeg"))])
    assert_error(r, 415, "x.jpg", "not a JPEG, PNG or WebP")
    r = client.post("/v1/predict", files=[("files", ("/etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n", "image/jpeg"))])
    assert_error(r, 415, "/etc/passwd")


def test_body_size_limit(client, test_images):
    big = [("files", ("big.jpg", b"\xff\xd8" + bytes(MAX_BODY), "image/jpeg"))]
    assert_error(client.post("/v1/predict", files=big), 413, "over the limit", str(MAX_BODY))

    def chunks():  # streamed without Content-Length: counted as it arrives
        for _ in range(4):
            yield bytes(MAX_BODY // 3)

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "over the limit")
    assert client.post("/v1/predict", files=[("files", jpeg(test_images[0]))]).status_code == 200  # under it: fine


def test_file_count_limit(client, test_images):
    files = [("files", jpeg(test_images[0]))] * (MAX_FILES + 1)
    assert_error(client.post("/v1/predict", files=files), 400, f"Maximum number of files is {MAX_FILES}")


def test_pixel_limit_checked_before_decoding(client):
    # over the server's limit: a header alone is enough to refuse (there are no pixels to decode)
    r = client.post("/v1/predict", files=[("files", ("wide.png", png_header(2000, 1000), "image/png"))])
    assert_error(r, 413, "wide.png", "2000x1000", str(MAX_PIXELS))
    # a decompression bomb past Pillow's own guard
    r = client.post("/v1/predict", files=[("files", ("bomb.png", png_header(60_000, 60_000), "image/png"))])
    assert_error(r, 413, "bomb.png")


def test_broken_images_are_422(client, test_images):
    data = test_images[0].read_bytes()
    assert_error(client.post("/v1/predict", files=[("files", ("cut.jpg", data[: len(data) // 3], "image/jpeg"))]),
                 422, "cut.jpg")
    assert_error(client.post("/v1/predict", files=[("files", ("empty.jpg", b"", "image/jpeg"))]), 422, "empty.jpg")
    # a valid header without pixel data: passes the checks, fails to decode
    assert_error(client.post("/v1/predict", files=[("files", ("hdr.png", png_header(100, 100), "image/png"))]),
                 422, "hdr.png")


@pytest.mark.parametrize("form", [{"top_k": "0"}, {"top_k": "6"}, {"top_k": "many"}])
def test_bad_top_k(client, test_images, form):
    assert_error(client.post("/v1/predict", files=[("files", jpeg(test_images[0]))], data=form), 422, "top_k")


def test_no_server_paths(client):
    # a path where a file should be is a validation error, never a read
    assert_error(client.post("/v1/predict", data={"files": "/etc/passwd"}), 422, "files")
    assert_error(client.post("/v1/predict", json={"files": ["/etc/hostname"]}), 422, "files")
    assert_error(client.post("/v1/predict"), 422, "files")


def test_openapi_docs_and_404(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/health"} <= set(schema["paths"])
    form = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in form
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert_error(client.get("/v2/nothing"), 404, "Not Found")
    assert_error(client.get("/v1/predict"), 405, "Method Not Allowed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_uvicorn_server(tiny_run, test_images, tmp_path):
    """`prodclass serve` in its own process on 127.0.0.1, spoken to over TCP; always stopped."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "prodclass.cli", "serve", str(tiny_run), "--host", "127.0.0.1", "--port", str(port),
           "--max-body-mb", "0.25"]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, f"server exited: {(tmp_path / 'server.log').read_text()}"
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not start in 120 s"
                time.sleep(0.3)
            info = http.get("/v1/model").json()
            assert info["num_classes"] == 5 and info["backend"] == "torch"
            r = http.post("/v1/predict", files=[("files", jpeg(p)) for p in test_images[:2]], data={"top_k": "3"})
            assert r.status_code == 200, r.text
            assert [len(p["labels"]) for p in r.json()["predictions"]] == [3, 3]
            r = http.post("/v1/predict", files=[("files", ("big.jpg", bytes(300_000), "image/jpeg"))])
            assert_error(r, 413, "over the limit")
    finally:
        stop_process(proc)
        log.close()


def test_cli_serve_refuses_a_non_run(tmp_path):
    from typer.testing import CliRunner

    from prodclass.cli import app

    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--port", "1"])
    assert r.exit_code == 2 and "model.json: missing" in r.output
