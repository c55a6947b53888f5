"""``prodclass`` command line: thin commands over the stage APIs (no logic lives here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Turn a product catalog into a trained, evaluated, servable image classifier.")

DataRoot = typer.Option(None, "--data-root", envvar="PRODCLASS_DATA",
                        help="Folder that relative data paths in the config point into [default: ./data].")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="YAML run config, e.g. configs/abo-small.yaml (omit with --resume)"),
    data_root: Optional[Path] = DataRoot,
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Parent of the run directory [config: output_dir]."),
    set_: List[str] = typer.Option([], "--set", help="Override a config value: section.key=value (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    resume: Optional[Path] = typer.Option(None, "--resume", metavar="RUN_DIR",
                                          help="Continue a killed run in RUN_DIR (its config.yaml, split and checkpoint)."),
    device: Optional[str] = typer.Option(None, "--device", help="Fine-tuning device: cpu, cuda or auto [config: finetune.device]."),
) -> None:
    """Train and evaluate a classifier; print test accuracy, macro-F1 and the run directory."""
    from prodclass.catalog import CatalogError
    from prodclass.config import ConfigError, load_config, resolve_data_root
    from prodclass.curate.rules import CurationError
    from prodclass.evaluation.metrics import format_table
    from prodclass.features.backbones import WeightsError
    from prodclass.preprocess import ImageError

    if (config is None) == (resume is None):
        _fail("give a CONFIG file or --resume RUN_DIR (one of them)")
    try:
        cfg = load_config(config or resume / "config.yaml", set_ + ([f"output_dir={output_dir}"] if output_dir else [])
                          + ([f"finetune.device={device}"] if device else []))
        root = resolve_data_root(data_root)
        from prodclass.pipeline import run as run_pipeline

        result = run_pipeline(cfg, root, run_dir=resume, resume=resume is not None, progress=not quiet, echo=typer.echo)
    except (ConfigError, CatalogError, CurationError, ImageError, WeightsError, KeyError, ValueError) as e:
        _fail(str(e).strip("'\""))
    m = result.metrics
    typer.echo("\nper-class (worst first):\n" + format_table(result.per_class))
    typer.echo(
        f"\ntest accuracy {m['accuracy']:.4f} | macro-F1 {m['macro_f1']:.4f} | top-5 {m.get('top5_accuracy', float('nan')):.4f}"
        f" | {m['num_classes']} classes, {m['num_images']} images (test {m['n']})"
        f" | {m['wall_seconds']:.0f}s\nrun directory: {result.run_dir}"
    )


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A run directory written by `prodclass run`."),
    inputs: List[str] = typer.Argument(..., help="Image files, folders, glob patterns or catalog tables (.csv/.tsv/.parquet)."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image (JSON lines)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write all predictions here (.csv/.jsonl/.parquet); resumable."),
    review_out: Optional[Path] = typer.Option(None, "--review-out", help="With --out: also write the rows that abstain or failed here."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="Catalog column holding image paths (default: first of image_path, image, image_name, path, file, filename)."),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", help="Folder that relative catalog paths point into (default: the catalog's folder)."),
    backend: str = typer.Option("auto", "--backend", help="torch, onnx (the run's model.onnx), onnx-int8 or auto (onnx if exported)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    chunk_size: int = typer.Option(512, "--chunk-size", min=1, help="Images per resumable chunk."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Top-k labels with probabilities: printed, or written to a file with --out (batched, resumable)."""
    from prodclass.serving.batch import expand_inputs, predict_to_file
    from prodclass.serving.predictor import Predictor

    if review_out and not out:
        _fail("--review-out needs --out")
    try:
        images = expand_inputs(inputs, image_column=image_column, image_dir=image_dir)
        predictor = Predictor.from_run(run_dir, backend=backend)
        if out:
            s = predict_to_file(predictor, images, out, review_out, top_k=top_k, batch_size=batch_size,
                                chunk_size=chunk_size, progress=not quiet, echo=lambda m: typer.echo(m, err=True))
            typer.echo(f"{s['n']} images: {s['predicted']} predicted, {s['abstained']} abstain, {s['errors']} errors"
                       f" ({s['images_per_s']} img/s) -> {out}" + (f"; review: {s['review']['rows']} rows -> {review_out}" if review_out else ""))
            return
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    for path, p in zip(images, predictor.iter_predict(images, top_k=top_k, batch_size=batch_size), strict=True):
        if as_json:
            typer.echo(json.dumps({"image": str(path), **p.to_dict()}))
        elif p.error:
            typer.echo(f"{path}: ERROR {p.error}")
        else:
            ranked = ", ".join(f"{l} {q:.3f}" for l, q in zip(p.labels, p.probs, strict=True))
            typer.echo(f"{path}: {ranked}" + ("  [abstain: send to review]" if p.abstain else ""))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run directory written by `prodclass run`."),
    opset: int = typer.Option(17, "--opset", min=11),
    int8: bool = typer.Option(False, "--int8", help="Also write model.int8.onnx (static INT8; faster, not exact)."),
) -> None:
    """Write model.onnx (+ model.onnx.json sidecar) into the run directory, checked against torch."""
    from prodclass.serving.export import ExportError, export_onnx

    try:
        s = export_onnx(run_dir, opset=opset, int8=int8)
    except (FileNotFoundError, ValueError, ExportError) as e:
        _fail(str(e))
    par = s["parity"]
    typer.echo(f"{run_dir / 'model.onnx'}: opset {opset}, max |p_onnx - p_torch| {par['max_abs_diff']:.1e}, "
               f"top-1 agreement {par['top1_agree']:.3f} on {par['n']} images")
    if int8:
        q = s["int8"]
        typer.echo(f"{run_dir / q['file']}: test accuracy {q['test_accuracy_int8']:.4f} (float {q['test_accuracy_fp32']:.4f}), "
                   f"top-1 agreement {q['top1_agree']:.3f} on {q['test_n']} images")


