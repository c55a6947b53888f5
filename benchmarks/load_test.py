"""Load test of the REST API on loopback: latency percentiles, throughput and errors, quiet and beside slow clients.

Starts ``prodclass serve RUN_DIR`` on a free 127.0.0.1 port (or uses ``--url``, which must be
loopback), sends ``--requests`` ``POST /v1/predict`` requests (one test-split image each, cycled)
from ``--concurrency`` concurrent clients, stops by itself after the count or ``--max-seconds``,
shuts its server down, prints the figures and writes them to ``--out`` (JSON).

With ``--slow-clients N`` the same load runs twice: quiet, then beside N slow clients (half trickle
an endless request head, half send complete headers and then a body, one byte every
``--slow-interval`` seconds; each reconnects when the server drops it, and all stop when the normal
load is done). The figures of both phases, the p99 ratio and what the server did to the slow
connections (408 answers, closes, seconds held) are written to ``--out``.

    .venv/bin/python benchmarks/load_test.py RUN_DIR --requests 400 --concurrency 16
    .venv/bin/python benchmarks/load_test.py RUN_DIR --requests 400 --concurrency 16 --slow-clients 50

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


def start_server(run_dir: Path, backend: str = "torch", timeout: float = 180,
                 extra_args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """``prodclass serve`` (with ``extra_args``) on a free loopback port; returns once ``/health`` answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "prodclass.cli", "serve", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
           "--backend", backend, *extra_args]
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


def slow_request(host: str, kind: str) -> tuple[bytes, bytes]:
    """What a slow client sends at once, and what it then trickles: nothing, then a request head that
    never ends (``head``); or a complete head announcing a 1 MB multipart body, then that body (``body``)."""
    if kind == "head":
        return b"", f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode() + b"a" * 10_000
    return (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Content-Length: 1000000\r\n\r\n").encode(), b"--b\r\n" + b"x" * 999_995


async def slow_client(url: str, kind: str, interval: float, stop: asyncio.Event, stats: dict) -> None:
    """Send the start of :func:`slow_request`, then trickle the rest one byte every ``interval`` s, reconnecting whenever the server
    drops the connection, until ``stop`` is set. Records in ``stats``: connections, server closes, the
    status lines answered (e.g. 408) and the seconds each dropped connection was held."""
    parsed = urlparse(url)
    start, payload = slow_request(parsed.netloc, kind)
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port)
        except OSError as e:
            stats["connect_errors"].append(f"{type(e).__name__}: {e}")
            await asyncio.sleep(interval)
            continue
        stats["connections"] += 1
        t0, answer, sent = time.perf_counter(), None, 0
        read = asyncio.ensure_future(reader.read(4096))
        try:
            writer.write(start)
            while not stop.is_set() and sent < len(payload):
                done, _ = await asyncio.wait({read}, timeout=interval)
                if done:
                    answer = read.result()
                    break
                writer.write(payload[sent:sent + 1])
                sent += 1
                await writer.drain()
        except OSError:
            answer = b""
        if answer is not None:  # the server answered or closed: it let go of this slow client
            stats["server_closed"] += 1
            stats["held_s"].append(time.perf_counter() - t0)
            status = answer.split(b"\r\n", 1)[0].decode("latin-1") or "closed without an answer"
            stats["answers"][status] = stats["answers"].get(status, 0) + 1
        read.cancel()
        writer.close()


async def load_beside_slow_clients(url: str, images, args) -> tuple[dict, dict]:
    """:func:`load` while ``args.slow_clients`` :func:`slow_client` tasks run (half ``head``, half ``body``)."""
    stop = asyncio.Event()
    stats = {"clients": args.slow_clients, "interval_s": args.slow_interval, "connections": 0, "server_closed": 0,
             "answers": {}, "held_s": [], "connect_errors": []}
    tasks = [asyncio.create_task(slow_client(url, "head" if i % 2 else "body", args.slow_interval, stop, stats))
             for i in range(args.slow_clients)]
    await asyncio.sleep(2)  # let them connect and start trickling
    try:
        res = await load(url, images, args.requests, args.concurrency, args.max_seconds)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    held = np.asarray(stats.pop("held_s") or [0.0])
    stats["held_s"] = {"median": round(float(np.median(held)), 2), "max": round(float(held.max()), 2)}
    stats["connect_errors"] = stats["connect_errors"][:5]
    return res, stats


