"""Progressive fine-tuning: the frozen-feature head, then the last backbone blocks, on images.

The strategy of the reference projects (and of Lightning's ``BackboneFinetuning`` / fastai's
``fine_tune``), in one place:

* **Stage 1 — head, backbone frozen.** :func:`prodclass.models.train.train_head` on cached embeddings:
  the backbone runs once per image in eval mode, so this *is* head training on a frozen
  backbone, only without recomputing it every epoch. The pipeline runs it; :func:`finetune`
  starts from its head.
* **Stage 2 — unfreeze the last N blocks** (``finetune.unfreeze_blocks`` entries of
  :attr:`prodclass.features.backbones.Backbone.blocks`, input-to-output), train them and the head on
  augmented images with AdamW (``backbone_lr`` for the blocks, ``lr`` for the head; no decay
  on biases/BatchNorm), linear warm-up + cosine or one-cycle schedule stepped per batch,
  gradient clipping, label smoothing, optional manifold mixup at the split point (``mixup``),
  dropout (the head's ``model.dropout`` and timm's 0.2 on the pooled features), class-weighted
  loss and/or class-balanced sampling, an exponential moving average of the weights
  (``ema_decay``; validated and kept instead of the raw weights, as timm's training script
  does), and early stopping on validation macro-F1 (the best epoch's
  weights are kept). BatchNorm layers of frozen blocks always stay in eval mode — in train mode
  they would keep updating running statistics of layers whose weights are frozen, the known
  fine-tuning pitfall; those of the unfrozen blocks too unless ``bn_train``.
* **Checkpoints.** After every epoch ``finetune_last.pt`` (atomic) holds ``{model, best_model,
  ema, optimizer, scheduler, epoch, best_metric, best_epoch, history, config, classes}``; a run
  that was killed resumes from it (``prodclass run --resume RUN_DIR``). Every random draw is
  seeded per epoch (sampling order, view choice, dropout), so a resumed run equals an
  uninterrupted one.

**CPU practicality: the frozen-prefix feature cache** (``finetune.feature_cache``, default on).
The frozen blocks are a fixed function, so their output for a given input never changes. Stage 2
runs them once per *view* — view 0 the unaugmented image, views 1..K-1 random augmentations
(:mod:`prodclass.models.augment`) — stores the activations (fp16 ``.npy`` memmap under
``<cache>/features/``, keyed by backbone, weights, preprocessing, split point, augmentation,
K, seed and image contents), and each epoch trains only the tail on one stored view per image
(chosen at random). The prefix runs in onnxruntime (~2x eager torch on 2 cores). The trade-off:
K fixed augmentations per image instead of a fresh one each epoch, K× prefix computation once
and K·N·C·H·W·2 bytes of disk (abo-small, 224 px, last 3 blocks: 2938 × 8 × 112×14×14 → 1 GB),
against epochs that skip image decoding and the prefix entirely (~3x cheaper each; last-3-blocks
steps cost ~7 ms/image, the whole network ~45). Measured on the stored abo-small split (37 classes,
stage-1 head 0.903 test accuracy; dev runs, test accuracy of the selected epoch): last 3 blocks with
K=8 views and weight EMA 0.912 in 12 epochs of ~25 s; K=16 no better (and K=4 0.5 point worse
than K=8 from an earlier 0.891 head); 4 unfrozen blocks no better at twice the epoch cost; manifold
mixup (alpha 0.2) lowered validation macro-F1; the whole network but the stem, trained online
(``feature_cache: false``, 8 epochs of ~145 s) reached only 0.903. On this data the cached
last-3-blocks setup is both the cheapest and the best. ``feature_cache: false`` augments online and
runs the frozen prefix under ``no_grad`` every batch (the usual GPU setup; the same code with
``device: cuda``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from prodclass.models.augment import Augment
from prodclass.config import FinetuneConfig, RunConfig, resolve_cache_dir
from prodclass.models.data import ImageDataset
from prodclass.io import read_json, save_torch, write_json

log = logging.getLogger(__name__)

CHECKPOINT = "finetune_last.pt"
# finetune settings that may change on --resume without changing the result
_RESUMABLE = ("device", "num_workers")


# ---------------------------------------------------------------------------------------------
# freezing and forward passes split at a block boundary


def split_index(model, unfreeze_blocks: int) -> int:
    """Index ``k`` into ``model.backbone.blocks`` where the trainable tail starts.

    Raises:
        ValueError: ``unfreeze_blocks`` is not in ``1..len(blocks)``.
    """
    n = len(model.backbone.blocks)
    if not 1 <= unfreeze_blocks <= n:
        raise ValueError(f"finetune.unfreeze_blocks={unfreeze_blocks}: {model.backbone.name} has {n} blocks")
    return n - unfreeze_blocks


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Apply backbone blocks in order (a ``ModuleList`` entry such as the stem applies its parts in turn)."""
    for b in blocks:
        for m in b if isinstance(b, nn.ModuleList) else (b,):
            x = m(x)
    return x


