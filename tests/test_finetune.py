"""Progressive fine-tuning: the stage-1 head (bit-for-bit semantics), the freezing policy, BatchNorm
modes, class balance, schedules, augmentation, the frozen-prefix feature cache, the shared engine,
checkpoints and resume, and end-to-end runs (determinism, kill + resume)."""

import copy
import inspect
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from conftest import make_tiny_catalog, tiny_config
from prodclass.config import AugmentConfig, FinetuneConfig, TrainConfig, validate_config
from prodclass.curate.rules import Dataset
from prodclass.features.backbones import create_backbone
from prodclass.models import finetune as ft
from prodclass.models import prefix_cache
from prodclass.models.augment import Augment, build_transform, view_seed
from prodclass.models.data import ImageDataset, epoch_order
from prodclass.models.engine import EarlyStopping, evaluate, train_one_epoch
from prodclass.models.heads import Classifier, create_head
from prodclass.models.policy import BackboneFinetuning
from prodclass.models.schedule import make_scheduler
from prodclass.models.split import prefix_forward, tail_forward
from prodclass.models.train import train_head
from prodclass.preprocess import Preprocessing
from prodclass.runs import RunDir


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


# ---------------------------------------------------------------------------------------------
# stage 1: the head on cached embeddings


def _embeddings(seed=0, n=120, d=32, c=4):
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, d)).astype(np.float32)
    y = r.integers(0, c, n)
    x[np.arange(n), y] += 2.0
    return x[:90], y[:90], x[90:], y[90:]


def test_stage1_head_follows_the_seeded_reference_recipe():
    """train_head is exactly this recipe (the published stage-1 figures depend on every step):
    torch.manual_seed(seed); one forward of a zero row (reads the class count; draws dropout);
    a DataLoader shuffled by its own Generator(seed); AdamW over all head parameters; per epoch
    train (train mode, zero_grad, backward, step) then eval on all val rows."""
    xt, yt, xv, yv = _embeddings()
    cfg = TrainConfig(epochs=4, batch_size=16, lr=3e-3, weight_decay=0.05, label_smoothing=0.1, patience=50, seed=3)
    torch.manual_seed(11)
    head = create_head("mlp", 32, 4, 16, 0.4)
    ref = copy.deepcopy(head)
    hist = train_head(head, xt, yt, xv, yv, cfg, progress=False)

    torch.manual_seed(cfg.seed)
    ref(torch.zeros(1, 32))
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(xt), torch.from_numpy(yt)),
                                         batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    val_losses = []
    for _ in range(4):
        ref.train()
        for x, y in loader:
            loss = loss_fn(ref(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ref.eval()
        with torch.no_grad():
            val_losses.append(nn.functional.cross_entropy(ref(torch.from_numpy(xv)), torch.from_numpy(yv)).item())
    assert [h["val_loss"] for h in hist] == val_losses  # bit for bit
    assert [h["stage"] for h in hist] == ["head"] * 4 and sum(h["best"] for h in hist) == 1
    best = min(range(4), key=lambda i: val_losses[i])
    if best == 3:  # the last epoch is the best: the head holds the reference's weights
        assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), ref.state_dict().values(), strict=True))


def test_stage1_early_stopping_restores_the_best_epoch():
    """Patience counts epochs after the best (improvements must beat it by 1e-4); the head ends with
    the weights of the best epoch, i.e. those of the same run cut at that epoch."""
    xt, yt, xv, yv = _embeddings(1)
    cfg = TrainConfig(epochs=200, batch_size=16, lr=1e-2, patience=3, seed=0)

    def trained(c):
        torch.manual_seed(5)
        head = create_head("mlp", 32, 4, 16, 0.4)
        return head, train_head(head, xt, yt, xv, yv, c, progress=False)

    head, hist = trained(cfg)
    best = next(h["epoch"] for h in hist if h["best"])
    losses = [h["val_loss"] for h in hist]
    assert len(hist) == best + 3 < 200
    assert all(min(losses[:best]) <= v + 1e-4 for v in losses[best:])
    assert all(np.isfinite(losses)) and "checkpoint_path" not in inspect.signature(train_head).parameters
    cut, cut_hist = trained(cfg.model_copy(update={"epochs": best, "patience": 1000}))
    assert [h["val_loss"] for h in cut_hist] == losses[:best] and cut_hist[-1]["best"]
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), cut.state_dict().values(), strict=True))


