"""The main job: catalog → curated split → embeddings → head → evaluation, in one run directory.

:func:`run` is what ``prodclass run CONFIG`` calls. Each stage is a call into its own module;
this function only wires them and writes the run directory (layout in :mod:`prodclass.runs`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from prodclass.config import RunConfig, dump_config, resolve_cache_dir
from prodclass.io import write_dataframe, write_json, write_text

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    per_class: pd.DataFrame


def run(cfg: RunConfig, data_root: Path, run_dir: Path | None = None, progress: bool = True, echo=print,
        resume: bool = False) -> RunResult:
    """Train and evaluate a classifier as ``cfg`` describes.

    Args:
        cfg: the resolved run configuration.
        data_root: where relative data paths in ``cfg.data`` point.
        run_dir: write here (default: a new ``cfg.output_dir/<name>-<timestamp>``).
        progress: show progress bars.
        echo: where one-line status messages go.
        resume: continue the killed run in ``run_dir`` (its stored split and fine-tuning checkpoint).

    Returns:
        :class:`RunResult` with the run directory, test metrics and the per-class table.

    Raises:
        prodclass.catalog.CatalogError, prodclass.curate.rules.CurationError,
        prodclass.preprocess.ImageError: bad input (the message names file/row/class).
    """
    from prodclass.features.backbones import create_backbone
    from prodclass.catalog import read_catalog
    from prodclass.curate.rules import Dataset, curate
    from prodclass.features.embeddings import EmbeddingCache, embed_images
    from prodclass.evaluation.metrics import classification_metrics, per_class_table, plot_confusion_matrix
    from prodclass.models.heads import Classifier, create_head
    from prodclass.runs import new_run_dir, save_model, write_versions
    from prodclass.models.train import train_head

    t_start = time.perf_counter()
    if cfg.embed.num_threads:
        torch.set_num_threads(cfg.embed.num_threads)
    catalog = read_catalog(cfg.data, data_root)
    dataset = curate(catalog, cfg.data.label, cfg.curation)
    n_per_split = dataset.table["split"].value_counts().to_dict()
    echo(f"catalog: {len(catalog)} images, {catalog[cfg.data.label].nunique()} labels -> curated: "
         f"{len(dataset.table)} images, {len(dataset.classes)} classes "
         f"(train {n_per_split.get('train', 0)}, val {n_per_split.get('val', 0)}, test {n_per_split.get('test', 0)})")

    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg.output_dir, cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", dump_config(cfg))
    write_versions(run_dir)
    if resume and (run_dir / "dataset.parquet").is_file():  # --resume: the split the killed run stored
        dataset = Dataset.load(run_dir)
    dataset.save(run_dir)

    from prodclass.models.finetune import run_preprocessing

    backbone = create_backbone(cfg.model.backbone, weights=cfg.model.weights, preprocessing=run_preprocessing(cfg))
    cache = EmbeddingCache.for_backbone(resolve_cache_dir(cfg.embed.cache_dir), backbone, cfg.model.weights)
    paths = dataset.table["image_path"].tolist()
    emb, emb_stats = embed_images(paths, backbone, cache, batch_size=cfg.embed.batch_size, progress=progress)
    if emb_stats["cached"]:
        echo(f"embedding cache: reused {emb_stats['cached']} of {emb_stats['images']} embeddings "
             f"({cache.dir}), computed {emb_stats['computed']}")
    else:
        echo(f"embedding cache: computed {emb_stats['computed']} embeddings into {cache.dir}")

    split = dataset.table["split"].to_numpy()
    y = dataset.labels()
    tr, va, te = (split == "train"), (split == "val"), (split == "test")
    torch.manual_seed(cfg.train.seed)  # head initialisation is part of the seeded run
    head = create_head(cfg.model.head, backbone.embed_dim, len(dataset.classes), cfg.model.hidden_dim, cfg.model.dropout)
    t_train = time.perf_counter()
    history = train_head(head, emb[tr], y[tr], emb[va], y[va], cfg.train,
                         checkpoint_path=run_dir / "head_best.pt", progress=progress)
    train_seconds = time.perf_counter() - t_train
    write_json(run_dir / "history.json", history)

    model = Classifier(backbone, head).eval()
    head_cfg = {"kind": cfg.model.head, "hidden_dim": cfg.model.hidden_dim, "dropout": cfg.model.dropout}
    best_epoch = next((h["epoch"] for h in history if h["best"]), len(history))
    save_model(run_dir, model, dataset.classes, head_cfg, extra={"epoch": best_epoch, "stage": "head"})
    (run_dir / "head_best.pt").unlink(missing_ok=True)

    if cfg.finetune.enabled:  # stage 2 (prodclass.models.finetune): unfreeze the last blocks, train on images
        from prodclass.models.finetune import finetune, predict_logits

        ft = finetune(model, dataset, cfg, run_dir, resume=resume, progress=progress, echo=echo)
        history, best_epoch = history + ft.history, ft.best_epoch
        write_json(run_dir / "history.json", history)
        save_model(run_dir, model, dataset.classes, head_cfg, extra={"epoch": best_epoch, "stage": "finetune"})
        logits = {name: predict_logits(model, dataset.table.loc[mask, "image_path"].tolist(), device=ft.info["device"])
                  for name, mask in (("val", va), ("test", te))}
        (run_dir / "finetune_last.pt").unlink(missing_ok=True)
    else:
        with torch.no_grad():
            logits = {name: head(torch.from_numpy(emb[mask])).numpy() for name, mask in (("val", va), ("test", te))}
    probs = torch.softmax(torch.from_numpy(logits["test"]), 1).numpy()
    metrics = classification_metrics(y[te], probs, dataset.classes, top_k=cfg.eval.top_k)
    per_class = per_class_table(y[te], probs.argmax(1), dataset.classes)
    write_dataframe(run_dir / "per_class.csv", per_class)
    plot_confusion_matrix(y[te], probs.argmax(1), dataset.classes, run_dir / "confusion_matrix.png")
    for name, mask in (("val", va), ("test", te)):
        save_predictions(run_dir / f"predictions_{name}.parquet", dataset.table[mask], y[mask], logits[name])
    metrics.update({
        "num_classes": len(dataset.classes), "num_images": len(dataset.table),
        "split_sizes": {k: int(v) for k, v in n_per_split.items()},
        "epochs": len(history), "best_epoch": best_epoch,
        "embedding": emb_stats, "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    })
    if cfg.finetune.enabled:
        metrics["finetune"] = ft.info
    write_json(run_dir / "metrics.json", metrics)
    from prodclass.evaluation.calibration import calibrate_run
    from prodclass.evaluation.report import write_report

    from prodclass.evaluation.abstention import fit_abstention

    cal = calibrate_run(run_dir)  # calibration.json: temperature fitted on validation NLL
    # abstention.json: threshold reaching the target precision on validation; test coverage/precision at it
    abst = fit_abstention(run_dir, cfg.eval.target_precision)
    metrics["abstention"] = {"threshold": abst["threshold"], "target_precision": abst["target_precision"],
                             "coverage": abst["test"]["coverage"], "precision": abst["test"]["precision"]}
    write_json(run_dir / "metrics.json", metrics)
    metrics = write_report(run_dir)  # report.html; metrics.json gains ECE before/after, ROC/PR AUC
    echo(f"calibration: T = {cal['temperature']:.3f}, test ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}"
         + (f" (warning: {cal['warning']})" if cal["warning"] else "") + f" | report: {run_dir / 'report.html'}")
    echo(f"abstention: threshold {abst['threshold']:.3f} for precision {abst['target_precision']:.2f} on val | "
         f"test coverage {abst['test']['coverage']:.3f}, precision among accepted {abst['test']['precision'] or 0:.3f}")
    return RunResult(run_dir=run_dir, metrics=metrics, per_class=per_class)


def save_predictions(path: Path, rows: pd.DataFrame, y_true: np.ndarray, logits: np.ndarray) -> None:
    """Write one split's predictions: ``image_path, item_id, y_true, y_pred, logits`` (float32 list
    of length C per row; softmax them, after temperature scaling, for probabilities)."""
    write_dataframe(path, pd.DataFrame({
        "image_path": rows["image_path"].to_numpy(), "item_id": rows["item_id"].to_numpy(),
        "y_true": y_true, "y_pred": logits.argmax(1), "logits": list(logits.astype(np.float32)),
    }))


def load_predictions(run_dir: Path, split: str = "test") -> tuple[pd.DataFrame, np.ndarray]:
    """Read ``predictions_<split>.parquet``: the table and its logits as float32 ``(N, C)``."""
    t = pd.read_parquet(Path(run_dir) / f"predictions_{split}.parquet")
    return t, np.stack(t["logits"].to_numpy()).astype(np.float32)
