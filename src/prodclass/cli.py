"""``prodclass`` command line: thin commands over the stage APIs (no logic lives here).

Errors: a failure the user can cause prints one line, ``error: <file>: <problem>``, on stderr
and exits with status 2 (``predict`` also exits 1 when rows failed, see its help);
``prodclass --debug COMMAND ...`` raises it instead, with its traceback.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import List, Optional

import click
import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Turn a product catalog into a trained, evaluated, servable image classifier.")

DataRoot = typer.Option(None, "--data-root", envvar="PRODCLASS_DATA",
                        help="Folder that relative data paths in the config point into [default: ./data].")
_OPTIONS = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="On an error, raise it with its Python traceback "
                                                            "instead of printing one line (give before the command).")) -> None:
    """Turn a product catalog into a trained, evaluated, servable image classifier."""
    _OPTIONS["debug"] = debug


def _fail(msg: str) -> None:
    typer.secho(f"error: {_one_line(msg)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _one_line(msg: object) -> str:
    return "; ".join(line.strip() for line in str(msg).splitlines() if line.strip())


def _describe(e: BaseException) -> str:
    """One line for an exception: its message (which names the file), or the file and OS error."""
    if isinstance(e, KeyError) and e.args:
        return _one_line(e.args[0])
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}" + (f" ({e.filename2})" if e.filename2 else "")
    msg = _one_line(e) or type(e).__name__
    if isinstance(e, (ValueError, OSError, RuntimeError)):
        return msg
    return f"{msg} ({type(e).__name__}; `prodclass --debug ...` shows the traceback)"


def _user_errors(command):
    """Decorate a command: an exception leaving it becomes one line on stderr and exit status 2
    (with ``--debug``: raised as is). typer's own exits and usage errors pass through."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as e:
            if _OPTIONS["debug"]:
                raise
            _fail(_describe(e))

    return wrapper


def _open_run(path: Path, command: str):
    """``path`` as a :class:`prodclass.runs.RunDir` holding a model.

    Raises:
        prodclass.runs.RunDirError: ``path`` is a file (a file of a run names its directory),
            not a directory, or a directory without a loadable model.
    """
    from prodclass.runs import RunDir, RunDirError

    if path.exists() and not path.is_dir():
        hint = f" (this file's run directory is {path.parent})" if RunDir(path.parent).model_meta_file.is_file() else ""
        extra = ", or an exported .onnx file with its .onnx.json sidecar" if command == "predict" else ""
        raise RunDirError(f"{path}: is a file; `prodclass {command}` takes a run directory written by "
                          f"`prodclass run`{extra}{hint}")
    return RunDir.open(path)


def _load_predictor(model: Path, backend: str):
    """The Predictor of a run directory, or of an exported ``.onnx`` file with its sidecar.

    Raises:
        prodclass.runs.RunDirError: not a run directory / export, or a model that cannot be
            loaded (the message names the file).
        FileNotFoundError: an ONNX export or its sidecar is missing (names it).
    """
    from prodclass.runs import RunDirError, sidecar_path
    from prodclass.serving.predictor import Predictor

    onnx = model.suffix.lower() == ".onnx" and model.is_file()
    if onnx and backend not in ("auto", "onnx"):
        _fail(f"{model}: --backend {backend} needs a run directory (an .onnx file runs on the onnx backend)")
    run = None if onnx else _open_run(model, "predict")
    try:
        return Predictor.from_onnx(model) if onnx else Predictor.from_run(run, backend=backend)
    except (RunDirError, FileNotFoundError):
        raise
    except json.JSONDecodeError as e:
        side = sidecar_path(model if onnx else run.onnx_file(int8=backend == "onnx-int8"))
        raise RunDirError(f"{side}: unreadable JSON ({e})") from e
    except Exception as e:  # onnxruntime and torch raise their own types for a damaged model file
        msg = f"{_one_line(e)} ({type(e).__name__})"
        raise RunDirError(msg if str(model) in msg else f"{model}: cannot load the model: {msg}") from e