def test_early_stopping_rules():
    s = EarlyStopping("min", patience=2)
    assert s.update(1.0, 1) and not s.update(0.99995, 2) and not s.should_stop(2) and s.should_stop(3)
    assert s.update(0.5, 3) and (s.best, s.best_epoch) == (0.5, 3) and not s.should_stop(4)
    m = EarlyStopping("max", patience=1, best=-1.0)
    assert m.update(0.0, 1) and not m.update(0.00005, 2) and m.should_stop(2)
    with pytest.raises(ValueError):
        EarlyStopping("lowest", 1)


def test_engine_mixup_is_seeded_and_evaluate_reports_macro_f1():
    torch.manual_seed(0)
    x, y = torch.randn(12, 6), torch.tensor([0, 1, 2] * 4)
    net = nn.Linear(6, 3)

    def one(mixup, seed):
        m = copy.deepcopy(net)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        train_one_epoch(m, [(x[:6], y[:6]), (x[6:], y[6:])], opt, nn.CrossEntropyLoss(), mixup=mixup,
                        rng=np.random.default_rng(seed))
        return m.weight.detach().clone()

    assert torch.equal(one(0.4, 1), one(0.4, 1)) and not torch.equal(one(0.4, 1), one(0.4, 2))
    assert not torch.equal(one(0.4, 1), one(0.0, 1))
    out = evaluate(net, [x[:5], x[5:]], y, num_classes=3)
    assert set(out) == {"loss", "acc", "macro_f1"} and 0 <= out["macro_f1"] <= 1
    with pytest.raises(ValueError, match="no batches"):
        train_one_epoch(net, [], torch.optim.SGD(net.parameters(), lr=0.1), nn.CrossEntropyLoss())


# ---------------------------------------------------------------------------------------------
# stage 2: policy, split, schedule


def test_trainable_parameters_per_stage(model):
    blocks = model.backbone.blocks
    assert len(blocks) == 9  # stem, 7 block stages, head conv
    bb, head = BackboneFinetuning(0).freeze(model)  # stage 1: head only
    assert bb == [] and all(p.requires_grad for p in model.head.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    policy = BackboneFinetuning(3, lr=1e-3, backbone_lr=1e-4, weight_decay=0.05)
    bb, head = policy.freeze(model)  # stage 2: + the last 3 blocks
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in bb} | {id(p) for p in head}
    assert {id(p) for p in bb} == {id(p) for b in blocks[-3:] for p in b.parameters()}
    assert not any(p.requires_grad for b in blocks[:-3] for p in b.parameters())
    assert not any(p.requires_grad for p in model.backbone.model.classifier.parameters())  # ImageNet logits unused
    opt = policy.make_optimizer(model)
    by_lr = {}
    for g in opt.param_groups:
        by_lr[g["lr"]] = by_lr.get(g["lr"], 0) + sum(p.numel() for p in g["params"])
    assert by_lr == {1e-4: sum(p.numel() for p in bb), 1e-3: sum(p.numel() for p in head)}
    assert [g["name"] for g in opt.param_groups] == ["backbone", "backbone", "head", "head"]
    for g in opt.param_groups:  # timm's rule: no decay on biases and other 1-D tensors (BatchNorm)
        assert all((p.ndim > 1) == (g["weight_decay"] == 0.05) for p in g["params"])
    assert BackboneFinetuning.from_config(FinetuneConfig(unfreeze_blocks=2)).split_index(model) == 7
    with pytest.raises(ValueError, match="unfreeze_blocks=10"):
        BackboneFinetuning(10).split_index(model)


def test_batchnorm_stays_in_eval_mode_in_frozen_blocks(model):
    blocks = model.backbone.blocks
    BackboneFinetuning(3, bn_train=True).set_train_mode(model)
    assert not any(m.training for m in _bn(blocks[:-3])) and all(m.training for m in _bn(blocks[-3:]))
    assert model.head.training
    BackboneFinetuning(3, bn_train=False).set_train_mode(model)
    assert not any(m.training for m in _bn(blocks))
    assert all(m.training for b in blocks[-3:] for m in b.modules() if isinstance(m, nn.Conv2d))
    # a training forward leaves the running statistics of frozen (and here all) BatchNorm layers untouched
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    BackboneFinetuning(3, bn_train=True).set_train_mode(model)
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
            assert torch.allclose(tail_forward(model, prefix_forward(model, x, k), k), full, atol=1e-5)


