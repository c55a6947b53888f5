"""Curation rules and the stored split, on real ABO label statistics and small constructed tables."""

import pandas as pd
import pytest

from prodclass.config import CurationConfig, load_config
from prodclass.curate.rules import CurationError, Dataset, curate
from prodclass.runs import RunDir


def _catalog(counts: dict[str, int]) -> pd.DataFrame:
    rows = [(f"{lab}-{i}", lab) for lab, n in counts.items() for i in range(n)]
    return pd.DataFrame({"item_id": [r[0] for r in rows], "image_id": [r[0] for r in rows],
                         "image_path": [f"/x/{r[0]}.jpg" for r in rows], "is_main_image": True,
                         "product_type": [r[1] for r in rows]})


def test_rules_apply_in_order_and_split_is_stratified():
    cat = _catalog({"finering": 30, "ring": 20, "home": 100, "shoes": 300, "rare": 5})
    rules = CurationConfig(merge={"finering": "ring"}, drop=["home"], min_per_class=10, max_per_class=100)
    ds = curate(cat, "product_type", rules)
    assert ds.classes == ["ring", "shoes"]
    counts = ds.table["label"].value_counts()
    assert counts["ring"] == 50 and counts["shoes"] == 100  # merged; capped
    by = ds.table.groupby(["label", "split"]).size().unstack()
    assert by.loc["shoes", "test"] == 20 and by.loc["shoes", "val"] == 10 and by.loc["shoes", "train"] == 70
    c = ds.counts.set_index("label")
    assert c.loc["home", "raw"] == 100 and c.loc["home", "curated"] == 0 and c.loc["rare", "curated"] == 0


def test_split_is_deterministic_and_stored(tmp_path):
    cat = _catalog({"a": 40, "b": 60, "c": 45})
    a = curate(cat, "product_type", CurationConfig(seed=3))
    b = curate(cat, "product_type", CurationConfig(seed=3))
    assert a.table["split"].tolist() == b.table["split"].tolist()
    assert curate(cat, "product_type", CurationConfig(seed=4)).table["split"].tolist() != a.table["split"].tolist()
    a.save(RunDir(tmp_path))
    back = Dataset.load(RunDir(tmp_path))
    assert back.classes == a.classes and back.table["split"].tolist() == a.table["split"].tolist()
    assert RunDir(tmp_path).read_class_counts().equals(a.counts)


def test_images_of_one_item_stay_in_one_split():
    cat = _catalog({"a": 30, "b": 30})
    extra = cat.copy()
    extra["image_id"] += "-side"
    extra["is_main_image"] = False
    rules = CurationConfig(main_images_only=False)
    ds = curate(pd.concat([cat, extra]), "product_type", rules)
    assert ds.table.groupby("item_id")["split"].nunique().max() == 1


def test_clear_errors():
    cat = _catalog({"ring": 20, "finering": 20, "x": 2})
    with pytest.raises(CurationError, match=r"\['ring'\] are merge targets and also dropped"):
        curate(cat, "product_type", CurationConfig(merge={"finering": "ring"}, drop=["ring"]))
    with pytest.raises(CurationError, match="no class has >= 500"):
        curate(cat, "product_type", CurationConfig(min_per_class=500))
    with pytest.raises(CurationError, match=r"class 'x' has 2 item\(s\)"):
        curate(cat, "product_type", CurationConfig())
    with pytest.raises(CurationError, match="label column 'colour'"):
        curate(cat, "colour", CurationConfig())


@pytest.mark.shared_data
def test_abo_reference_rules_on_real_labels(data_root):
    """The abo-small config's rules on the real abo-small labels give ~35-40 classes >= 40 images."""
    cfg = load_config("configs/abo-small.yaml")
    cat = pd.read_csv(data_root / "abo-small/catalog.csv").rename(columns={"image_name": "image_id"})
    cat["item_id"], cat["image_path"], cat["is_main_image"] = cat["image_id"], cat["image_id"], True
    ds = curate(cat, "product_type", cfg.curation)
    assert 35 <= len(ds.classes) <= 40
    assert {"ring", "earring", "necklace"} <= set(ds.classes)
    assert not {"home", "kitchen", "finering", "fineearring"} & set(ds.classes)
    assert ds.table["label"].value_counts().min() >= 40
