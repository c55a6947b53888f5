"""Progressive fine-tuning: freezing per stage, BatchNorm modes, class balance, augmentation,
the frozen-prefix feature cache, and end-to-end runs (determinism, kill + resume)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from conftest import make_tiny_catalog, tiny_config
from prodclass.models import finetune as ft
from prodclass.models.augment import Augment, random_resized_crop_box
from prodclass.features.backbones import create_backbone
from prodclass.config import AugmentConfig, FinetuneConfig, validate_config
from prodclass.curate.rules import Dataset
from prodclass.models.data import ImageDataset
from prodclass.models.heads import Classifier, create_head
from prodclass.preprocess import Preprocessing


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and on a shared CPU far faster (no OpenMP barrier
    waits on a descheduled thread). The end-to-end runs set it through ``embed.num_threads``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Classifier(create_backbone("efficientnet_lite0"), create_head("mlp", 1280, 5)).eval()


def _bn(modules):
    return [m for b in modules for m in b.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_trainable_parameters_per_stage(model):
    blocks = model.backbone.blocks
    assert len(blocks) == 9  # stem, 7 block stages, head conv
    bb, head = ft.freeze(model, 0)  # stage 1: head only
    assert bb == [] and all(p.requires_grad for p in model.head.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    bb, head = ft.freeze(model, 3)  # stage 2: + the last 3 blocks
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in bb} | {id(p) for p in head}
    assert {id(p) for p in bb} == {id(p) for b in blocks[-3:] for p in b.parameters()}
    assert not any(p.requires_grad for b in blocks[:-3] for p in b.parameters())
    assert not any(p.requires_grad for p in model.backbone.model.classifier.parameters())  # ImageNet logits unused
    opt = ft.make_optimizer(bb, head, FinetuneConfig(lr=1e-3, backbone_lr=1e-4, weight_decay=0.05))
    by_lr = {}
    for g in opt.param_groups:
        by_lr[g["lr"]] = by_lr.get(g["lr"], 0) + sum(p.numel() for p in g["params"])
    assert by_lr == {1e-4: sum(p.numel() for p in bb), 1e-3: sum(p.numel() for p in head)}
    assert all(g["weight_decay"] == (0.05 if g["params"][0].ndim > 1 else 0.0) for g in opt.param_groups)
    with pytest.raises(ValueError, match="unfreeze_blocks=10"):
        ft.split_index(model, 10)


def test_batchnorm_stays_in_eval_mode_in_frozen_blocks(model):
    blocks = model.backbone.blocks
    ft.set_train_mode(model, 3, bn_train=True)
    assert not any(m.training for m in _bn(blocks[:-3])) and all(m.training for m in _bn(blocks[-3:]))
    assert model.head.training
    ft.set_train_mode(model, 3, bn_train=False)
    assert not any(m.training for m in _bn(blocks))
    assert all(m.training for b in blocks[-3:] for m in b.modules() if isinstance(m, nn.Conv2d))
    # a training forward leaves the running statistics of frozen (and here all) BatchNorm layers untouched
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    ft.set_train_mode(model, 3, bn_train=True)
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    tail_names = {n for n, _ in model.named_modules() if n.startswith(("backbone.model.blocks.5", "backbone.model.blocks.6",
                                                                        "backbone.model.bn2"))}
    assert changed and all(k.rsplit(".", 1)[0] in tail_names for k in changed)
    model.load_state_dict({**after, **before})
    model.eval()


def test_prefix_then_tail_equals_the_whole_model(model):
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        full = model(x)
        for k in (0, 4, 7, 9):
            assert torch.allclose(ft.tail_forward(model, ft.prefix_forward(model, x, k), k), full, atol=1e-5)


def test_onnxruntime_prefix_matches_torch(model):
    x = torch.randn(3, 3, 224, 224)
    ref = ft.prefix_runner(model, 6, "torch", channels_last=False)(x)
    out = ft.prefix_runner(model, 6, "onnxruntime")(x)
    assert out.shape == ref.shape == (3, 112, 14, 14)
    assert np.abs(out - ref).max() < 1e-3


def _dataset(labels_by_split: dict) -> Dataset:
    rows = [(f"/x/{s}{i}.jpg", c, s) for s, labels in labels_by_split.items() for i, c in enumerate(labels)]
    t = pd.DataFrame(rows, columns=["image_path", "label", "split"])
    return Dataset(table=t, classes=["a", "b", "c"], counts=pd.DataFrame())


def test_class_weights_come_from_the_train_split_only():
    train = ["a"] * 6 + ["b"] * 3 + ["c"] * 1
    ds = _dataset({"train": train, "val": ["c"] * 20, "test": ["c"] * 30})
    w = ft.make_criterion(ds, FinetuneConfig(class_weighting="balanced")).weight
    assert torch.allclose(w, torch.tensor([10 / 18, 10 / 9, 10 / 3]))  # n / (C * count), train counts 6/3/1
    ds2 = _dataset({"train": train, "val": ["a"] * 5, "test": ["b"] * 5})  # other val/test: same weights
    assert torch.equal(ft.make_criterion(ds2, FinetuneConfig(class_weighting="balanced")).weight, w)
    crit = ft.make_criterion(ds, FinetuneConfig(label_smoothing=0.1))
    assert crit.weight is None and crit.label_smoothing == 0.1


def test_balanced_sampler_and_seeded_order():
    y = np.array([0] * 90 + [1] * 9 + [2] * 1)
    cfg = FinetuneConfig(sampler="balanced", seed=3)
    order = np.concatenate([ft.epoch_order(y, 3, cfg, e) for e in range(1, 21)])
    share = np.bincount(y[order], minlength=3) / len(order)
    assert np.all(np.abs(share - 1 / 3) < 0.06)  # natural shares are .90/.09/.01
    shuffle = FinetuneConfig(sampler="shuffle")
    assert sorted(ft.epoch_order(y, 3, shuffle, 1)) == list(range(100))
    assert np.array_equal(ft.epoch_order(y, 3, shuffle, 1), ft.epoch_order(y, 3, shuffle, 1))
    assert not np.array_equal(ft.epoch_order(y, 3, shuffle, 1), ft.epoch_order(y, 3, shuffle, 2))


def test_warmup_then_cosine_schedule():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = ft.make_scheduler(opt, FinetuneConfig(epochs=10, warmup_epochs=1), steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < 0.2 and max(lrs) == pytest.approx(1.0, abs=0.01) and int(np.argmax(lrs)) in (9, 10)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.02


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(120, 90), (64, 64), (80, 100)]):
        p = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_augmentation_is_seeded_and_evaluation_is_plain_preprocessing(images):
    prep = Preprocessing(input_size=48, resize_size=48)
    aug = Augment(AugmentConfig())
    views = ImageDataset(images, [0, 1, 2], prep, aug, seed=1, views=3)
    assert len(views) == 9
    x0, y0 = views[3]  # image 1, view 0: unaugmented
    assert y0 == 1 and np.array_equal(x0.numpy(), prep(images[1]))
    x1, _ = views[4]
    assert x1.shape == (3, 48, 48) and not np.array_equal(x1.numpy(), x0.numpy())
    assert np.array_equal(ImageDataset(images, None, prep, aug, seed=1, views=3)[4][0], x1)  # same seed, same view
    assert not np.array_equal(ImageDataset(images, None, prep, aug, seed=2, views=3)[4][0], x1)
    online = ImageDataset(images, None, prep, aug, seed=1)
    online.set_epoch(1)
    a = online[0][0]
    online.set_epoch(2)
    assert not np.array_equal(online[0][0], a)  # a fresh view every epoch
    assert np.array_equal(ImageDataset(images, None, prep)[2][0].numpy(), prep(images[2]))  # no augment: eval


def test_random_resized_crop_box_stays_inside_the_image():
    rng = np.random.default_rng(0)
    for w, h in [(256, 256), (60, 80), (300, 40)]:
        for _ in range(50):
            l, t, r, b = random_resized_crop_box(w, h, (0.3, 1.0), (0.75, 4 / 3), rng)
            assert 0 <= l < r <= w and 0 <= t < b <= h
    assert random_resized_crop_box(100, 100, (1.0, 1.0), (1.0, 1.0), rng) == (0, 0, 100, 100)


def test_prefix_features_continue_after_interruption(images, tmp_path):
    prep = Preprocessing(input_size=32, resize_size=32)
    ds = ImageDataset(images * 3, None, prep, Augment(AugmentConfig()), seed=0, views=2)  # 18 items
    run = lambda x: x[:, :2, ::8, ::8].numpy() * 2  # noqa: E731  (a stand-in prefix)
    full = np.array(ft.prefix_features(run, ds, tmp_path / "a" / "full.npy", batch_size=4, progress=False))
    calls = []

    def dies(x):
        calls.append(1)
        if len(calls) == 4:  # killed during the 3rd batch of 4 (after the flush at 8 rows)
            raise KeyboardInterrupt
        return run(x)

    with pytest.raises(KeyboardInterrupt):
        ft.prefix_features(dies, ds, tmp_path / "b" / "f.npy", batch_size=4, progress=False, flush_every=8)
    assert not (tmp_path / "b" / "f.npy").exists() and (tmp_path / "b" / "f.npy.partial").exists()
    seen = []
    again = ft.prefix_features(lambda x: seen.append(len(x)) or run(x), ds, tmp_path / "b" / "f.npy", batch_size=4,
                               progress=False, flush_every=8)
    assert sum(seen) - 1 == 18 - 8  # the rest (the 1 is the shape probe)
    assert again.shape == (9, 2, 2, 4, 4) and again.dtype == np.float16 and np.array_equal(again, full)


# ---------------------------------------------------------------------------------------------
# end to end on real abo-small images (5 classes x 8 images, 96 px, 2 epochs of stage 2)

FT = {"enabled": True, "unfreeze_blocks": 3, "input_size": 96, "epochs": 2, "views": 2, "batch_size": 8,
      "warmup_epochs": 0.5, "patience": 5, "ema_decay": 0.9}


def _cfg(data_root, base, cache):
    csv = make_tiny_catalog(data_root, base / "cat", per_class=8)
    c = tiny_config(data_root, csv, cache, epochs=10)
    c["embed"]["num_threads"] = 1  # the subprocesses of the resume test run like this process
    c["finetune"] = dict(FT)
    return c


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory):
    from conftest import _data_root

    from prodclass.pipeline import run

    root = _data_root()
    if not (root / "abo-small").is_dir():
        pytest.skip("needs ../shared/data")
    base = tmp_path_factory.mktemp("ft")
    c = _cfg(root, base, base / "cache")
    res = run(validate_config(c), root, run_dir=base / "run", progress=False, echo=lambda *_: None)
    return res.run_dir, c


@pytest.mark.shared_data
def test_finetuned_run_directory(ft_run):
    from prodclass.pipeline import load_predictions
    from prodclass.runs import load_model

    run_dir, _ = ft_run
    for f in ("model.pt", "history.json", "metrics.json", "predictions_val.parquet", "predictions_test.parquet"):
        assert (run_dir / f).is_file()
    assert not (run_dir / ft.CHECKPOINT).exists()
    hist = json.loads((run_dir / "history.json").read_text())
    stages = [h["stage"] for h in hist]
    assert stages[0] == "head" and stages[-2:] == ["finetune", "finetune"] and set(stages) == {"head", "finetune"}
    assert all("val_macro_f1" in h for h in hist if h["stage"] == "finetune")
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["finetune"]["epochs"] == 2 and m["finetune"]["input_size"] == 96
    ckpt = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=False)
    assert ckpt["stage"] == "finetune" and ckpt["preprocessing"]["input_size"] == 96
    # the stored test logits are what the served model computes from the images
    table, logits = load_predictions(run_dir, "test")
    served, _ = load_model(run_dir)
    prep = served.backbone.preprocessing
    assert prep.input_size == 96
    with torch.no_grad():
        again = served(torch.from_numpy(np.stack([prep(p) for p in table["image_path"]]))).numpy()
    assert np.allclose(again, logits, atol=1e-4)


@pytest.mark.shared_data
def test_same_seed_same_metrics(ft_run, tmp_path, data_root):
    from prodclass.pipeline import run

    run_dir, c = ft_run
    c = dict(c, embed={**c["embed"], "cache_dir": str(tmp_path / "cache")})  # a fresh cache: features computed again
    res = run(validate_config(c), data_root, run_dir=tmp_path / "again", progress=False, echo=lambda *_: None)
    first = json.loads((run_dir / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "log_loss"):
        assert res.metrics[key] == first[key]
    h1 = [h["val_loss"] for h in json.loads((run_dir / "history.json").read_text())]
    h2 = [h["val_loss"] for h in json.loads((res.run_dir / "history.json").read_text())]
    assert h1 == h2


KILL_AFTER_FIRST_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    import prodclass.models.finetune as ft
    save = ft.save_checkpoint
    def save_then_die(path, ckpt):
        save(path, ckpt)
        os.kill(os.getpid(), signal.SIGKILL)  # killed right after epoch 1 was checkpointed
    ft.save_checkpoint = save_then_die
    from prodclass.cli import app
    app(sys.argv[1:])
""")