def test_onnxruntime_prefix_matches_torch_and_leaves_the_model_alone(model):
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    x = torch.randn(3, 3, 224, 224).numpy()
    ref = prefix_cache.prefix_runner(model, 6, "torch")(x)
    onnx = prefix_cache.prefix_runner(model, 6, "onnxruntime")
    out = onnx(x)
    assert type(onnx).__name__ == "OnnxBackend"  # the shared prodclass.inference backend
    assert out.shape == ref.shape == (3, 112, 14, 14)
    assert np.abs(out - ref).max() < 1e-3
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.is_contiguous() for p in model.parameters())
    model.eval()
    with pytest.raises(ValueError, match="prefix_engine"):
        prefix_cache.prefix_runner(model, 6, "tensorrt")


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
    order = np.concatenate([epoch_order(y, 3, cfg, e) for e in range(1, 21)])
    share = np.bincount(y[order], minlength=3) / len(order)
    assert np.all(np.abs(share - 1 / 3) < 0.06)  # natural shares are .90/.09/.01
    shuffle = FinetuneConfig(sampler="shuffle")
    assert sorted(epoch_order(y, 3, shuffle, 1)) == list(range(100))
    assert np.array_equal(epoch_order(y, 3, shuffle, 1), epoch_order(y, 3, shuffle, 1))
    assert not np.array_equal(epoch_order(y, 3, shuffle, 1), epoch_order(y, 3, shuffle, 2))


def _lrs(cfg, steps_per_epoch=10, peaks=(1.0,), stop=None):
    opt = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr": p} for p in peaks])
    sched = make_scheduler(opt, cfg, steps_per_epoch=steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch if stop is None else stop):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return np.array(lrs), opt, sched


def test_warmup_then_cosine_schedule():
    lrs = _lrs(FinetuneConfig(epochs=10, warmup_epochs=1))[0][:, 0]
    assert lrs[0] == pytest.approx(1 / 11) and max(lrs) == pytest.approx(1.0, abs=0.01) and int(np.argmax(lrs)) == 10
    assert np.allclose(lrs[:10], np.arange(1, 11) / 11)  # linear warm-up: (step + 1) / (warm + 1)
    assert np.all(np.diff(lrs[10:]) <= 0) and lrs[-1] < 0.02
    two = _lrs(FinetuneConfig(epochs=10, warmup_epochs=1), peaks=(2e-4, 5e-4))[0]
    assert np.allclose(two[:10, 1] / two[:10, 0], 2.5) and two[-1].min() > 0.01 * 2e-4 * 0.99  # eta_min: 1% of min peak
    const = _lrs(FinetuneConfig(epochs=4, warmup_epochs=1, schedule="constant"))[0][:, 0]
    assert np.allclose(const[:10], np.arange(1, 11) / 11) and np.allclose(const[10:], 1.0)
    one = _lrs(FinetuneConfig(epochs=4, warmup_epochs=1, schedule="onecycle"))[0][:, 0]
    assert int(np.argmax(one)) in (9, 10) and one[-1] < 1e-3  # OneCycleLR peaks at the end of its rising part


def test_schedule_state_resumes_under_weights_only(tmp_path):
    cfg = FinetuneConfig(epochs=3, warmup_epochs=1)
    full = _lrs(cfg)[0]
    _, opt, sched = _lrs(cfg, stop=13)
    RunDir(tmp_path).save_checkpoint(tmp_path / "c.pt", {"s": sched.state_dict(), "o": opt.state_dict()})
    ck = RunDir(tmp_path).load_checkpoint(tmp_path / "c.pt")  # torch.load(weights_only=True)
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = make_scheduler(opt2, cfg, 10)
    opt2.load_state_dict(ck["o"])
    sched2.load_state_dict(ck["s"])
    rest = []
    for _ in range(30 - 13):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert np.allclose(rest, full[13:, 0], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# augmentation and the frozen-prefix feature cache


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


def test_views_are_the_same_in_any_thread_and_leave_the_global_rng_alone(images):
    prep = Preprocessing(input_size=40, resize_size=40)
    ds = ImageDataset(images * 4, None, prep, Augment(AugmentConfig(rotation=30, color_jitter=0.4)), seed=5, views=4)
    serial = [ds.image(j) for j in range(len(ds))]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(ds.image, reversed(range(len(ds)))))[::-1]
    assert all(np.array_equal(a, b) for a, b in zip(serial, threaded, strict=True))
    assert torch.equal(torch.get_rng_state(), state)
    assert len({view_seed(5, v, i) for v in range(4) for i in range(12)}) == 48