def summary(res: dict, requested: int, concurrency: int) -> dict:
    """Latency percentiles (ms), throughput and errors of one :func:`load` result."""
    lat = np.asarray(res["latencies_ms"])
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    return {"requests": len(lat), "requested": requested, "concurrency": concurrency,
            "errors": len(res["errors"]), "error_samples": res["errors"][:5],
            "latency_ms": {"p50": round(p50, 1), "p95": round(p95, 1), "p99": round(p99, 1),
                           "mean": round(float(lat.mean()), 1), "max": round(float(lat.max()), 1)},
            "throughput_rps": round(len(lat) / res["wall_s"], 2), "wall_s": round(res["wall_s"], 2)}


def _line(name: str, s: dict) -> str:
    lat = s["latency_ms"]
    return (f"{name}: {s['requests']} requests, {s['concurrency']} concurrent, {s['errors']} errors | latency ms "
            f"p50 {lat['p50']:.0f}  p95 {lat['p95']:.0f}  p99 {lat['p99']:.0f} | {s['throughput_rps']} req/s")


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="run directory (its test split supplies the images)")
    ap.add_argument("--url", help="an already running loopback server (default: start one)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=600, help="stop sending after this long (each phase)")
    ap.add_argument("--backend", default="torch", help="backend of the started server (torch, onnx, onnx-int8, auto)")
    ap.add_argument("--warmup", type=int, default=8, help="untimed requests first")
    ap.add_argument("--slow-clients", type=int, default=0, help="also run the load beside this many slow clients")
    ap.add_argument("--slow-interval", type=float, default=0.5, help="seconds between a slow client's bytes")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `prodclass serve` argument (repeatable)")
    ap.add_argument("--out", type=Path, help="JSON results [benchmarks/results/load_test.json, or "
                                             "load_test_slow_clients.json with --slow-clients]")
    args = ap.parse_args(argv)
    if not 0 < args.requests <= 100_000 or not 0 < args.concurrency <= 64 or not 0 <= args.slow_clients <= 200:
        ap.error("--requests must be in 1..100000, --concurrency in 1..64 and --slow-clients in 0..200")
    if not 0.01 <= args.slow_interval <= 10:
        ap.error("--slow-interval must be in 0.01..10 seconds")
    name = "load_test_slow_clients.json" if args.slow_clients else "load_test.json"
    args.out = args.out or ROOT / "benchmarks" / "results" / name
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    images = sample_images(args.run_dir)
    load_before = os.getloadavg()
    proc, url = ((None, loopback_url(args.url)) if args.url
                 else start_server(args.run_dir, args.backend, extra_args=tuple(args.serve_arg)))
    try:
        model = httpx.get(f"{url}/v1/model", timeout=30).json()
        asyncio.run(load(url, images, args.warmup, min(args.warmup, args.concurrency), args.max_seconds))
        quiet = summary(asyncio.run(load(url, images, args.requests, args.concurrency, args.max_seconds)),
                        args.requests, args.concurrency)
        if args.slow_clients:
            res, slow_stats = asyncio.run(load_beside_slow_clients(url, images, args))
            slow = {**summary(res, args.requests, args.concurrency), "slow_clients": slow_stats}
    finally:
        if proc is not None:
            stop_server(proc)
    out = {
        "model_id": model["model_id"], "backbone": model["backbone"], "backend": model.get("backend"),
        "num_classes": model["num_classes"], **quiet, "images_per_request": 1, "distinct_images": len(images),
        "cpu_count": os.cpu_count(), "loadavg_1m_before": round(load_before[0], 2),
        "server": "prodclass serve (uvicorn, 1 process, inference serialised in a worker thread)"
                  + (f" {' '.join(args.serve_arg)}" if args.serve_arg else ""),
        "note": "client and server on the same machine over loopback; the CPU may be shared with other jobs",
    }
    print(_line("quiet", quiet))
    if args.slow_clients:
        ratio = slow["latency_ms"]["p99"] / quiet["latency_ms"]["p99"]
        out.update(with_slow_clients=slow, p99_ratio_slow_vs_quiet=round(ratio, 2))
        print(_line(f"beside {args.slow_clients} slow clients", slow))
        print(f"p99 ratio {ratio:.2f} | slow connections: {slow_stats['connections']} opened, "
              f"{slow_stats['server_closed']} dropped by the server {slow_stats['answers']}, "
              f"held median {slow_stats['held_s']['median']} s")
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