def prefix_forward(model, x: torch.Tensor, k: int) -> torch.Tensor:
    """Frozen part: ``(B, 3, S, S)`` images → activations entering block ``k``."""
    return run_blocks(model.backbone.blocks[:k], x)


def tail_forward(model, h: torch.Tensor, k: int) -> torch.Tensor:
    """Trainable part: activations entering block ``k`` → ``(B, C)`` logits.
    ``tail_forward(m, prefix_forward(m, x, k), k) == m(x)`` for every ``k``."""
    bb = model.backbone
    return model.head(bb.model.forward_head(run_blocks(bb.blocks[k:], h), pre_logits=True))


def materialize(model) -> None:
    """Replace inference tensors among ``model``'s parameters and buffers by ordinary copies (a
    module converted inside ``torch.inference_mode``, as :func:`prodclass.features.embeddings.embed_images`
    does with ``channels_last``, cannot be trained otherwise)."""
    with torch.no_grad():
        for m in model.modules():
            for name, p in list(m.named_parameters(recurse=False)):
                if p.is_inference():
                    setattr(m, name, nn.Parameter(p.clone(), requires_grad=p.requires_grad))
            for name, b in list(m.named_buffers(recurse=False)):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()


def freeze(model, unfreeze_blocks: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Set ``requires_grad``: the head and the last ``unfreeze_blocks`` blocks train, the rest not.
    ``unfreeze_blocks=0`` is stage 1 (head only).

    Returns:
        ``(backbone_params, head_params)`` that are trainable.
    """
    blocks = model.backbone.blocks
    k = len(blocks) - unfreeze_blocks if unfreeze_blocks else len(blocks)
    model.backbone.requires_grad_(False)
    for b in blocks[k:]:
        b.requires_grad_(True)
    model.head.requires_grad_(True)
    return [p for b in blocks[k:] for p in b.parameters()], list(model.head.parameters())


def set_train_mode(model, unfreeze_blocks: int, bn_train: bool = False) -> None:
    """Train mode for the trainable part only: frozen blocks (and all their BatchNorm layers) in
    eval mode; BatchNorm of the unfrozen blocks in eval mode too unless ``bn_train``."""
    model.train()
    blocks = model.backbone.blocks
    k = len(blocks) - unfreeze_blocks if unfreeze_blocks else len(blocks)
    for b in blocks[:k]:
        b.eval()
    if not bn_train:
        for m in model.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# ---------------------------------------------------------------------------------------------
# class imbalance, optimiser, schedule


def make_criterion(dataset, cfg: FinetuneConfig) -> nn.CrossEntropyLoss:
    """Cross-entropy with label smoothing and, for ``class_weighting: balanced``, the weights of
    :func:`prodclass.models.train.class_weights` computed from the **train split only** of ``dataset``
    (a :class:`prodclass.curate.rules.Dataset`)."""
    from prodclass.models.train import class_weights

    weight = class_weights(dataset.labels("train"), len(dataset.classes)) if cfg.class_weighting == "balanced" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def epoch_order(y_train: np.ndarray, num_classes: int, cfg: FinetuneConfig, epoch: int) -> np.ndarray:
    """The train-row indices of one epoch, ``(N,)`` int64, seeded by ``(seed, epoch)``.

    ``sampler: shuffle``: a permutation. ``balanced``: N draws with replacement, each row weighted
    ``1 / count(its class)`` (torch's ``WeightedRandomSampler``), so every class is drawn equally often
    in expectation.
    """
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    n = len(y_train)
    if cfg.sampler == "balanced":
        counts = np.bincount(y_train, minlength=num_classes)
        w = torch.as_tensor(1.0 / counts[y_train], dtype=torch.float64)
        return np.fromiter(torch.utils.data.WeightedRandomSampler(w, n, replacement=True, generator=g), np.int64, n)
    return torch.randperm(n, generator=g).numpy()


def make_optimizer(backbone_params, head_params, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW with discriminative learning rates; 1-D tensors (biases, BatchNorm) get no decay."""
    groups = []
    for params, lr in ((backbone_params, cfg.backbone_lr), (head_params, cfg.lr)):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [{"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
                   {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def make_scheduler(optimizer, cfg: FinetuneConfig, steps_per_epoch: int):
    """Per-batch schedule over ``cfg.epochs``: linear warm-up for ``warmup_epochs`` then cosine
    decay to 1% (or constant); ``onecycle`` is torch's ``OneCycleLR`` (warm-up = its rising part)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
            pct_start=max(warm, 1) / total, anneal_strategy="cos")

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# frozen-prefix feature cache and image-level inference


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``ValueError`` for cuda without a GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"finetune.device={name}: no CUDA device here (use cpu or auto)")
    return dev


def _to(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, torch.float32, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def prefix_runner(model, k: int, engine: str = "torch", device="cpu", channels_last: bool = True):
    """The frozen prefix as a function for the feature cache: float32 ``(B, 3, S, S)`` CPU tensor →
    float32 ``(B, C, H, W)`` NumPy array.

    ``engine="onnxruntime"`` exports blocks ``[:k]`` to ONNX (in memory) and runs them with
    onnxruntime's CPU provider, ~2x faster than eager torch on 2 cores (see
    ``benchmarks/bench_finetune.py --speed``); its output is checked against torch on a random
    batch (max abs difference must be under 1e-3 of the activations' range). ``torch`` runs the
    module itself (any device).

    Raises:
        RuntimeError: onnxruntime's output disagrees with torch's.
    """
    model.eval()
    if engine == "torch":
        @torch.inference_mode()
        def run(x: torch.Tensor) -> np.ndarray:
            return prefix_forward(model, _to(x, device, channels_last), k).float().cpu().numpy()
        return run
    import io
    import warnings

    import onnxruntime as ort

    class Prefix(nn.Module):
        def forward(self, x):
            return prefix_forward(model, x, k)

    size = model.backbone.preprocessing.input_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)  # the tracer only folds in weights that need no gradient
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Prefix().eval(), (x.to(device),), buf, input_names=["x"], output_names=["h"],
                              dynamic_axes={"x": {0: "batch"}}, opset_version=17, dynamo=False)
            ref = prefix_forward(model, _to(x, device, channels_last), k).float().cpu().numpy()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    diff = float(np.abs(sess.run(None, {"x": x.numpy()})[0] - ref).max())
    if diff > 1e-3 * max(1.0, float(np.abs(ref).max())):
        raise RuntimeError(f"onnxruntime prefix differs from torch by {diff:.2e}; use finetune.prefix_engine=torch")
    return lambda x: sess.run(None, {"x": np.ascontiguousarray(x.numpy(), np.float32)})[0]


def prefix_features(run, ds: ImageDataset, path: Path, batch_size: int = 32, num_workers: int = 0,
                    progress: bool = True, flush_every: int = 512) -> np.ndarray:
    """Run the frozen prefix over every item of ``ds`` once and store the result.

    Args:
        run: the prefix, from :func:`prefix_runner`.
        ds: an :class:`ImageDataset` with ``views=K`` (N·K items, view 0 unaugmented).
        path: the ``.npy`` file; if it exists it is returned as it is. Work in progress lives in
            ``path.partial`` with a ``.done.json`` count (flushed every ``flush_every`` rows), so an interrupted
            pass continues where it stopped; the finished file is moved into place atomically.

    Returns:
        Read-only memmap, float16 ``(N, K, C, H, W)``.

    Raises:
        prodclass.preprocess.ImageError: an image that cannot be decoded (names the file).
    """
    from tqdm.auto import tqdm

    path = Path(path)
    if path.is_file():
        return np.load(path, mmap_mode="r")
    partial, done_file = path.with_suffix(".npy.partial"), path.with_suffix(".done.json")
    n, views = len(ds.paths), ds.views
    shape = run(ds[0][0][None]).shape[1:]
    done = 0
    if partial.is_file() and done_file.is_file():
        mm = np.lib.format.open_memmap(partial, mode="r+")
        done = read_json(done_file)["done"] if mm.shape == (n, views, *shape) else 0
    if done == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(n, views, *shape))
    flat = mm.reshape(n * views, *shape)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(done, n * views)),
                                         batch_size=batch_size, num_workers=num_workers)
    last_flush = done
    with tqdm(total=n * views, initial=done, desc="frozen-prefix features", unit="view", disable=not progress) as bar:
        for x, _ in loader:
            flat[done : done + len(x)] = run(x).astype(np.float16)
            done += len(x)
            bar.update(len(x))
            if done - last_flush >= flush_every:
                mm.flush()
                write_json(done_file, {"done": done})
                last_flush = done
    mm.flush()
    del flat, mm
    os.replace(partial, path)
    done_file.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


def feature_cache_key(model, k: int, cfg: FinetuneConfig, paths: Sequence[str], weights: str | None, views: int,
                      engine: str) -> str:
    """Folder name for stored activations: a hash of everything they depend on — backbone, weights,
    preprocessing, split point ``k``, engine, views, seed, augmentation — and the image *contents*."""
    from prodclass.features.embeddings import EmbeddingCache
    from prodclass.io import file_sha1

    emb_key = EmbeddingCache.for_backbone("", model.backbone, weights).dir.name  # backbone+weights+preprocessing
    h = hashlib.sha1(json.dumps({"backbone": emb_key, "k": k, "views": views, "engine": engine, "seed": cfg.seed,
                                 "augment": cfg.augment.model_dump(mode="json") if views > 1 else None},
                                sort_keys=True).encode())
    for p in paths:
        h.update(file_sha1(p).encode())
    return f"{emb_key}-k{k}-{h.hexdigest()[:16]}"


def predict_logits(model, paths: Sequence[str], batch_size: int = 32, device="cpu", channels_last: bool = True,
                   num_workers: int = 0, progress: bool = False) -> np.ndarray:
    """Logits of the whole Classifier on image files, through its own preprocessing (as serving).

    Returns:
        float32 ``(N, C)``.

    Raises:
        prodclass.preprocess.ImageError: an image that cannot be decoded (names the file).
    """
    from tqdm.auto import tqdm

    if not len(paths):
        raise ValueError("predict_logits: no images")
    model.eval().to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    loader = torch.utils.data.DataLoader(ImageDataset(paths, None, model.backbone.preprocessing),
                                         batch_size=batch_size, num_workers=num_workers)
    with torch.inference_mode():
        out = [model(_to(x, device, channels_last)).float().cpu()
               for x, _ in tqdm(loader, desc="predicting", unit="batch", disable=not progress)]
    model.to("cpu", memory_format=torch.contiguous_format)
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------------------
# stage 2


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: per-epoch history (``stage: finetune``), the epoch whose
    weights the model holds, and timing/cache figures for ``metrics.json``."""

    history: list[dict]
    best_epoch: int
    info: dict = field(default_factory=dict)


def save_checkpoint(path: Path, ckpt: dict) -> None:
    """Atomically write the per-epoch checkpoint (a separate function so tests can kill after it)."""
    save_torch(path, ckpt)


def _macro_f1(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, labels=np.arange(num_classes), average="macro", zero_division=0))


def finetune(model, dataset, cfg: RunConfig, run_dir: str | Path, resume: bool = False,
             progress: bool = True, echo=print) -> FinetuneResult:
    """Stage 2: unfreeze the last ``cfg.finetune.unfreeze_blocks`` blocks and train on images.

    Args:
        model: a :class:`prodclass.models.heads.Classifier` whose head finished stage 1; trained in place
            and left (on the CPU, eval mode) with the weights of the best validation macro-F1 epoch.
        dataset: the run's :class:`prodclass.curate.rules.Dataset` (train rows train, val rows select).
        cfg: the resolved run config (``finetune`` section; ``embed.cache_dir``, ``model.weights``).
        run_dir: where ``finetune_last.pt`` is written after every epoch.
        resume: continue from ``run_dir/finetune_last.pt`` when it exists (else start over).

    Returns:
        :class:`FinetuneResult`.

    Raises:
        ValueError: a bad ``unfreeze_blocks``/device, or a checkpoint from another config or class map.
        prodclass.preprocess.ImageError: an image that cannot be decoded.
    """
    from tqdm.auto import tqdm

    fc = cfg.finetune
    t0 = time.perf_counter()
    device = resolve_device(fc.device)
    run_dir = Path(run_dir)
    k = split_index(model, fc.unfreeze_blocks)
    num_classes = len(dataset.classes)
    tr, va = dataset.split_table("train"), dataset.split_table("val")
    y_tr, y_va = dataset.labels("train"), dataset.labels("val")
    prep = model.backbone.preprocessing
    augment = Augment(fc.augment)

    materialize(model)
    model.to(device)
    if fc.channels_last:
        model.to(memory_format=torch.channels_last)
    bb_params, head_params = freeze(model, fc.unfreeze_blocks)
    cache_info = {"enabled": fc.feature_cache}
    if fc.feature_cache:  # run the frozen prefix once per view; epochs train the tail on stored activations
        t = time.perf_counter()
        root = resolve_cache_dir(cfg.embed.cache_dir) / "features"
        engine = fc.prefix_engine if fc.prefix_engine != "auto" else ("torch" if device.type == "cuda" else "onnxruntime")
        run_prefix, stores = None, {}
        for name, rows, y, views, aug in (("train", tr, y_tr, fc.views, augment), ("val", va, y_va, 1, None)):
            paths = rows["image_path"].tolist()
            file = root / feature_cache_key(model, k, fc, paths, cfg.model.weights, views, engine) / f"{name}.npy"
            reused = file.is_file()
            if not reused and run_prefix is None:
                run_prefix = prefix_runner(model, k, engine, device, fc.channels_last)
            stores[name] = prefix_features(run_prefix, ImageDataset(paths, y, prep, aug, fc.seed, views=views), file,
                                           fc.batch_size, fc.num_workers, progress)
            cache_info[name] = {"file": str(file), "shape": list(stores[name].shape), "reused": reused,
                                "mbytes": round(stores[name].nbytes / 2**20, 1)}
        cache_info.update(engine=engine, seconds=round(time.perf_counter() - t, 2))
        echo(f"finetune: frozen-prefix features ({fc.views} views/train image, {tuple(stores['train'].shape[2:])} each, "
             f"{cache_info['train']['mbytes'] + cache_info['val']['mbytes']:.0f} MB) in {cache_info['seconds']:.0f}s")
    else:
        train_ds = ImageDataset(tr["image_path"].tolist(), y_tr, prep, augment, fc.seed)
        val_ds = ImageDataset(va["image_path"].tolist(), y_va, prep)

    def batches(epoch: int):
        """(prefix activations, labels) batches of one epoch, on the device."""
        order = epoch_order(y_tr, num_classes, fc, epoch)
        chunks = [np.sort(order[i : i + fc.batch_size]) for i in range(0, len(order), fc.batch_size)]
        if fc.feature_cache:
            view = np.random.default_rng([fc.seed, epoch]).integers(fc.views, size=len(y_tr))
            for idx in chunks:
                yield (_to(torch.from_numpy(np.asarray(stores["train"][idx, view[idx]])), device, fc.channels_last),
                       torch.tensor(y_tr[idx]).to(device))
        else:
            train_ds.set_epoch(epoch)
            for x, y in torch.utils.data.DataLoader(train_ds, batch_sampler=chunks, num_workers=fc.num_workers):
                with torch.no_grad():
                    h = prefix_forward(model, _to(x, device, fc.channels_last), k)
                yield h, y.to(device)

    @torch.inference_mode()
    def val_logits(net) -> torch.Tensor:
        net.eval()
        if fc.feature_cache:
            feats = stores["val"]
            return torch.cat([tail_forward(net, _to(torch.from_numpy(np.array(feats[i : i + 256, 0])), device,
                                                     fc.channels_last), k).float().cpu()
                              for i in range(0, len(feats), 256)])
        loader = torch.utils.data.DataLoader(val_ds, batch_size=fc.batch_size, num_workers=fc.num_workers)
        return torch.cat([net(_to(x, device, fc.channels_last)).float().cpu() for x, _ in loader])

    criterion = make_criterion(dataset, fc).to(device)
    optimizer = make_optimizer(bb_params, head_params, fc)
    steps_per_epoch = math.ceil(len(y_tr) / fc.batch_size)
    scheduler = make_scheduler(optimizer, fc, steps_per_epoch)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    ckpt_path = run_dir / CHECKPOINT
    history, start, best_f1, best_epoch, best_state = [], 1, -1.0, 0, None
    cfg_json = cfg.model_dump(mode="json")
    start_f1 = _macro_f1(y_va, val_logits(model).argmax(1).numpy(), num_classes)  # the stage-1 model
    ema = None  # weight EMA (torch.optim.swa_utils), validated and selected instead of the live weights
    if fc.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(fc.ema_decay), use_buffers=True)
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        same = {a: b for a, b in ck["config"]["finetune"].items() if a not in _RESUMABLE} == \
               {a: b for a, b in cfg_json["finetune"].items() if a not in _RESUMABLE}
        if ck["classes"] != dataset.classes or not same:
            raise ValueError(f"{ckpt_path}: checkpoint was written with another class map or finetune config")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        history, start = ck["history"], ck["epoch"] + 1
        best_f1, best_epoch, best_state = ck["best_metric"], ck["best_epoch"], ck["best_model"]
        echo(f"finetune: resuming {ckpt_path} after epoch {ck['epoch']} (best val macro-F1 {best_f1:.4f} at {best_epoch})")
    else:
        ckpt_path.unlink(missing_ok=True)
    stopped = bool(history) and (start - 1 - best_epoch >= fc.patience)

    echo(f"finetune: unfreezing {fc.unfreeze_blocks} of {len(model.backbone.blocks)} blocks "
         f"({sum(p.numel() for p in bb_params) / 1e6:.2f}M backbone + {sum(p.numel() for p in head_params) / 1e6:.2f}M head "
         f"parameters) at {prep.input_size}px on {device}; start val macro-F1 {start_f1:.4f}")
    bar = tqdm(range(start, fc.epochs + 1), desc="fine-tuning", unit="epoch", disable=not progress or stopped)
    for epoch in bar if not stopped else ():
        te = time.perf_counter()
        torch.manual_seed(fc.seed * 1_000_003 + epoch)  # dropout: the same draws with or without a resume
        set_train_mode(model, fc.unfreeze_blocks, fc.bn_train)
        loss_sum, correct, seen = 0.0, 0, 0
        mix_rng = np.random.default_rng([fc.seed, epoch, 1])
        for h, y in batches(epoch):
            if fc.mixup > 0:  # manifold mixup on the tail's input: the stored activations or the prefix output
                lam = float(mix_rng.beta(fc.mixup, fc.mixup))
                perm = torch.from_numpy(mix_rng.permutation(len(y))).to(y.device)
                logits = tail_forward(model, lam * h + (1 - lam) * h[perm], k)
                loss = lam * criterion(logits, y) + (1 - lam) * criterion(logits, y[perm])
            else:
                logits = tail_forward(model, h, k)
                loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if fc.grad_clip:
                nn.utils.clip_grad_norm_(trainable, fc.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        selected = model if ema is None else ema.module
        lv = val_logits(selected)
        yv = torch.tensor(y_va)
        val_f1 = _macro_f1(y_va, lv.argmax(1).numpy(), num_classes)
        history.append(dict(epoch=epoch, stage="finetune", train_loss=loss_sum / seen, train_acc=correct / seen,
                            val_loss=F.cross_entropy(lv, yv).item(), val_acc=(lv.argmax(1) == yv).float().mean().item(),
                            val_macro_f1=val_f1, lr=optimizer.param_groups[-1]["lr"],
                            backbone_lr=optimizer.param_groups[0]["lr"], seconds=round(time.perf_counter() - te, 2)))
        if val_f1 > best_f1 + 1e-4:
            best_f1, best_epoch, best_state = val_f1, epoch, copy.deepcopy(selected.state_dict())
        bar.set_postfix(val_f1=f"{val_f1:.4f}", best=best_epoch)
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "best_model": best_state,
                                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "ema": ema.state_dict() if ema is not None else None,
                                    "epoch": epoch, "best_metric": best_f1, "best_epoch": best_epoch,
                                    "history": history, "config": cfg_json, "classes": list(dataset.classes)})
        if epoch - best_epoch >= fc.patience:
            log.info("early stopping at epoch %d (best %d, val macro-F1 %.4f)", epoch, best_epoch, best_f1)
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    model.requires_grad_(False)
    history = [dict(h, best=h["epoch"] == best_epoch) for h in history]
    ft_seconds = [h["seconds"] for h in history]
    info = {"unfreeze_blocks": fc.unfreeze_blocks, "input_size": prep.input_size, "device": str(device),
            "epochs": len(history), "best_epoch": best_epoch, "best_val_macro_f1": best_f1,
            "start_val_macro_f1": start_f1, "seconds_per_epoch": round(float(np.mean(ft_seconds)), 2) if ft_seconds else None,
            "trainable_params": sum(p.numel() for p in trainable), "feature_cache": cache_info,
            "seconds": round(time.perf_counter() - t0, 2)}
    return FinetuneResult(history=history, best_epoch=best_epoch, info=info)


def run_preprocessing(cfg: RunConfig):
    """The run's preprocessing when fine-tuning sets ``finetune.input_size`` (the backbone's own
    resize/crop ratio, mean, std and interpolation at that size), else ``None`` (the backbone's).
    The pipeline builds the backbone with it, so embeddings, fine-tuning, ``model.pt`` and serving
    all use one preprocessing."""
    import dataclasses

    from prodclass.features.backbones import get_spec

    if not (cfg.finetune.enabled and cfg.finetune.input_size):
        return None
    p = get_spec(cfg.model.backbone).preprocessing
    s = cfg.finetune.input_size
    return dataclasses.replace(p, input_size=s, resize_size=round(s * p.resize_size / p.input_size))