def test_augment_pipeline_is_torchvision_v2_and_off_means_plain_resize(images):
    t = build_transform(AugmentConfig(), 64, "bicubic")
    names = [type(op).__name__ for op in t.transforms]
    assert names == ["RandomRotation", "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter"]
    assert type(t).__module__.startswith("torchvision.transforms.v2")
    off = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, rotation=0.0, color_jitter=0.0)
    assert [type(op).__name__ for op in build_transform(off, 64).transforms] == ["RandomResizedCrop"]
    prep = Preprocessing(input_size=32, resize_size=32)
    square = images[1]  # 64 x 64: the whole image, resized, is what evaluation computes
    assert np.array_equal(ImageDataset([square], None, prep, Augment(off), views=2).image(1), prep(square))
    for seed in range(20):  # any view of any shape: the network input size, pixels in range
        for p in images:
            x = ImageDataset([p], None, prep, Augment(AugmentConfig(crop_scale=(0.1, 1.0))), seed, views=2).image(1)
            assert x.shape == (3, 32, 32) and -1.0 <= x.min() and x.max() <= 1.0


def test_rotation_corners_are_white(tmp_path):
    Image.new("RGB", (64, 64), (0, 0, 0)).save(tmp_path / "black.png")
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, rotation=45.0, color_jitter=0.0)
    prep = Preprocessing(input_size=64, resize_size=64)
    x = ImageDataset([str(tmp_path / "black.png")], None, prep, Augment(cfg), seed=0, views=2).image(1)
    assert x[:, 0, 0].min() > 0.9 or x[:, -1, -1].min() > 0.9 or x[:, 0, -1].min() > 0.9


def test_prefix_features_continue_after_interruption(images, tmp_path):
    prep = Preprocessing(input_size=32, resize_size=32)
    ds = ImageDataset(images * 3, None, prep, Augment(AugmentConfig()), seed=0, views=2)  # 18 items
    run = lambda x: x[:, :2, ::8, ::8] * 2  # noqa: E731  (a stand-in prefix: ndarray -> ndarray)
    full = np.array(prefix_cache.prefix_features(run, ds, tmp_path / "a" / "full.npy", batch_size=4, progress=False))
    calls = []

    def dies(x):
        calls.append(1)
        if len(calls) == 4:  # killed during the 3rd batch of 4 (after the flush at 8 rows)
            raise KeyboardInterrupt
        return run(x)

    with pytest.raises(KeyboardInterrupt):
        prefix_cache.prefix_features(dies, ds, tmp_path / "b" / "f.npy", batch_size=4, progress=False, flush_every=8)
    assert not (tmp_path / "b" / "f.npy").exists() and (tmp_path / "b" / "f.npy.partial").exists()
    seen = []
    again = prefix_cache.prefix_features(lambda x: seen.append(len(x)) or run(x), ds, tmp_path / "b" / "f.npy",
                                         batch_size=4, progress=False, flush_every=8)
    assert sum(seen) - 1 == 18 - 8  # the rest (the 1 is the shape probe)
    assert again.shape == (9, 2, 2, 4, 4) and again.dtype == np.float16 and np.array_equal(again, full)


def test_feature_cache_key_covers_the_augmentation_implementation(model, images, monkeypatch):
    cfg = FinetuneConfig()
    key = prefix_cache.feature_cache_key(model, 6, cfg, images, None, 8, "onnxruntime")
    assert key == prefix_cache.feature_cache_key(model, 6, cfg, images, None, 8, "onnxruntime")
    assert key != prefix_cache.feature_cache_key(model, 6, cfg.model_copy(update={"seed": 1}), images, None, 8,
                                                 "onnxruntime")
    val_key = prefix_cache.feature_cache_key(model, 6, cfg, images, None, 1, "onnxruntime")
    monkeypatch.setattr(prefix_cache, "AUGMENT_IMPL", "pil-numpy")
    assert prefix_cache.feature_cache_key(model, 6, cfg, images, None, 8, "onnxruntime") != key
    assert prefix_cache.feature_cache_key(model, 6, cfg, images, None, 1, "onnxruntime") == val_key  # no augmentation


# ---------------------------------------------------------------------------------------------
# stage 2 on small synthetic images: online path, mixup, checkpoint + resume