@app.command()
@_user_errors
def run(
    config: Optional[Path] = typer.Argument(None, help="YAML run config, e.g. configs/abo-small.yaml (omit with --resume)"),
    data_root: Optional[Path] = DataRoot,
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Parent of the run directory [config: output_dir]."),
    set_: List[str] = typer.Option([], "--set", help="Override a config value: section.key=value (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    resume: Optional[Path] = typer.Option(None, "--resume", metavar="RUN_DIR",
                                          help="Continue a killed run in RUN_DIR (its config.yaml, split and checkpoint)."),
    force: bool = typer.Option(False, "--force", help="With --resume: train a finished run again, replacing its model."),
    device: Optional[str] = typer.Option(None, "--device", help="Fine-tuning device: cpu, cuda or auto [config: finetune.device]."),
) -> None:
    """Train and evaluate a classifier; print test accuracy, macro-F1 and the run directory.

    --resume continues a killed run; it refuses a finished one (test metrics written, no fine-tuning checkpoint waiting), which it would retrain, replacing the served model, unless --force is given.
    """
    from prodclass.config import load_config, resolve_data_root
    from prodclass.evaluation.metrics import format_table
    from prodclass.pipeline import run as run_pipeline
    from prodclass.runs import RunDir

    if (config is None) == (resume is None):
        _fail("give a CONFIG file or --resume RUN_DIR (one of them)")
    if force and resume is None:
        _fail("--force goes with --resume RUN_DIR")
    cfg = load_config(config or RunDir(resume).config_file, set_ + ([f"output_dir={output_dir}"] if output_dir else [])
                      + ([f"finetune.device={device}"] if device else []))
    root = resolve_data_root(data_root)
    result = run_pipeline(cfg, root, run_dir=resume, resume=resume is not None, force=force, progress=not quiet,
                          echo=typer.echo)
    m = result.metrics
    typer.echo("\nper-class (worst first):\n" + format_table(result.per_class))
    typer.echo(
        f"\ntest accuracy {m['accuracy']:.4f} | macro-F1 {m['macro_f1']:.4f} | top-5 {m.get('top5_accuracy', float('nan')):.4f}"
        f" | {m['num_classes']} classes, {m['num_images']} images (test {m['n']})"
        f" | {m['wall_seconds']:.0f}s\nrun directory: {result.run_dir}"
    )


