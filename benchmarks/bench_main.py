"""Benchmark the main job: `prodclass run configs/abo-small.yaml` from an empty embedding cache.

Prints and writes (benchmarks/results/main.json): test accuracy, macro-F1, wall seconds of the
whole job, embedding throughput (images/s), class and image counts, and the machine.

    PRODCLASS_DATA=../shared/data .venv/bin/python benchmarks/bench_main.py [--config ...] [--warm]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from prodclass.config import load_config, resolve_data_root
from prodclass.io import write_json
from prodclass.pipeline import run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/abo-small.yaml"))
    ap.add_argument("--warm", action="store_true", help="use the normal embedding cache instead of an empty one")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/main.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}/runs"] + ([] if args.warm else [f"embed.cache_dir={tmp}/cache"])
        cfg = load_config(args.config, overrides)
        t0 = time.perf_counter()
        res = run(cfg, resolve_data_root(None), progress=False)
        wall = time.perf_counter() - t0
    m = res.metrics
    out = {
        "config": os.path.relpath(args.config, ROOT), "cache": "warm" if args.warm else "empty",
        "test_accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
        "test_correct": round(m["accuracy"] * m["n"]), "test_n": m["n"], "macro_f1_full": m["macro_f1"],
        "top5_accuracy": round(m.get("top5_accuracy", float("nan")), 4),
        "num_classes": m["num_classes"], "num_images": m["num_images"], "split_sizes": m["split_sizes"],
        "wall_seconds": round(wall, 1), "embedding_images_per_s": m["embedding"]["images_per_s"],
        "embedding_seconds": m["embedding"]["seconds"], "head_train_seconds": m["train_seconds"],
        "epochs": m["epochs"], "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(json.dumps(out, indent=2))
    write_json(args.out, out)


if __name__ == "__main__":
    main()
