"""Load test of the REST API on loopback: latency percentiles, throughput and errors.

Starts ``prodclass serve RUN_DIR`` on a free 127.0.0.1 port (or uses ``--url``, which must be
loopback), sends ``--requests`` ``POST /v1/predict`` requests (one test-split image each, cycled)
from ``--concurrency`` concurrent clients, stops by itself after the count or ``--max-seconds``,
shuts its server down, prints the figures and writes them to ``--out`` (JSON).

    .venv/bin/python benchmarks/load_test.py runs/abo-small-product-type-<stamp> --requests 500 --concurrency 8

Latency is wall time per request seen by the client (queueing in the server included), in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pandas as pd

from prodclass.io import write_json
from prodclass.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]


def loopback_url(url: str) -> str:
    """``url`` unchanged if its host is a loopback address; ValueError otherwise."""
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{url}: only loopback servers may be load-tested (127.0.0.1, ::1, localhost)")
    return url.rstrip("/")


def sample_images(run_dir: Path, n: int = 64) -> list[tuple[str, bytes]]:
    """Up to ``n`` test-split images of the run as (file name, bytes)."""
    t = pd.read_parquet(RunDir(run_dir).dataset_file, columns=["image_path", "split"])
    paths = [Path(p) for p in t.loc[t["split"] == "test", "image_path"].head(n)]
    return [(p.name, p.read_bytes()) for p in paths]


def start_server(run_dir: Path, backend: str = "torch", timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """``prodclass serve`` on a free loopback port; returns once ``/health`` answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "prodclass.cli", "serve", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
           "--backend", backend]
    log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the test runs
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"server did not answer /health within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def load(url: str, images: list[tuple[str, bytes]], requests: int, concurrency: int, max_seconds: float,
               top_k: int = 5) -> dict:
    """Send ``requests`` predictions from ``concurrency`` workers; stop early at ``max_seconds``.

    Returns:
        ``{"latencies_ms": [...], "errors": [...], "wall_s"}`` for the requests that were sent.
    """
    latencies, errors, counter = [], [], iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            name, data = images[i % len(images)]
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/predict", files=[("files", (name, data, "image/jpeg"))],
                                      data={"top_k": str(top_k)})
                if r.status_code != 200 or not r.json()["predictions"][0]["labels"]:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
            latencies.append((time.perf_counter() - t0) * 1000)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"latencies_ms": latencies, "errors": errors, "wall_s": wall}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="run directory (its test split supplies the images)")
    ap.add_argument("--url", help="an already running loopback server (default: start one)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=600, help="stop sending after this long")
    ap.add_argument("--backend", default="torch", help="backend of the started server (torch, onnx, onnx-int8, auto)")
    ap.add_argument("--warmup", type=int, default=8, help="untimed requests first")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load_test.json")
    args = ap.parse_args(argv)
    if not 0 < args.requests <= 100_000 or not 0 < args.concurrency <= 64:
        ap.error("--requests must be in 1..100000 and --concurrency in 1..64")

    images = sample_images(args.run_dir)
    load_before = os.getloadavg()
    proc, url = (None, loopback_url(args.url)) if args.url else start_server(args.run_dir, args.backend)
    try:
        model = httpx.get(f"{url}/v1/model", timeout=30).json()
        asyncio.run(load(url, images, args.warmup, min(args.warmup, args.concurrency), args.max_seconds))
        res = asyncio.run(load(url, images, args.requests, args.concurrency, args.max_seconds))
    finally:
        if proc is not None:
            stop_server(proc)
    lat = np.asarray(res["latencies_ms"])
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    out = {
        "model_id": model["model_id"], "backbone": model["backbone"], "backend": model.get("backend"),
        "num_classes": model["num_classes"],
        "requests": len(lat), "requested": args.requests, "concurrency": args.concurrency,
        "images_per_request": 1, "distinct_images": len(images),
        "errors": len(res["errors"]), "error_samples": res["errors"][:5],
        "latency_ms": {"p50": round(p50, 1), "p95": round(p95, 1), "p99": round(p99, 1),
                       "mean": round(float(lat.mean()), 1), "max": round(float(lat.max()), 1)},
        "throughput_rps": round(len(lat) / res["wall_s"], 2), "wall_s": round(res["wall_s"], 2),
        "cpu_count": os.cpu_count(), "loadavg_1m_before": round(load_before[0], 2),
        "server": "prodclass serve (uvicorn, 1 process, inference serialised in a worker thread)",
        "note": "client and server on the same machine over loopback; the CPU may be shared with other jobs",
    }
    write_json(args.out, out)
    print(f"{out['requests']} requests, {args.concurrency} concurrent, {out['errors']} errors | latency ms "
          f"p50 {p50:.0f}  p95 {p95:.0f}  p99 {p99:.0f} | {out['throughput_rps']} req/s | wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
