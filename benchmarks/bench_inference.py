"""Inference speed on this CPU: eager torch vs ONNX Runtime, files on disk → predictions.

    PRODCLASS_DATA=../shared/data .venv/bin/python benchmarks/bench_inference.py [RUN_DIR]

Measures, in one process and one run (so the ratios compare like with like):

- ``end_to_end``: ``Predictor.predict(paths, batch_size=b)`` on abo-small JPEGs of the run's test
  split (decode + resize + normalise on 2 threads, one batch ahead of the network), for the
  torch backend (channels-last, eager, as many threads as cores: the spine's setting), eager
  torch on one thread (much faster than two when other processes load the cores: its OpenMP
  threads wait on each other), and ONNX Runtime (+ INT8 if ``model.int8.onnx`` exists), at
  batch 1 and 32. Files are read once beforehand (warm page cache).
- ``compute``: the backend alone on a preallocated preprocessed batch (the ceiling end to end).
- ``preprocess``: milliseconds per image of decode, resize+crop and normalise, one thread.
- ``ort_options``: graph optimisation level EXTENDED vs ALL, spin-waiting off vs on (compute,
  whole batch in one ``session.run``; ``compute`` ``onnx/batch32`` runs it 4 images at a time).
- ``flops``: GFLOP per image (torch.utils.flop_counter, 2 FLOPs per multiply-add) and a
  numpy SGEMM GFLOP/s on the same threads, for how close the network runs to dense FP32 peak.

Every figure is the best of ``--repeats`` timings, with images per wall second and per CPU
second of this process. On a shared machine (the load average is recorded) the wall figures
move with the other load; per CPU second they move much less, and ``threads`` times the
per-CPU-second rate estimates an idle machine. Summary ratios are taken within this one run. Writes
``benchmarks/results/inference.json`` (exports ``model.onnx`` first if the run has none).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prodclass.inference import cpu_count  # noqa: E402
from prodclass.io import write_json  # noqa: E402
from prodclass.runs import RunDir  # noqa: E402
from prodclass.serving.predictor import Predictor  # noqa: E402

SPINE_TORCH_IMG_S = 46.0  # the spine's embedding throughput (eager torch, batch 32, 2 threads), commit 8927bb3


def timed(fn, repeats: int) -> tuple[float, float]:
    """Best (wall seconds, CPU seconds of this process) over ``repeats`` calls of ``fn``."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - w, time.process_time() - c))
    return best