@pytest.mark.shared_data
def test_resume_after_kill_completes_the_run(ft_run, tmp_path, data_root):
    run_dir0, c = ft_run
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(c))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, "run", str(tmp_path / "c.yaml"),
                             "--output-dir", str(tmp_path / "runs"), "--quiet"], capture_output=True, text=True,
                            timeout=600, env=env)
    assert killed.returncode == -9, killed.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run_dir / ft.CHECKPOINT, map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "scheduler", "ema", "epoch", "best_metric", "config", "classes"} <= set(ckpt)
    assert ckpt["ema"] is not None
    assert ckpt["epoch"] == 1 and ckpt["config"]["finetune"]["epochs"] == 2 and not (run_dir / "metrics.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "prodclass.cli", "run", "--resume", str(run_dir), "--quiet"],
                             capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "after epoch 1" in resumed.stdout
    for f in ("model.pt", "metrics.json", "predictions_val.parquet", "predictions_test.parquet", "config.yaml"):
        assert (run_dir / f).is_file()
    assert not (run_dir / ft.CHECKPOINT).exists()
    hist = [h for h in json.loads((run_dir / "history.json").read_text()) if h["stage"] == "finetune"]
    assert [h["epoch"] for h in hist] == [1, 2]
    # the resumed run ends where the uninterrupted one did
    m0, m1 = (json.loads((d / "metrics.json").read_text()) for d in (run_dir0, run_dir))
    assert (m1["accuracy"], m1["macro_f1"], m1["log_loss"]) == (m0["accuracy"], m0["macro_f1"], m0["log_loss"])


def test_cli_run_needs_config_or_resume():
    from typer.testing import CliRunner

    from prodclass.cli import app

    out = CliRunner().invoke(app, ["run"])
    assert out.exit_code == 2 and "--resume RUN_DIR" in out.output


def test_online_augmentation_path_trains_the_tail_only(tmp_path):
    """feature_cache: false (the GPU-style path): fresh augmentations each epoch, prefix run under no_grad."""
    rng = np.random.default_rng(0)
    rows = []
    for c, colour in enumerate([(220, 30, 30), (30, 200, 30), (30, 30, 220)]):
        for i in range(6):
            img = np.clip(np.array(colour) + rng.integers(-30, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / f"{c}-{i}.png")
            rows.append((str(tmp_path / f"{c}-{i}.png"), "abc"[c], "train" if i < 4 else "val"))
    ds = Dataset(table=pd.DataFrame(rows, columns=["image_path", "label", "split"]), classes=["a", "b", "c"],
                 counts=pd.DataFrame())
    prep = Preprocessing(input_size=64, resize_size=64)
    model = Classifier(create_backbone("efficientnet_lite0", preprocessing=prep), create_head("mlp", 1280, 3)).eval()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not n.startswith(("backbone.model.blocks.6",
                                                                                      "backbone.model.conv_head",
                                                                                      "backbone.model.bn2", "head"))}
    head0, conv_head0 = model.head.net[0].weight.clone(), model.backbone.model.conv_head.weight.clone()
    cfg = validate_config({"data": {"path": "x"}, "embed": {"cache_dir": str(tmp_path / "cache")},
                           "finetune": {"enabled": True, "feature_cache": False, "unfreeze_blocks": 2, "epochs": 2,
                                        "batch_size": 4, "bn_train": True, "sampler": "balanced",
                                        "class_weighting": "balanced", "schedule": "onecycle"}})
    res = ft.finetune(model, ds, cfg, tmp_path / "run", progress=False, echo=lambda *_: None)
    assert [h["epoch"] for h in res.history] == [1, 2] and res.info["feature_cache"] == {"enabled": False}
    assert not (tmp_path / "cache" / "features").exists()
    after = dict(model.named_parameters())
    assert all(torch.equal(p, after[n]) for n, p in frozen.items())  # blocks 0..5 and the stem never moved
    assert not torch.equal(head0, model.head.net[0].weight) and not torch.equal(conv_head0, model.backbone.model.conv_head.weight)
    assert (tmp_path / "run" / ft.CHECKPOINT).is_file() and not model.training


def test_manifold_mixup_is_seeded_and_changes_the_update(tmp_path):
    """finetune.mixup: the tail trains on convex mixes of its inputs; the same seed gives the same weights."""
    rng = np.random.default_rng(1)
    rows = []
    for c in range(2):
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{c}-{i}.png")
            rows.append((str(tmp_path / f"{c}-{i}.png"), "ab"[c], "train" if i < 3 else "val"))
    ds = Dataset(table=pd.DataFrame(rows, columns=["image_path", "label", "split"]), classes=["a", "b"],
                 counts=pd.DataFrame())

    def tuned(mixup: float, name: str) -> dict:
        torch.manual_seed(0)
        prep = Preprocessing(input_size=32, resize_size=32)
        m = Classifier(create_backbone("efficientnet_lite0", preprocessing=prep), create_head("mlp", 1280, 2)).eval()
        cfg = validate_config({"data": {"path": "x"}, "embed": {"cache_dir": str(tmp_path / "cache")},
                               "finetune": {"enabled": True, "unfreeze_blocks": 2, "epochs": 1, "batch_size": 3,
                                            "mixup": mixup, "ema_decay": None, "prefix_engine": "torch"}})
        ft.finetune(m, ds, cfg, tmp_path / name, progress=False, echo=lambda *_: None)
        return {n: p.detach().clone() for n, p in m.head.named_parameters()}

    a, b, plain = tuned(0.4, "a"), tuned(0.4, "b"), tuned(0.0, "plain")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], plain[n]) for n in a)