@app.command()
def backbones() -> None:
    """List the registered backbones."""
    from prodclass.features.backbones import get_spec, list_backbones

    for name in list_backbones():
        s = get_spec(name)
        typer.echo(f"{name}\t{s.timm_name}\tinput {s.preprocessing.input_size}px\tembedding {s.embed_dim}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory written by `prodclass run`.")) -> None:
    """Rewrite the run's self-contained report.html from its stored predictions (metrics.json is left as it is)."""
    from prodclass.evaluation.report import inputs_from_run, render_report
    from prodclass.runs import RunDir

    try:
        run = RunDir.open(run_dir)
        inputs = inputs_from_run(run)
        run.write_report(render_report(inputs))
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    m = inputs.metrics
    ece = f"{m['ece_before']:.4f}"
    if m["ece_after"] is not None:
        ece += f" -> {m['ece_after']:.4f} (T = {m['temperature']:.3f})"
    typer.echo(f"accuracy {m['accuracy']:.4f} | macro-F1 {m['macro_f1']:.4f} | ROC AUC macro {m['roc_auc_macro']:.4f}"
               f" | ECE {ece}\nreport: {run.report_file}")


@app.command()
def migrate(run_dir: Path = typer.Argument(..., help="A run directory with a format-1 model.pt, from a source you trust.")) -> None:
    """Convert a format-1 model (torch.save file) to the safe format (safetensors weights + JSON)."""
    from prodclass.runs import RunDir

    try:
        meta = RunDir(run_dir).migrate_legacy_model()
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"{run_dir}: converted to the safe model format ({meta['backbone']}, {len(meta['classes'])} classes)")


@app.command()
def compare(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories to compare."),
    output: List[Path] = typer.Option([], "--output", "-o", help="Also write the table: .md or .csv (repeatable)."),
) -> None:
    """Print a Markdown table of the headline test metrics of several runs."""
    from prodclass.evaluation.compare import compare_runs, markdown_table, write_comparison

    try:
        table = compare_runs(run_dirs)
        for path in output:
            write_comparison(table, path)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(markdown_table(table), nl=False)


@app.command()
def serve(
    run_dir: Path = typer.Argument(..., help="A run directory written by `prodclass run`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port"),
    max_body_mb: Optional[float] = typer.Option(None, "--max-body-mb", help="Largest request body, MiB [16]."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Largest image, width x height [64e6]."),
    max_files: Optional[int] = typer.Option(None, "--max-files", help="Most images in one request [16]."),
    backend: str = typer.Option("torch", "--backend", help="torch, onnx, onnx-int8 or auto (onnx when exported)."),
) -> None:
    """REST API: POST /v1/predict, GET /v1/model, GET /health; OpenAPI docs at /docs."""
    from prodclass.serving.api import serve as run_server

    limits = {"max_body_bytes": None if max_body_mb is None else int(max_body_mb * 1024 * 1024),
              "max_pixels": max_pixels, "max_files": max_files}
    try:
        run_server(run_dir, host=host, port=port, backend=backend,
                   **{k: v for k, v in limits.items() if v is not None})
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


@app.command()
def demo(
    run_dir: Path = typer.Argument(..., help="A run directory written by `prodclass run`."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(7860, "--port"),
    backend: str = typer.Option("torch", "--backend", help="torch, onnx, onnx-int8 or auto (onnx when exported)."),
) -> None:
    """Web demo (Gradio): upload or take a product photo, see the top-5 product types."""
    try:
        from prodclass.serving.demo import launch_demo
    except ImportError as e:
        _fail(f"the demo needs gradio ({e}): pip install 'prodclass[demo]'")
    try:
        launch_demo(run_dir, host=host, port=port, backend=backend)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


if __name__ == "__main__":
    app()