def _colour_dataset(tmp_path, per_class=6, n_train=4, size=40):
    rng = np.random.default_rng(0)
    rows = []
    for c, colour in enumerate([(220, 30, 30), (30, 200, 30), (30, 30, 220)]):
        for i in range(per_class):
            img = np.clip(np.array(colour) + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / f"{c}-{i}.png")
            rows.append((str(tmp_path / f"{c}-{i}.png"), "abc"[c], "train" if i < n_train else "val"))
    return Dataset(table=pd.DataFrame(rows, columns=["image_path", "label", "split"]), classes=["a", "b", "c"],
                   counts=pd.DataFrame())


def _small_model(size, classes=3):
    torch.manual_seed(0)
    prep = Preprocessing(input_size=size, resize_size=size)
    return Classifier(create_backbone("efficientnet_lite0", preprocessing=prep), create_head("mlp", 1280, classes)).eval()


def _ft_cfg(tmp_path, **finetune):
    return validate_config({"data": {"path": "x"}, "embed": {"cache_dir": str(tmp_path / "cache")},
                            "finetune": {"enabled": True, **finetune}})


def test_online_augmentation_path_trains_the_tail_only(tmp_path):
    """feature_cache: false (the GPU-style path): fresh augmentations each epoch, prefix run under no_grad."""
    ds = _colour_dataset(tmp_path)
    model = _small_model(64)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not n.startswith(("backbone.model.blocks.6",
                                                                                      "backbone.model.conv_head",
                                                                                      "backbone.model.bn2", "head"))}
    head0, conv_head0 = model.head.net[0].weight.clone(), model.backbone.model.conv_head.weight.clone()
    cfg = _ft_cfg(tmp_path, feature_cache=False, unfreeze_blocks=2, epochs=2, batch_size=4, bn_train=True,
                  sampler="balanced", class_weighting="balanced", schedule="onecycle")
    run = RunDir(tmp_path / "run")
    res = ft.finetune(model, ds, cfg, run, progress=False, echo=lambda *_: None)
    assert [h["epoch"] for h in res.history] == [1, 2] and res.info["feature_cache"] == {"enabled": False}
    assert not (tmp_path / "cache" / "features").exists()
    after = dict(model.named_parameters())
    assert all(torch.equal(p, after[n]) for n, p in frozen.items())  # blocks 0..5 and the stem never moved
    assert not torch.equal(head0, model.head.net[0].weight) and not torch.equal(conv_head0, model.backbone.model.conv_head.weight)
    assert run.finetune_checkpoint.is_file() and not model.training
    assert not any(p.requires_grad for p in model.parameters()) and all(p.is_contiguous() for p in model.parameters())
    ck = run.load_checkpoint(run.finetune_checkpoint)  # weights_only=True: plain containers and tensors
    assert {"model", "best_model", "optimizer", "scheduler", "ema", "epoch", "best_metric", "best_epoch", "history",
            "config", "classes"} <= set(ck)
    assert ck["epoch"] == 2 and ck["ema"] is not None and ck["classes"] == ["a", "b", "c"]


def test_manifold_mixup_is_seeded_and_changes_the_update(tmp_path):
    """finetune.mixup: the tail trains on convex mixes of its inputs; the same seed gives the same weights."""
    ds = _colour_dataset(tmp_path, per_class=4, n_train=3, size=32)

    def tuned(mixup: float, name: str) -> dict:
        m = _small_model(32)
        cfg = _ft_cfg(tmp_path, unfreeze_blocks=2, epochs=1, batch_size=3, mixup=mixup, ema_decay=None,
                      prefix_engine="torch")
        ft.finetune(m, ds, cfg, RunDir(tmp_path / name), progress=False, echo=lambda *_: None)
        return {n: p.detach().clone() for n, p in m.head.named_parameters()}

    a, b, plain = tuned(0.4, "a"), tuned(0.4, "b"), tuned(0.0, "plain")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], plain[n]) for n in a)