def rate(n: int, secs: tuple[float, float]) -> dict:
    return {"images": n, "img_per_s": round(n / secs[0], 1), "img_per_cpu_s": round(n / secs[1], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", nargs="?", help="run directory (default: the newest runs/abo-small-product-type-*)")
    ap.add_argument("--images", type=int, default=256, help="images for batch 32 (batch 1 uses a quarter)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/inference.json"))
    args = ap.parse_args()

    import pandas as pd
    import torch

    threads = cpu_count()
    torch.set_num_threads(threads)
    run_dir = Path(args.run_dir) if args.run_dir else max((ROOT / "runs").glob("abo-small-product-type-*"), key=os.path.getmtime)
    run = RunDir(run_dir)
    if not run.onnx_file().is_file():
        from prodclass.serving.export import export_onnx

        export_onnx(run_dir)
    t = pd.read_parquet(run.dataset_file)
    paths = t[t["split"] == "test"]["image_path"].tolist()[: args.images]
    for p in paths:  # warm the page cache for every backend alike
        Path(p).read_bytes()
    load0 = os.getloadavg()

    backends = _backends(run_dir, threads)
    prep = backends["torch"].preprocessing
    res = {"run_dir": str(run_dir), "cpu": _cpu_name(), "threads": threads, "repeats": args.repeats,
           "versions": {m: __import__(m).__version__ for m in ("torch", "onnxruntime", "numpy", "PIL")}}
    res["flops"], gflop = _flops(backends["torch"].model, prep.input_size, args.repeats)
    res["preprocess_ms_per_image"] = _preprocess_ms(prep, paths[:64], args.repeats)

    res["compute"], res["end_to_end"] = {}, {}
    x32 = np.stack([prep(p) for p in paths[:32]])
    for name, pred in backends.items():
        for b in (1, 32):
            compute, end_to_end = _backend_rates(pred, x32, paths, b, args.repeats, gflop)
            res["compute"][f"{name}/batch{b}"], res["end_to_end"][f"{name}/batch{b}"] = compute, end_to_end
            print(f"{name:10s} batch {b:2d}: compute {compute['img_per_s']:7.1f} img/s | "
                  f"end to end {end_to_end['img_per_s']:7.1f} img/s", flush=True)

    res["ort_options"] = _ort_options(run.onnx_file(), x32, threads, args.repeats)
    print("ONNX Runtime options (compute img/s):", res["ort_options"], flush=True)

    res["summary"] = _summary(res, backends, threads, gflop)
    res["loadavg_1min"] = {"start": round(load0[0], 2), "end": round(os.getloadavg()[0], 2)}
    write_json(args.out, res)
    e2e = res["end_to_end"]
    print(f"\n{'':12s}{'batch 1':>10s}{'batch 32':>10s}  img/s (img per CPU-second)   files on disk -> predictions")
    for name in backends:
        print(f"{name:12s}" + "".join(f"{e2e[f'{name}/batch{b}']['img_per_s']:10.1f} ({e2e[f'{name}/batch{b}']['img_per_cpu_s']:.1f})"
                                      for b in (1, 32)))
    print(f"summary: {res['summary']}\nload average {res['loadavg_1min']} on {threads} cores -> {args.out}")


def _backends(run_dir: Path, threads: int) -> dict:
    """torch (all cores), torch on one thread, ONNX Runtime and, when exported, ONNX INT8."""
    backends = {"torch": Predictor.from_run(run_dir, backend="torch")}
    t1 = Predictor.from_run(run_dir, backend="torch")
    t1.backend = _OneThread(t1.backend, threads)
    backends.update({"torch-1thread": t1, "onnx": Predictor.from_run(run_dir, backend="onnx")})
    if RunDir(run_dir).onnx_file(int8=True).is_file():
        backends["onnx-int8"] = Predictor.from_run(run_dir, backend="onnx-int8")
    return backends


def _flops(model, input_size: int, repeats: int) -> tuple[dict, float]:
    """FLOPs per image of ``model`` and the machine's dense FP32 rate (numpy SGEMM); also the unrounded GFLOP."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size).contiguous(memory_format=torch.channels_last))
    gflop = fc.get_total_flops() / 1e9
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    s = timed(lambda: a @ a, repeats + 2)
    return {"gflop_per_image": round(gflop, 3), "sgemm_gflop_per_s": round(2 * 2048 ** 3 / s[0] / 1e9, 1),
            "sgemm_gflop_per_cpu_s": round(2 * 2048 ** 3 / s[1] / 1e9, 1)}, gflop


def _preprocess_ms(prep, sub: list, repeats: int) -> dict:
    """Milliseconds per image of decode, resize+crop and normalise alone (one thread)."""
    from prodclass.preprocess import load_image

    imgs = [load_image(p) for p in sub]
    crops = [prep.resize_crop(i) for i in imgs]
    return {
        "decode": round(timed(lambda: [load_image(p) for p in sub], repeats)[0] / len(sub) * 1e3, 3),
        "resize_crop": round(timed(lambda: [prep.resize_crop(i) for i in imgs], repeats)[0] / len(sub) * 1e3, 3),
        "normalize": round(timed(lambda: [prep.normalize(c) for c in crops], repeats)[0] / len(sub) * 1e3, 3),
    }


def _backend_rates(pred, x32: np.ndarray, paths: list, b: int, repeats: int, gflop: float) -> tuple[dict, dict]:
    """(compute, end_to_end) rates of one predictor at batch size ``b``."""
    x = x32[:b]
    pred.predict_logits(x)  # warm-up: allocations, kernel selection
    n_iter = 32 // b if b > 1 else 16
    compute = rate(b * n_iter, timed(lambda: [pred.predict_logits(x) for _ in range(n_iter)], repeats))
    compute["gflop_per_s"] = round(compute["img_per_s"] * gflop, 1)
    sel = paths if b == 32 else paths[: max(8, len(paths) // 4)]
    pred.predict(sel[:b * 2], batch_size=b)
    return compute, rate(len(sel), timed(lambda: pred.predict(sel, batch_size=b), repeats))


def _ort_options(onnx_path: Path, x32: np.ndarray, threads: int, repeats: int) -> dict:
    """The ONNX Runtime session choices of OnnxBackend, each against its alternative (compute img/s)."""
    import onnxruntime as ort

    out = {}
    for level in ("EXTENDED", "ALL"):
        for spin in (False, True):
            so = ort.SessionOptions()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.add_session_config_entry("session.intra_op.allow_spinning", str(int(spin)))
            sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
            for b in (1, 32):
                out[f"opt={level},spin={int(spin)}/batch{b}"] = _ort_rate(sess, x32[:b], repeats)
    return out


def _ort_rate(sess, x: np.ndarray, repeats: int) -> float:
    b = len(x)
    n_iter = 32 // b if b > 1 else 16
    sess.run(None, {"images": x})
    return rate(b * n_iter, timed(lambda: [sess.run(None, {"images": x}) for _ in range(n_iter)], repeats))["img_per_s"]


def _ratio(a: dict, b: dict, key: str) -> float:
    return round(a[key] / b[key], 2)


def _summary(res: dict, backends: dict, threads: int, gflop: float) -> dict:
    """Ratios within this one run: ONNX vs torch, vs the spine, vs compute and the SGEMM ceiling."""
    e2e, comp = res["end_to_end"], res["compute"]
    best_torch = {b: max(("torch", "torch-1thread"), key=lambda n: e2e[f"{n}/batch{b}"]["img_per_s"]) for b in (1, 32)}
    summary = {
        name: {f"batch{b}": {"vs_torch_wall": _ratio(e2e[f"{name}/batch{b}"], e2e[f"torch/batch{b}"], "img_per_s"),
                             "vs_torch_per_cpu_s": _ratio(e2e[f"{name}/batch{b}"], e2e[f"torch/batch{b}"],
                                                          "img_per_cpu_s"),
                             f"vs_best_torch_wall ({best_torch[b]})": _ratio(e2e[f"{name}/batch{b}"],
                                                                             e2e[f"{best_torch[b]}/batch{b}"],
                                                                             "img_per_s")}
               for b in (1, 32)} for name in backends if name.startswith("onnx")}
    summary["onnx_batch32_vs_spine_46_img_s"] = {
        "wall": round(e2e["onnx/batch32"]["img_per_s"] / SPINE_TORCH_IMG_S, 2),
        "all_cores_estimate": round(threads * e2e["onnx/batch32"]["img_per_cpu_s"] / SPINE_TORCH_IMG_S, 2)}
    summary["onnx_end_to_end_share_of_compute"] = _ratio(e2e["onnx/batch32"], comp["onnx/batch32"], "img_per_cpu_s")
    summary["onnx_compute_gflop_per_cpu_s"] = round(comp["onnx/batch32"]["img_per_cpu_s"] * gflop, 1)
    summary["onnx_compute_share_of_sgemm"] = round(summary["onnx_compute_gflop_per_cpu_s"]
                                                   / res["flops"]["sgemm_gflop_per_cpu_s"], 2)
    summary["ceiling_img_per_s_all_cores_at_sgemm_rate"] = round(
        threads * res["flops"]["sgemm_gflop_per_cpu_s"] / gflop, 1)
    return summary


class _OneThread:
    """Eager torch on one intra-op thread (torch's thread count is per process: set per call)."""

    name = "torch-1thread"

    def __init__(self, backend, threads: int):
        self.backend, self.threads, self.model = backend, threads, backend.model

    def __call__(self, x):
        import torch

        torch.set_num_threads(1)
        try:
            return self.backend(x)
        finally:
            torch.set_num_threads(self.threads)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
