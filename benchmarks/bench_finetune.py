"""Benchmark: frozen-embedding head vs progressive fine-tuning, on the same stored split.

For (a) abo-small product_type (``configs/abo-small.yaml`` vs ``configs/abo-small-finetune.yaml``)
and (b) fashion-product-images articleType, classes with >= 50 images (``configs/fashion-finetune.yaml``
with and without ``finetune.enabled``), each run starts from its own empty cache (cold: the frozen
run computes its embeddings, the fine-tuning run its own and its frozen-prefix features). Checks that both runs stored the same split, then prints and writes
``benchmarks/results/finetune.json``: test accuracy, macro-F1, wall seconds and epochs of each run
(fine-tuning: stage-1 head epochs + stage-2 epochs, with its time breakdown) and the gains.

``--speed`` instead measures the stage-2 cost levers on random inputs (prefix engine, channels-last,
input size, unfrozen blocks, ``torch.compile``) and writes ``benchmarks/results/finetune_speed.json``.

    PRODCLASS_DATA=../shared/data .venv/bin/python benchmarks/bench_finetune.py [--only abo|fashion] [--speed]

Timings depend on what else runs on the machine; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from prodclass.config import load_config, resolve_data_root
from prodclass.io import write_json
from prodclass.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "abo-small": (ROOT / "configs/abo-small.yaml", [], ROOT / "configs/abo-small-finetune.yaml", []),
    "fashion": (ROOT / "configs/fashion-finetune.yaml", ["finetune.enabled=false"], ROOT / "configs/fashion-finetune.yaml", []),
}


def _machine() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def _one(config: Path, overrides: list[str], tmp: str, label: str) -> tuple[dict, pd.DataFrame]:
    cfg = load_config(config, overrides + [f"output_dir={tmp}/runs", f"embed.cache_dir={tmp}/cache-{label.split()[-1]}"])
    print(f"[{label}] {config.name} {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    res = run(cfg, resolve_data_root(None), progress=False, echo=lambda m: print(f"  {m}", flush=True))
    wall = time.perf_counter() - t0
    m = res.metrics
    hist = pd.read_json(res.run_dir / "history.json")
    out = {"config": os.path.relpath(config, ROOT), "overrides": overrides, "accuracy": round(m["accuracy"], 4),
           "macro_f1": round(m["macro_f1"], 4), "wall_seconds": round(wall), "head_epochs": int((hist["stage"] == "head").sum()),
           "embedding_seconds": m["embedding"]["seconds"], "n_test": m["n"], "num_classes": m["num_classes"],
           "split_sizes": m["split_sizes"], "input_size": cfg.finetune.input_size if cfg.finetune.enabled else None}
    if "finetune" in m:
        f = m["finetune"]
        out.update(finetune_epochs=f["epochs"], finetune_best_epoch=f["best_epoch"], unfreeze_blocks=f["unfreeze_blocks"],
                   input_size=f["input_size"], finetune_seconds=round(f["seconds"]),
                   feature_cache_seconds=f["feature_cache"].get("seconds"), seconds_per_epoch=f["seconds_per_epoch"],
                   views=cfg.finetune.views, best_val_macro_f1=round(f["best_val_macro_f1"], 4))
    print(f"  -> accuracy {out['accuracy']:.4f} macro-F1 {out['macro_f1']:.4f} in {wall:.0f}s", flush=True)
    return out, pd.read_parquet(res.run_dir / "dataset.parquet", columns=["image_path", "split"])


def compare(names: list[str]) -> dict:
    results = {"machine": _machine(), "note": "2-core CPU shared with other jobs while measured", "datasets": {}}
    for name in names:
        frozen_cfg, frozen_ovr, ft_cfg, ft_ovr = CASES[name]
        with tempfile.TemporaryDirectory() as tmp:
            frozen, split_a = _one(frozen_cfg, frozen_ovr, tmp, f"{name} frozen")
            tuned, split_b = _one(ft_cfg, ft_ovr, tmp, f"{name} finetune")
        same = split_a.sort_values("image_path").reset_index(drop=True).equals(
            split_b.sort_values("image_path").reset_index(drop=True))
        if not same:
            raise SystemExit(f"{name}: the two runs stored different splits")
        results["datasets"][name] = {"frozen_head": frozen, "finetune": tuned, "same_split": same,
                                     "accuracy_gain_points": round(100 * (tuned["accuracy"] - frozen["accuracy"]), 2),
                                     "macro_f1_gain_points": round(100 * (tuned["macro_f1"] - frozen["macro_f1"]), 2)}
        write_json(ROOT / "benchmarks/results/finetune.json", results)
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print("\n| dataset | model | test acc | macro-F1 | wall s | epochs |\n|---|---|---|---|---|---|")
    for name, r in results["datasets"].items():
        f, t = r["frozen_head"], r["finetune"]
        print(f"| {name} | frozen head (224 px) | {f['accuracy']:.4f} | {f['macro_f1']:.4f} | {f['wall_seconds']} | {f['head_epochs']} |")
        print(f"| {name} | fine-tuned, last {t['unfreeze_blocks']} blocks ({t['input_size']} px) | {t['accuracy']:.4f} | "
              f"{t['macro_f1']:.4f} | {t['wall_seconds']} | {t['head_epochs']} + {t['finetune_epochs']} |")
    return results


def _time(fn, reps: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _ms(fn, *args, n: int = 32, reps: int = 3) -> float:
    """ms per image of ``fn(*args)`` on a batch of ``n``, min of ``reps`` after a warm-up."""
    return round(1000 * _time(functools.partial(fn, *args), reps) / n, 2)


@torch.no_grad()
def _forward(model, x):
    return model(x)


def speed() -> dict:
    """ms per image of the pieces of a stage-2 epoch, batch 32, min of 3 after a warm-up."""
    from prodclass.features.backbones import create_backbone
    from prodclass.models.heads import Classifier, create_head
    from prodclass.models.policy import BackboneFinetuning
    from prodclass.models.prefix_cache import prefix_runner
    from prodclass.models.split import Prefix
    from prodclass.preprocess import Preprocessing

    torch.manual_seed(0)
    out = {"machine": _machine(), "note": "ms per image, batch 32, min of 3; CPU shared with other jobs", "rows": []}

    def row(**kw):
        out["rows"].append(kw)
        print(kw, flush=True)

    for size in (224, 192, 160):
        prep = Preprocessing(input_size=size, resize_size=size)
        model = Classifier(create_backbone("efficientnet_lite0", preprocessing=prep), create_head("mlp", 1280, 37)).eval()
        x = torch.randn(32, 3, size, size)
        k = BackboneFinetuning(3).split_index(model)
        # the frozen prefix (what the feature cache runs once per view)
        row(part="prefix (blocks 0-5)", size=size, engine="torch", channels_last=False,
            ms_per_image=_ms(_forward, Prefix(model, k), x))
        for engine in ("torch", "onnxruntime"):  # the backends of prodclass.inference (torch: channels-last)
            row(part="prefix (blocks 0-5)", size=size, engine=engine, channels_last=engine == "torch",
                ms_per_image=_ms(prefix_runner(model, k, engine), x.numpy()))
        cl_model = model.to(memory_format=torch.channels_last)
        row(part="full forward (eval)", size=size, engine="torch", channels_last=True,
            ms_per_image=_ms(_forward, cl_model, x.contiguous(memory_format=torch.channels_last)))
        # one training step of the trainable tail, per unfrozen-block count and memory format
        for n in (2, 3, 4, 9):
            _train_step_rows(model, x, n, size, row)
    # the same step in fresh processes: OpenMP wait policy and thread count on a shared CPU
    for policy in ("", "PASSIVE"):
        for threads in (1, 2):
            env = {**os.environ, "OMP_WAIT_POLICY": policy}
            env.pop("OMP_WAIT_POLICY") if not policy else None
            r = subprocess.run([sys.executable, __file__, "--tail-step", str(threads)], env=env, capture_output=True, text=True)
            row(part="train step, last 3 blocks (fresh process)", size=224, channels_last=True, threads=threads,
                omp_wait_policy=policy or "default", ms_per_image=float(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None)
    write_json(ROOT / "benchmarks/results/finetune_speed.json", out)
    return out


def _tail_step(m, policy, optimizer, tail, h, y) -> None:
    """One optimisation step of the tail (``tail`` maps ``h`` to logits)."""
    policy.set_train_mode(m)
    loss = torch.nn.functional.cross_entropy(tail(h), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _train_step_rows(model, x, n: int, size: int, row) -> None:
    """Rows for one training step of the last ``n`` blocks, contiguous and channels-last (+ torch.compile)."""
    from prodclass.models.policy import BackboneFinetuning
    from prodclass.models.split import Tail, prefix_forward

    policy = BackboneFinetuning(n)
    k = policy.split_index(model)
    with torch.no_grad():
        h = prefix_forward(model.to(memory_format=torch.contiguous_format), x, k)
    y = torch.randint(0, 37, (len(x),))
    for cl in (False, True):
        if n == 9 and size != 224:
            continue
        m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        hh = h.contiguous(memory_format=torch.channels_last) if cl else h.contiguous()
        policy.freeze(m)
        opt = policy.make_optimizer(m)
        row(part=f"train step, last {n} blocks" + (" (whole network)" if n == 9 else ""), size=size,
            channels_last=cl, ms_per_image=_ms(_tail_step, m, policy, opt, Tail(m, k), hh, y))
        if n == 3 and size == 224 and cl:
            try:
                t = time.perf_counter()
                compiled = torch.compile(Tail(m, k))
                _tail_step(m, policy, opt, compiled, hh, y)
                row(part="train step, last 3 blocks, torch.compile", size=size, channels_last=cl,
                    compile_seconds=round(time.perf_counter() - t, 1),
                    ms_per_image=_ms(_tail_step, m, policy, opt, compiled, hh, y))
            except Exception as e:  # inductor needs a C++ toolchain; record why it did not run
                row(part="train step, last 3 blocks, torch.compile", size=size, error=str(e).splitlines()[0][:200])


def tail_step(threads: int) -> float:
    """ms per image of one stage-2 step (last 3 blocks, 224 px, batch 32, channels-last), min of 5."""
    from prodclass.features.backbones import create_backbone
    from prodclass.models.heads import Classifier, create_head
    from prodclass.models.policy import BackboneFinetuning
    from prodclass.models.split import Tail, prefix_forward

    torch.set_num_threads(threads)
    m = Classifier(create_backbone("efficientnet_lite0"), create_head("mlp", 1280, 37)).eval()
    policy = BackboneFinetuning(3)
    k = policy.split_index(m)
    with torch.no_grad():
        h = prefix_forward(m, torch.randn(32, 3, 224, 224), k).contiguous(memory_format=torch.channels_last)
    m.to(memory_format=torch.channels_last)
    policy.freeze(m)
    y = torch.randint(0, 37, (32,))
    return _ms(_tail_step, m, policy, policy.make_optimizer(m), Tail(m, k), h, y, reps=5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(CASES), action="append", help="run only this dataset (repeatable)")
    ap.add_argument("--speed", action="store_true", help="measure the stage-2 cost levers instead")
    ap.add_argument("--tail-step", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tail_step:
        print(tail_step(args.tail_step))
    else:
        speed() if args.speed else compare(args.only or list(CASES))


if __name__ == "__main__":
    main()
