"""Comparing runs: the headline test metrics of several run directories in one table.

Owns ``prodclass compare``: :func:`compare_runs` reads each run's stored metrics and config
through :class:`prodclass.runs.RunDir` (it computes nothing), :func:`markdown_table` renders the
table for the terminal, :func:`write_comparison` saves it where the user asked (``.md``/``.csv``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from prodclass.io import write_dataframe, write_text
from prodclass.runs import RunDir

# metrics key -> column label, in table order
COMPARE_COLUMNS = {"accuracy": "accuracy", "top5_accuracy": "top-5", "macro_f1": "macro F1",
                   "weighted_f1": "weighted F1", "log_loss": "log loss", "ece_before": "ECE",
                   "ece_after": "ECE (T)", "roc_auc_macro": "ROC AUC macro", "average_precision_macro": "AP macro"}


def compare_runs(run_dirs: list[str | Path]) -> pd.DataFrame:
    """Headline test metrics of several runs, one row each, in the order given.

    Args:
        run_dirs: run directories written by ``prodclass run``.

    Returns:
        Columns ``run, backbone, head, classes, test images`` and :data:`COMPARE_COLUMNS`' labels;
        a value a run does not have is NaN (backbone/head None for a run without its config).

    Raises:
        prodclass.runs.RunDirError: a directory without stored metrics, or with a malformed
            metrics or config file (the message names the file).
    """
    rows = []
    for d in run_dirs:
        run = RunDir(d)
        m = run.read_metrics()
        model = run.read_config().model if run.config_file.is_file() else None
        row = {"run": run.path.name, "backbone": model.backbone if model else None,
               "head": model.head if model else None, "classes": m.get("num_classes"), "test images": m.get("n")}
        row.update({label: m.get(key) for key, label in COMPARE_COLUMNS.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table: numeric columns right-aligned, floats to ``digits``
    places, missing values as ``–``, ``|`` in text escaped."""
    cells = [[_md(v, digits) for v in r] for r in df.itertuples(index=False)]
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in cells]) + "\n"


def _md(v, digits: int) -> str:
    if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v).replace("|", "\\|")


def write_comparison(df: pd.DataFrame, path: str | Path) -> None:
    """Write a :func:`compare_runs` table to a file of the user's as Markdown (``.md``) or CSV (``.csv``).

    Raises:
        ValueError: another suffix.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".md":
        write_text(path, markdown_table(df))
    elif suffix == ".csv":
        write_dataframe(path, df)
    else:
        raise ValueError(f"{path}: unsupported table format {suffix!r} (use .md or .csv)")
