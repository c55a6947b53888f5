"""Config: validation errors name file and field; data-root resolution order."""

from pathlib import Path

import pytest

from prodclass.config import ConfigError, dump_config, load_config, resolve_data_root


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config("configs/abo-small.yaml", ["train.epochs=3", "model.head=linear"])
    assert cfg.train.epochs == 3 and cfg.model.head == "linear" and cfg.curation.min_per_class == 40
    (tmp_path / "r.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "r.yaml") == cfg


def test_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {path: x}\ntrain: {epochs: -1, lr: 0.1}\nmodel: {heed: mlp}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "bad.yaml: train.epochs" in msg and "model.heed" in msg
    (tmp_path / "split.yaml").write_text("data: {path: x}\ncuration: {split: {train: 0.9, val: 0.2, test: 0.1}}\n")
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(tmp_path / "split.yaml")


def test_data_root_order(monkeypatch):
    monkeypatch.delenv("PRODCLASS_DATA", raising=False)
    assert resolve_data_root(None) == Path("data")
    monkeypatch.setenv("PRODCLASS_DATA", "/srv/catalogs")
    assert resolve_data_root(None) == Path("/srv/catalogs")
    assert resolve_data_root("/cli/wins") == Path("/cli/wins")
