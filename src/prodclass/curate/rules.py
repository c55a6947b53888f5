"""Curation: declarative label rules and the stored, stratified train/val/test split.

Rules (:class:`prodclass.config.CurationConfig`) are applied in a fixed order — merge → drop →
keep main images → min per class → cap per class → split — as the ABO reference projects
applied them (merge ``finering→ring``..., drop generic product types, keep classes with at
least N images, cap the largest). The result is a :class:`Dataset`: the curated rows with a
``label`` and a ``split`` column plus the class map. It is stored in the run directory
(:meth:`prodclass.runs.RunDir.write_dataset`) so every later stage sees the same split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from prodclass.config import CurationConfig

SPLITS = ("train", "val", "test")


class CurationError(ValueError):
    """Rules that cannot be applied (a conflicting rule, a class emptied, too few images)."""


@dataclass
class Dataset:
    """Curated rows + split + class map.

    Attributes:
        table: Catalog rows kept, with ``label`` (final class name, str) and ``split``
            (``train``/``val``/``test``) columns added.
        classes: class names; index = class id used by every model of the run.
        counts: per raw label: ``raw``, per final class: ``curated``, ``train``, ``val``, ``test``.
    """

    table: pd.DataFrame
    classes: list[str]
    counts: pd.DataFrame

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def labels(self, split: str | None = None) -> np.ndarray:
        """int64 ``(N,)`` class ids of the rows of ``split`` (all rows if None)."""
        t = self.split_table(split)
        return t["label"].map(self.class_to_idx).to_numpy(np.int64)

    def split_table(self, split: str | None) -> pd.DataFrame:
        return self.table if split is None else self.table[self.table["split"] == split]

    def save(self, run) -> None:
        """Store the curated rows, class map and counts in a :class:`prodclass.runs.RunDir`."""
        run.write_dataset(self.table, self.classes, self.counts)

    @classmethod
    def load(cls, run) -> "Dataset":
        """The dataset a :class:`prodclass.runs.RunDir` stored (its split is reused as it is)."""
        table, classes, counts = run.read_dataset()
        return cls(table=table, classes=classes, counts=counts)


def curate(catalog: pd.DataFrame, label: str, rules: CurationConfig) -> Dataset:
    """Apply ``rules`` to ``catalog`` and split it.

    Args:
        catalog: a validated Catalog table.
        label: the column to classify (e.g. ``product_type``).
        rules: merge/drop/min/max/split settings.

    Returns:
        The :class:`Dataset`; classes are sorted by name.

    Raises:
        CurationError: unknown label column; a label both merged into and dropped; no
            class left; a class with fewer than 3 images (one per split).
    """
    if label not in catalog.columns:
        raise CurationError(f"label column {label!r} not in catalog; columns are {list(catalog.columns)}")
    merge = {str(k): str(v) for k, v in rules.merge.items()}
    drop = set(map(str, rules.drop))
    conflict = sorted(set(merge.values()) & drop)
    if conflict:
        raise CurationError(f"rule conflict: {conflict} are merge targets and also dropped, which empties them")
    df = catalog[catalog[label].notna() & (catalog[label].astype(str).str.strip() != "")].copy()
    raw_counts = df[label].astype(str).value_counts()
    df["label"] = df[label].astype(str).replace(merge)
    df = df[~df["label"].isin(drop)]
    if rules.main_images_only:
        df = df[df["is_main_image"]]
    counts = df["label"].value_counts()
    df = df[df["label"].isin(counts[counts >= rules.min_per_class].index)]
    if df.empty:
        raise CurationError(
            f"no class has >= {rules.min_per_class} images after merge/drop rules (labels before: {len(raw_counts)})"
        )
    rng = np.random.default_rng(rules.seed)
    if rules.max_per_class:
        parts = []
        for _, g in df.groupby("label", sort=True):
            keep = rng.permutation(len(g))[: rules.max_per_class]
            parts.append(g.iloc[np.sort(keep)])
        df = pd.concat(parts)
    df = df.sort_values(["label", "item_id", "image_id"]).reset_index(drop=True)
    df["split"] = _stratified_split(df, rules, rng)
    classes = sorted(df["label"].unique())
    split_counts = df.groupby(["label", "split"]).size().unstack(fill_value=0).reindex(columns=list(SPLITS), fill_value=0)
    table = pd.DataFrame({"raw": raw_counts}).rename_axis("label")
    table = table.join(df["label"].value_counts().rename("curated"), how="outer").join(split_counts, how="outer")
    table = table.fillna(0).astype(int).sort_values(["curated", "raw"], ascending=False).reset_index()
    return Dataset(table=df, classes=classes, counts=table)


def _stratified_split(df: pd.DataFrame, rules: CurationConfig, rng: np.random.Generator) -> np.ndarray:
    """Per class, shuffle its items and cut them into train/val/test by the configured fractions.

    Splitting by ``item_id`` keeps all images of one product in one split (no leakage through
    secondary images). Every class gets at least one item in val and test.
    """
    split = np.empty(len(df), dtype=object)
    frac = rules.split
    for cls, g in df.groupby("label", sort=True):
        items = g["item_id"].unique()
        n = len(items)
        if n < 3:
            raise CurationError(
                f"class {cls!r} has {n} item(s) after the rules; a train/val/test split needs at least 3 "
                f"(raise curation.min_per_class)"
            )
        items = items[rng.permutation(n)]
        n_test = max(1, int(round(n * frac.test)))
        n_val = max(1, int(round(n * frac.val)))
        n_val = min(n_val, n - n_test - 1)
        assign = {it: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, it in enumerate(items)}
        split[g.index.to_numpy()] = g["item_id"].map(assign).to_numpy()
    return split
