"""The main job: catalog → curated split → embeddings → head (→ fine-tuning) → evaluation → report.

:func:`run` is what ``prodclass run CONFIG`` calls. Each stage is a call into its own package;
this module only wires them, passes their results on in memory and has the run directory
(:class:`prodclass.runs.RunDir`) write each file once. The test metrics are computed by the
:class:`~prodclass.serving.predictor.Predictor` loaded back from the saved run — the object
``predict``, ``serve`` and the demo use — so the report describes exactly what is served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from prodclass.catalog import read_catalog
from prodclass.config import RunConfig, dump_config, resolve_cache_dir
from prodclass.curate.rules import Dataset, curate
from prodclass.evaluation.abstention import fit_abstention
from prodclass.evaluation.calibration import calibrate
from prodclass.evaluation.metrics import per_class_table, test_metrics
from prodclass.evaluation.plots import plot_class_counts, plot_confusion
from prodclass.evaluation.report import ReportInputs, render_report
from prodclass.features.backbones import create_backbone, preprocessing_for
from prodclass.features.embeddings import EmbeddingCache, embed_images
from prodclass.models.heads import Classifier, create_head
from prodclass.models.serialization import save_classifier
from prodclass.models.train import train_head
from prodclass.runs import RunDir, RunDirError
from prodclass.serving.predictor import Predictor


@dataclass
class RunResult:
    """What :func:`run` returns: the run directory, its test metrics and per-class table."""

    run_dir: Path
    metrics: dict
    per_class: pd.DataFrame


@dataclass
class Evaluation:
    """Validation and test results of a saved model (all in memory; the pipeline writes them)."""

    logits: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    calibration: dict
    abstention: dict
    metrics: dict
    per_class: pd.DataFrame


def run(cfg: RunConfig, data_root: Path, run_dir: Path | None = None, progress: bool = True, echo=print,
        resume: bool = False, force: bool = False) -> RunResult:
    """Train and evaluate a classifier as ``cfg`` describes.

    Args:
        cfg: the resolved run configuration.
        data_root: where relative data paths in ``cfg.data`` point.
        run_dir: write here (default: a new ``cfg.output_dir/<name>-<timestamp>``).
        progress: show progress bars.
        echo: where one-line status messages go.
        resume: continue the killed run in ``run_dir`` (its stored split and fine-tuning checkpoint).
        force: with ``resume``, also retrain a finished run, replacing its model; without it such
            a run is refused before any work (see :func:`_refuse_finished`).

    Returns:
        :class:`RunResult` with the run directory, test metrics and the per-class table.

    Raises:
        prodclass.catalog.CatalogError, prodclass.curate.rules.CurationError,
        prodclass.preprocess.ImageError, prodclass.runs.RunDirError: bad input (the message
        names the file/row/class); RunDirError also for ``resume`` of a finished run without ``force``.
    """
    if resume and run_dir and not force:
        _refuse_finished(RunDir(run_dir))
    t_start = time.perf_counter()
    if cfg.embed.num_threads:
        torch.set_num_threads(cfg.embed.num_threads)
    dataset = _curated(cfg, data_root, echo)
    run = RunDir(run_dir) if run_dir else RunDir.create(cfg.output_dir, cfg.name)
    dataset = _start_run(run, cfg, dataset, resume)
    info, history, emb_stats, train_seconds = _train(run, cfg, dataset, progress, echo, resume)
    ev = evaluate_run(run, dataset, cfg, progress)
    metrics = {**ev.metrics, "num_classes": len(dataset.classes), "num_images": len(dataset.table),
               "split_sizes": _split_sizes(dataset), "epochs": len(history),
               "best_epoch": next((h["epoch"] for h in history if h.get("best")), len(history)),
               "embedding": emb_stats, "train_seconds": round(train_seconds, 2),
               "abstention": _abstention_summary(ev.abstention), "report": run.report_file.name,
               "wall_seconds": round(time.perf_counter() - t_start, 2)}
    metrics.update(info)
    run.write_metrics(metrics)
    run.write_report(render_report(_report_inputs(run, cfg, dataset, ev, metrics, history)))
    _echo_summary(echo, run, ev)
    return RunResult(run_dir=run.path, metrics=metrics, per_class=ev.per_class)


def _refuse_finished(run: RunDir) -> None:
    """Raise :class:`RunDirError` if ``run`` is finished: its test metrics record exists and no
    fine-tuning checkpoint waits to be continued (the checkpoint is removed before the metrics are
    written, so a finished run has none; a ``force`` retrain killed in fine-tuning leaves one, and
    is resumed without ``force``). Resuming a finished run would retrain it and replace the model
    that is being served.
    """
    if run.metrics_file.is_file() and not run.finetune_checkpoint.is_file():
        raise RunDirError(f"{run.metrics_file}: the run in {run.path} is finished (its test metrics exist); "
                          "resuming continues only a killed run. Retraining would replace its model: pass "
                          "force=True (`prodclass run --resume RUN_DIR --force`) to do that")


def _curated(cfg: RunConfig, data_root: Path, echo) -> Dataset:
    """Read the catalog and apply the curation rules (prints the counts)."""
    catalog = read_catalog(cfg.data, data_root)
    dataset = curate(catalog, cfg.data.label, cfg.curation)
    n = _split_sizes(dataset)
    echo(f"catalog: {len(catalog)} images, {catalog[cfg.data.label].nunique()} labels -> curated: "
         f"{len(dataset.table)} images, {len(dataset.classes)} classes "
         f"(train {n.get('train', 0)}, val {n.get('val', 0)}, test {n.get('test', 0)})")
    return dataset


def _start_run(run: RunDir, cfg: RunConfig, dataset: Dataset, resume: bool) -> Dataset:
    """Write the resolved config, versions and the stored split (``--resume``: the killed run's split)."""
    run.path.mkdir(parents=True, exist_ok=True)
    if resume and run.finetune_checkpoint.is_file():
        run.load_checkpoint(run.finetune_checkpoint)  # refuse a foreign file before any work is done
    run.write_config(dump_config(cfg))
    run.write_versions()
    if resume and run.has_dataset():
        dataset = Dataset.load(run)
    dataset.save(run)
    run.write_figure(run.class_counts_plot, plot_class_counts(dataset.counts))
    return dataset


def _train(run: RunDir, cfg: RunConfig, dataset: Dataset, progress: bool, echo, resume: bool):
    """Stage 1 (head on cached embeddings), then stage 2 (fine-tuning) when enabled; saves the model.

    Returns:
        ``(info, history, embedding stats, head-training seconds)``; ``info`` holds ``finetune``
        figures when stage 2 ran.
    """
    prep = preprocessing_for(cfg.model.backbone, cfg.finetune.input_size if cfg.finetune.enabled else None)
    backbone = create_backbone(cfg.model.backbone, weights=cfg.model.weights, preprocessing=prep)
    emb, emb_stats = _embed(cfg, backbone, dataset, progress, echo)
    y, split = dataset.labels(), dataset.table["split"].to_numpy()
    tr, va = split == "train", split == "val"
    torch.manual_seed(cfg.train.seed)  # head initialisation is part of the seeded run
    head = create_head(cfg.model.head, backbone.embed_dim, len(dataset.classes), cfg.model.hidden_dim,
                       cfg.model.dropout)
    t0 = time.perf_counter()
    history = train_head(head, emb[tr], y[tr], emb[va], y[va], cfg.train, progress=progress)
    train_seconds = time.perf_counter() - t0
    model = Classifier(backbone, head).eval()
    head_cfg = {"kind": cfg.model.head, "hidden_dim": cfg.model.hidden_dim, "dropout": cfg.model.dropout}
    best = next((h["epoch"] for h in history if h.get("best")), len(history))
    save_classifier(run, model, dataset.classes, head_cfg, stage="head", epoch=best)
    info = {}
    if cfg.finetune.enabled:
        from prodclass.models.finetune import finetune

        ft = finetune(model, dataset, cfg, run, resume=resume, progress=progress, echo=echo)
        history = history + ft.history
        save_classifier(run, model, dataset.classes, head_cfg, stage="finetune", epoch=ft.best_epoch)
        run.finetune_checkpoint.unlink(missing_ok=True)
        info["finetune"] = ft.info
    run.write_history(history)
    return info, history, emb_stats, train_seconds


def _embed(cfg: RunConfig, backbone, dataset: Dataset, progress: bool, echo) -> tuple[np.ndarray, dict]:
    """Embeddings of every curated image, through the content-hash keyed cache."""
    cache = EmbeddingCache.for_backbone(resolve_cache_dir(cfg.embed.cache_dir), backbone, cfg.model.weights)
    emb, stats = embed_images(dataset.table["image_path"].tolist(), backbone, cache,
                              batch_size=cfg.embed.batch_size, progress=progress)
    if stats["cached"]:
        echo(f"embedding cache: reused {stats['cached']} of {stats['images']} embeddings "
             f"({cache.dir}), computed {stats['computed']}")
    else:
        echo(f"embedding cache: computed {stats['computed']} embeddings into {cache.dir}")
    return emb, stats


def evaluate_run(run: RunDir, dataset: Dataset, cfg: RunConfig, progress: bool = False) -> Evaluation:
    """Evaluate the model saved in ``run`` with the Predictor loaded from it, and store the results.

    Validation logits fit the temperature (calibration) and the abstention threshold; test logits
    give the metrics. Writes the predictions of both splits, calibration, abstention, the
    per-class table and the confusion matrix (each once).

    Returns:
        :class:`Evaluation`.
    """
    predictor = Predictor.from_run(run)
    predictor.temperature, predictor.threshold = 1.0, None  # raw logits: calibration is fitted on them here
    logits, labels = {}, {}
    for split in ("val", "test"):
        rows = dataset.split_table(split)
        logits[split] = predictor.logits(rows["image_path"].tolist(), progress=progress)[0]
        labels[split] = dataset.labels(split)
        run.write_predictions(split, rows, labels[split], logits[split])
    cal = calibrate(logits["val"], labels["val"], logits["test"], labels["test"])
    abst = fit_abstention(logits["val"], labels["val"], cal["temperature"], cfg.eval.target_precision,
                          logits["test"], labels["test"])
    metrics = test_metrics(labels["test"], logits["test"], dataset.classes, cal["temperature"], cfg.eval.top_k)
    y_pred = logits["test"].argmax(1)
    per_class = per_class_table(labels["test"], y_pred, dataset.classes)
    run.write_calibration(cal)
    run.write_abstention(abst)
    run.write_per_class(per_class)
    run.write_figure(run.confusion_plot, plot_confusion(labels["test"], y_pred, dataset.classes))
    return Evaluation(logits, labels, cal, abst, metrics, per_class)


def _report_inputs(run: RunDir, cfg: RunConfig, dataset: Dataset, ev: Evaluation, metrics: dict,
                   history: list[dict]) -> ReportInputs:
    test = dataset.split_table("test")
    return ReportInputs(cfg=cfg, run_name=run.path.name, classes=dataset.classes, y_true=ev.labels["test"],
                        logits=ev.logits["test"], image_paths=test["image_path"].tolist(), metrics=metrics,
                        calibration=ev.calibration, abstention=ev.abstention, history=history,
                        counts=dataset.counts, split_table=dataset.table[["label", "split"]],
                        versions=run.read_versions())


def _split_sizes(dataset: Dataset) -> dict[str, int]:
    return {k: int(v) for k, v in dataset.table["split"].value_counts().items()}


def _abstention_summary(abst: dict) -> dict:
    test = abst.get("test", {})
    return {"threshold": abst["threshold"], "target_precision": abst["target_precision"],
            "coverage": test.get("coverage"), "precision": test.get("precision")}


def _echo_summary(echo, run: RunDir, ev: Evaluation) -> None:
    cal, abst = ev.calibration, ev.abstention
    echo(f"calibration: T = {cal['temperature']:.3f}, test ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}"
         + (f" (warning: {cal['warning']})" if cal["warning"] else "") + f" | report: {run.report_file}")
    echo(f"abstention: threshold {abst['threshold']:.3f} for precision {abst['target_precision']:.2f} on val | "
         f"test coverage {abst['test']['coverage']:.3f}, precision among accepted {abst['test']['precision'] or 0:.3f}")