def test_resume_from_the_checkpoint_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """Killed right after epoch 2's checkpoint (feature cache, EMA, cosine schedule, dropout), the
    resumed run ends with the same history and weights as one that was never interrupted."""
    ds = _colour_dataset(tmp_path, per_class=5, n_train=4, size=32)
    cfg = _ft_cfg(tmp_path, unfreeze_blocks=2, epochs=3, batch_size=4, views=2, ema_decay=0.9, patience=5,
                  prefix_engine="torch")

    def tuned(name, resume=False):
        m = _small_model(32)
        res = ft.finetune(m, ds, cfg, RunDir(tmp_path / name), resume=resume, progress=False, echo=lambda *_: None)
        return m, res

    full, full_res = tuned("full")
    save = RunDir.save_checkpoint

    def save_then_die(self, path, ckpt):
        save(self, path, ckpt)
        if ckpt["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        tuned("killed")
    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    lines = []
    m = _small_model(32)
    res = ft.finetune(m, ds, cfg, RunDir(tmp_path / "killed"), resume=True, progress=False, echo=lines.append)
    assert any("after epoch 2" in line for line in lines)
    assert [h["val_loss"] for h in res.history] == [h["val_loss"] for h in full_res.history]
    assert [h["epoch"] for h in res.history] == [1, 2, 3] and res.best_epoch == full_res.best_epoch
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), full.state_dict().values(), strict=True))
    other = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"lr": 1e-3})})
    with pytest.raises(ValueError, match="another class map or finetune config"):
        ft.finetune(_small_model(32), ds, other, RunDir(tmp_path / "killed"), resume=True, progress=False,
                    echo=lambda *_: None)


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
    from conftest import require_shared_data
    from prodclass.pipeline import run

    root = require_shared_data()
    base = tmp_path_factory.mktemp("ft")
    c = _cfg(root, base, base / "cache")
    res = run(validate_config(c), root, run_dir=base / "run", progress=False, echo=lambda *_: None)
    return res.run_dir, c


@pytest.mark.shared_data
def test_finetuned_run_directory(ft_run):
    from prodclass.models.serialization import load_classifier

    run_dir, _ = ft_run
    run = RunDir(run_dir)
    for f in (run.weights_file, run.model_meta_file, run.history_file, run.metrics_file, run.predictions_file("val"),
              run.predictions_file("test")):
        assert f.is_file()
    assert not run.finetune_checkpoint.exists()
    hist = run.read_history()
    stages = [h["stage"] for h in hist]
    assert stages[0] == "head" and stages[-2:] == ["finetune", "finetune"] and set(stages) == {"head", "finetune"}
    assert all("val_macro_f1" in h for h in hist if h["stage"] == "finetune")
    m = run.read_metrics()
    assert m["finetune"]["epochs"] == 2 and m["finetune"]["input_size"] == 96
    served, meta = load_classifier(run)
    assert meta["stage"] == "finetune" and meta["preprocessing"]["input_size"] == 96
    # the stored test logits are what the served model computes from the images
    table, logits = run.read_predictions("test")
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
    first = RunDir(run_dir).read_metrics()
    for key in ("accuracy", "macro_f1", "log_loss"):
        assert res.metrics[key] == first[key]
    h1 = [h["val_loss"] for h in RunDir(run_dir).read_history()]
    h2 = [h["val_loss"] for h in RunDir(res.run_dir).read_history()]
    assert h1 == h2


KILL_AFTER_FIRST_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    from prodclass.runs import RunDir
    save = RunDir.save_checkpoint
    def save_then_die(self, path, ckpt):
        save(self, path, ckpt)
        if path == self.finetune_checkpoint:
            os.kill(os.getpid(), signal.SIGKILL)  # killed right after epoch 1 was checkpointed
    RunDir.save_checkpoint = save_then_die
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
    run = RunDir(run_dir)
    ckpt = run.load_checkpoint(run.finetune_checkpoint)  # weights_only=True
    assert {"model", "optimizer", "scheduler", "ema", "epoch", "best_metric", "config", "classes"} <= set(ckpt)
    assert ckpt["ema"] is not None
    assert ckpt["epoch"] == 1 and ckpt["config"]["finetune"]["epochs"] == 2 and not run.metrics_file.exists()

    resumed = subprocess.run([sys.executable, "-m", "prodclass.cli", "run", "--resume", str(run_dir), "--quiet"],
                             capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "after epoch 1" in resumed.stdout
    for f in (run.weights_file, run.metrics_file, run.predictions_file("val"), run.predictions_file("test"),
              run.config_file):
        assert f.is_file()
    assert not run.finetune_checkpoint.exists()
    hist = [h for h in run.read_history() if h["stage"] == "finetune"]
    assert [h["epoch"] for h in hist] == [1, 2]
    # the resumed run ends where the uninterrupted one did
    m0, m1 = RunDir(run_dir0).read_metrics(), run.read_metrics()
    assert (m1["accuracy"], m1["macro_f1"], m1["log_loss"]) == (m0["accuracy"], m0["macro_f1"], m0["log_loss"])


def test_cli_run_needs_config_or_resume():
    from typer.testing import CliRunner

    from prodclass.cli import app

    out = CliRunner().invoke(app, ["run"])
    assert out.exit_code == 2 and "--resume RUN_DIR" in out.output