@app.command()
@_user_errors
def predict(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run directory written by `prodclass run`, or an "
                                   "exported .onnx file with its .onnx.json sidecar beside it (`prodclass export`; "
                                   "classes, preprocessing, temperature and threshold come from the sidecar)."),
    inputs: List[str] = typer.Argument(..., help="Image files, folders, glob patterns or catalog tables (.csv/.tsv/.parquet)."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image (JSON lines); the counts go to stderr."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write all predictions here (.csv/.jsonl/.parquet); resumable; "
                                       "one job at a time (<out>.lock)."),
    review_out: Optional[Path] = typer.Option(None, "--review-out", help="With --out: also write the rows that abstain or failed here."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="Catalog column holding image paths (default: first of image_path, image, image_name, path, file, filename)."),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", help="Folder that relative catalog paths point into (default: the catalog's folder)."),
    backend: str = typer.Option("auto", "--backend", help="torch, onnx (the run's ONNX export), onnx-int8 or auto (onnx if exported)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    chunk_size: int = typer.Option(512, "--chunk-size", min=1, help="Images per resumable chunk."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when any input failed (default: only when none was classified)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Top-k labels with probabilities: printed, or written to a file with --out (batched, resumable).

    Every file, link and catalog row given yields one row: its labels, or its error (a missing, empty or broken file, a broken or looping symbolic link, a malformed catalog row naming its line and column). Symbolic links to folders are followed; hidden files (.*) in folders are skipped. The counts (predicted, abstain, errors) are always printed.

    Exit status: 0 = at least one input classified (failed rows carry their error); 1 = no input could be classified, or --strict and any input failed; 2 = usage or input error before any prediction (bad option, not a run directory, a model or catalog that cannot be read, an --out that cannot be written or that another job is writing).
    """
    from prodclass.serving.batch import check_output, expand_inputs, predict_to_file

    if review_out and not out:
        _fail("--review-out needs --out")
    if out:
        check_output(out, review_out)
    images = expand_inputs(inputs, image_column=image_column, image_dir=image_dir)
    predictor = _load_predictor(run_dir, backend)
    if out:
        s = predict_to_file(predictor, images, out, review_out, top_k=top_k, batch_size=batch_size,
                            chunk_size=chunk_size, progress=not quiet, echo=lambda m: typer.echo(m, err=True))
        typer.echo(f"{_counts(s)} ({s['images_per_s']} img/s) -> {out}"
                   + (f"; review: {s['review']['rows']} rows -> {review_out}" if review_out else ""))
    else:
        s = _print_predictions(predictor, images, top_k, batch_size, as_json)
        typer.echo(_counts(s), err=as_json)
    if s["predicted"] == 0:
        typer.secho(f"error: {'no input' if not s['n'] else 'no input could be classified'}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    if strict and s["errors"]:
        typer.secho(f"error: --strict: {s['errors']} of {s['n']} inputs failed", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)


def _counts(s: dict) -> str:
    return f"{s['n']} images: {s['predicted']} predicted, {s['abstained']} abstain, {s['errors']} errors"


def _print_predictions(predictor, images: list[str], top_k: int, batch_size: int, as_json: bool) -> dict:
    """Print one line per input (text, or JSON lines) and return the counts (see ``batch.summarize``)."""
    from prodclass.serving.batch import iter_predictions, shown_path

    s = {"n": 0, "predicted": 0, "abstained": 0, "errors": 0}
    for path, p in zip(images, iter_predictions(predictor, images, top_k=top_k, batch_size=batch_size), strict=True):
        s["n"] += 1
        s["errors"] += p.error is not None
        s["abstained"] += bool(p.abstain)
        shown, error = shown_path(path), p.error and shown_path(p.error)
        if as_json:
            typer.echo(json.dumps({"image": shown, **p.to_dict(), "error": error}))
        elif p.error:
            typer.echo(f"{shown}: ERROR {error}")
        else:
            ranked = ", ".join(f"{l} {q:.3f}" for l, q in zip(p.labels, p.probs, strict=True))
            typer.echo(f"{shown}: {ranked}" + ("  [abstain: send to review]" if p.abstain else ""))
    s["predicted"] = s["n"] - s["errors"]
    return s


@app.command()
@_user_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run directory written by `prodclass run`."),
    opset: int = typer.Option(17, "--opset", min=11),
    int8: bool = typer.Option(False, "--int8", help="Also write model.int8.onnx (static INT8; faster, not exact)."),
) -> None:
    """Write model.onnx (+ model.onnx.json sidecar) into the run directory, checked against torch."""
    from prodclass.serving.export import export_onnx

    run = _open_run(run_dir, "export")
    s = export_onnx(run.path, opset=opset, int8=int8)
    par = s["parity"]
    typer.echo(f"{run.onnx_file()}: opset {opset}, max |p_onnx - p_torch| {par['max_abs_diff']:.1e}, "
               f"top-1 agreement {par['top1_agree']:.3f} on {par['n']} images")
    if int8:
        q = s["int8"]
        typer.echo(f"{run.onnx_file(int8=True)}: test accuracy {q['test_accuracy_int8']:.4f} "
                   f"(float {q['test_accuracy_fp32']:.4f}), top-1 agreement {q['top1_agree']:.3f} on {q['test_n']} images")


@app.command()
@_user_errors
def backbones() -> None:
    """List the registered backbones."""
    from prodclass.features.backbones import get_spec, list_backbones

    for name in list_backbones():
        s = get_spec(name)
        typer.echo(f"{name}\t{s.timm_name}\tinput {s.preprocessing.input_size}px\tembedding {s.embed_dim}")


@app.command()
@_user_errors
def report(run_dir: Path = typer.Argument(..., help="A run directory written by `prodclass run`.")) -> None:
    """Rewrite the run's self-contained report.html from its stored predictions (metrics.json is left as it is)."""
    from prodclass.evaluation.report import inputs_from_run, render_report

    run = _open_run(run_dir, "report")
    inputs = inputs_from_run(run)
    run.write_report(render_report(inputs))
    m = inputs.metrics
    ece = f"{m['ece_before']:.4f}"
    if m["ece_after"] is not None:
        ece += f" -> {m['ece_after']:.4f} (T = {m['temperature']:.3f})"
    typer.echo(f"accuracy {m['accuracy']:.4f} | macro-F1 {m['macro_f1']:.4f} | ROC AUC macro {m['roc_auc_macro']:.4f}"
               f" | ECE {ece}\nreport: {run.report_file}")


@app.command()
@_user_errors
def migrate(run_dir: Path = typer.Argument(..., help="A run directory with a format-1 model.pt, from a source you trust.")) -> None:
    """Convert a format-1 model (torch.save file) to the safe format (safetensors weights + JSON)."""
    from prodclass.runs import RunDir

    meta = RunDir(run_dir).migrate_legacy_model()
    typer.echo(f"{run_dir}: converted to the safe model format ({meta['backbone']}, {len(meta['classes'])} classes)")


@app.command()
@_user_errors
def compare(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories to compare."),
    output: List[Path] = typer.Option([], "--output", "-o", help="Also write the table: .md or .csv (repeatable)."),
) -> None:
    """Print a Markdown table of the headline test metrics of several runs."""
    from prodclass.evaluation.compare import compare_runs, markdown_table, write_comparison

    table = compare_runs(run_dirs)
    for path in output:
        write_comparison(table, path)
    typer.echo(markdown_table(table), nl=False)


@app.command()
@_user_errors
def serve(
    run_dir: Path = typer.Argument(..., help="A run directory written by `prodclass run`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port"),
    max_body_mb: Optional[float] = typer.Option(None, "--max-body-mb", help="Largest request body, MiB [16]."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Largest image, width x height [64e6]."),
    max_files: Optional[int] = typer.Option(None, "--max-files", help="Most images in one request [16]."),
    max_request_pixels: Optional[int] = typer.Option(
        None, "--max-request-pixels", help="Most pixels of all images of one request together [64e6]; more: 413."),
    max_concurrent: Optional[int] = typer.Option(
        None, "--max-concurrent", help="Prediction requests in the server at once [64]; more: 503 + Retry-After."),
    read_timeout: Optional[float] = typer.Option(
        None, "--read-timeout", help="Seconds to send a request's headers, and again its body [30]; then closed/408."),
    max_connections: Optional[int] = typer.Option(
        None, "--max-connections", help="Open connections before new requests get 503 (uvicorn) [512]."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="PRODCLASS_API_KEY", show_envvar=True,
        help="Require this key (X-API-Key or Authorization: Bearer) on every path but /health and the docs."),
    cors_origin: List[str] = typer.Option(
        [], "--cors-origin", help="Allow browser calls from this origin, e.g. https://shop.example (repeatable)."),
    backend: str = typer.Option("torch", "--backend", help="torch, onnx, onnx-int8 or auto (onnx when exported)."),
) -> None:
    """REST API: POST /v1/predict, GET /v1/model, GET /health; OpenAPI docs at /docs."""
    from prodclass.serving.api import serve as run_server

    if api_key is not None and not api_key.strip():
        _fail("--api-key / PRODCLASS_API_KEY is empty: set a key, or unset it to serve without one")
    limits = {"max_body_bytes": None if max_body_mb is None else int(max_body_mb * 1024 * 1024),
              "max_pixels": max_pixels, "max_files": max_files, "max_request_pixels": max_request_pixels,
              "max_concurrent": max_concurrent, "read_timeout": read_timeout, "max_connections": max_connections}
    run_server(_open_run(run_dir, "serve").path, host=host, port=port, backend=backend, api_key=api_key,
               cors_origins=tuple(cors_origin), **{k: v for k, v in limits.items() if v is not None})


@app.command()
@_user_errors
def demo(
    run_dir: Path = typer.Argument(..., help="A run directory written by `prodclass run`."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(7860, "--port"),
    backend: str = typer.Option("torch", "--backend", help="torch, onnx, onnx-int8 or auto (onnx when exported)."),
) -> None:
    """Web demo (Gradio): upload or take a product photo, see the top-5 product types."""
    run = _open_run(run_dir, "demo")
    try:
        from prodclass.serving.demo import launch_demo
    except ImportError as e:
        _fail(f"the demo needs gradio ({e}): pip install 'prodclass[demo]'")
    launch_demo(run.path, host=host, port=port, backend=backend)


if __name__ == "__main__":
    app()
