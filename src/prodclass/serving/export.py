"""ONNX export of a run's model (backbone + head), with the JSON sidecar a Predictor needs.

:func:`export_onnx` writes into the run directory::

    model.onnx          float32 graph: input ``images`` (B, 3, H, W) → output ``logits`` (B, C),
                        dynamic batch, opset 17 (torch's TorchScript exporter)
    model.onnx.json     sidecar: classes, preprocessing, temperature, threshold, backbone, parity
    model.int8.onnx     (``int8=True``) static INT8 quantisation (QDQ, per-channel weights),
    model.int8.onnx.json   calibrated on training images; its sidecar records the accuracy change

Before anything is written the export is checked against torch on real images of the run
(its stored test split): the largest absolute difference of calibrated probabilities must be
under ``PARITY_TOL`` and the top-1 classes identical, else :class:`ExportError`.
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

from prodclass.io import read_json, write_bytes, write_json
from prodclass.serving.predictor import INT8_FILE, ONNX_FILE, OnnxBackend, Predictor, sidecar_path

log = logging.getLogger(__name__)

PARITY_TOL = 1e-4
SIDECAR_FORMAT = "prodclass-onnx"


class ExportError(RuntimeError):
    """The exported graph does not reproduce the torch model (message gives the numbers)."""


def export_onnx(run_dir: str | Path, opset: int = 17, parity_images: int = 32, int8: bool = False,
                calibration_images: int = 128, progress: bool = False) -> dict:
    """Export ``run_dir/model.pt`` to ``run_dir/model.onnx`` + ``model.onnx.json``.

    Args:
        run_dir: a run directory written by :func:`prodclass.pipeline.run`.
        opset: ONNX opset (17+: LayerNorm etc. are native; EfficientNet needs only 11).
        parity_images: test-split images of the run used for the parity check (0: random inputs).
        int8: also write ``model.int8.onnx`` (static INT8; faster on CPUs with VNNI, not exact).
        calibration_images: training images used to calibrate the INT8 activation ranges.

    Returns:
        The sidecar dict (``parity``: ``max_abs_diff`` of probabilities and ``top1_agree``, over
        ``n`` images; with ``int8`` also ``int8`` with its test accuracy vs the float model's).

    Raises:
        FileNotFoundError: no ``model.pt``. ExportError: the parity check failed.
    """
    import onnx
    import torch

    from prodclass.runs import load_model, read_optional

    run_dir = Path(run_dir)
    model, ckpt = load_model(run_dir)
    torch_pred = Predictor.from_run(run_dir, backend="torch")
    prep = torch_pred.preprocessing
    dummy = torch.zeros(2, 3, prep.input_size, prep.input_size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (dummy,), buf, dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))

    x, names = _sample_images(run_dir, prep, "test", parity_images)
    onnx_pred = Predictor(OnnxBackend(data), torch_pred.classes, prep, torch_pred.temperature)
    p_torch, p_onnx = torch_pred.predict_proba(x), onnx_pred.predict_proba(x)
    diff = float(np.abs(p_torch - p_onnx).max())
    agree = float((p_torch.argmax(1) == p_onnx.argmax(1)).mean())
    if diff >= PARITY_TOL or agree < 1.0:
        raise ExportError(f"{run_dir}: ONNX export differs from torch on {len(x)} images: max |Δp| = {diff:.2e} "
                          f"(tolerance {PARITY_TOL:.0e}), top-1 agreement {agree:.3f}")
    sidecar = {
        "format": SIDECAR_FORMAT, "format_version": 1, "model": ONNX_FILE, "input": "images", "output": "logits",
        "classes": torch_pred.classes, "preprocessing": prep.to_dict(),
        "temperature": torch_pred.temperature, "threshold": read_optional(run_dir, "abstention.json").get("threshold"),
        "backbone": ckpt["backbone"], "opset": opset, "source_run": str(run_dir.resolve()),
        "parity": {"n": len(x), "images": names[:3], "max_abs_diff": diff, "top1_agree": agree},
    }
    write_bytes(run_dir / ONNX_FILE, data)
    write_json(sidecar_path(run_dir / ONNX_FILE), sidecar)
    log.info("wrote %s (max |Δp| %.1e over %d images)", run_dir / ONNX_FILE, diff, len(x))
    if int8:
        sidecar["int8"] = quantize_int8(run_dir, sidecar, calibration_images)
    return sidecar


def quantize_int8(run_dir: str | Path, sidecar: dict, calibration_images: int = 128) -> dict:
    """Static INT8 quantisation of ``run_dir/model.onnx`` → ``model.int8.onnx`` + sidecar.

    onnxruntime.quantization: ``quant_pre_process`` (shape inference, fusions), then
    ``quantize_static`` in QDQ format with per-channel int8 weights and uint8 activations whose
    ranges are the min/max over ``calibration_images`` training images of the run.

    Returns:
        ``{"file", "calibration_images", "test_n", "test_accuracy_fp32", "test_accuracy_int8",
        "top1_agree", "max_abs_diff"}``, measured on the run's whole stored test split.
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    run_dir = Path(run_dir)
    prep = Predictor.from_onnx(run_dir / ONNX_FILE).preprocessing
    xc, _ = _sample_images(run_dir, prep, "train", calibration_images)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": xc[i:i + 16]} for i in range(0, len(xc), 16)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(run_dir / ONNX_FILE), str(pre))
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        write_bytes(run_dir / INT8_FILE, out.read_bytes())
    xt, _ = _sample_images(run_dir, prep, "test", None)
    yt = _split_labels(run_dir, "test")
    p32 = Predictor.from_onnx(run_dir / ONNX_FILE).predict_proba(xt)
    side = {**sidecar, "model": INT8_FILE, "parity": None}
    write_json(sidecar_path(run_dir / INT8_FILE), side)
    p8 = Predictor.from_onnx(run_dir / INT8_FILE).predict_proba(xt)
    info = {"file": INT8_FILE, "calibration_images": len(xc), "test_n": len(xt),
            "test_accuracy_fp32": float((p32.argmax(1) == yt).mean()), "test_accuracy_int8": float((p8.argmax(1) == yt).mean()),
            "top1_agree": float((p32.argmax(1) == p8.argmax(1)).mean()), "max_abs_diff": float(np.abs(p32 - p8).max())}
    write_json(sidecar_path(run_dir / INT8_FILE), {**side, "quantization": info})
    return info


def _split_rows(run_dir: Path, split: str, n: int | None = None):
    """Rows of a stored split (``dataset.parquet``); ``n`` evenly spaced ones (the table is
    sorted by class, so this spreads them over classes)."""
    import pandas as pd

    t = pd.read_parquet(run_dir / "dataset.parquet")
    t = t[t["split"] == split].reset_index(drop=True)
    if n is not None and n < len(t):
        t = t.iloc[np.unique(np.linspace(0, len(t) - 1, n).round().astype(int))].reset_index(drop=True)
    return t


def _split_labels(run_dir: Path, split: str) -> np.ndarray:
    classes = {c: i for i, c in enumerate(read_json(run_dir / "class_map.json")["classes"])}
    return _split_rows(run_dir, split)["label"].map(classes).to_numpy()


def _sample_images(run_dir: Path, prep, split: str, n: int | None) -> tuple[np.ndarray, list[str]]:
    """Up to ``n`` (None: all) preprocessed images of a stored split, float32 ``(n, 3, H, W)``;
    random ones (seed 0) when the run's images are not readable from here."""
    from concurrent.futures import ThreadPoolExecutor

    paths = _split_rows(run_dir, split, n)["image_path"].tolist() if (run_dir / "dataset.parquet").is_file() else []
    if paths and all(Path(p).is_file() for p in paths):
        with ThreadPoolExecutor(2) as pool:
            return np.stack(list(pool.map(prep, paths))), [str(p) for p in paths]
    log.warning("%s: %s images not readable; checking on random inputs", run_dir, split)
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (n or 8, 3, prep.input_size, prep.input_size)).astype(np.float32), []
