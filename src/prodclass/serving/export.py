"""ONNX export of a run's model (backbone + head), with the JSON sidecar a Predictor needs.

:func:`export_onnx` writes through :meth:`prodclass.runs.RunDir.write_onnx`: a float32 graph,
input ``images`` (B, 3, H, W) → output ``logits`` (B, C), dynamic batch, opset 17 (torch's
TorchScript exporter), and its sidecar (classes, preprocessing, temperature, threshold,
backbone, parity); with ``int8=True`` also a static INT8 quantisation (QDQ, per-channel weights)
calibrated on training images, whose sidecar records the accuracy change.

Before anything is written the export is checked against torch on real images of the run (its
stored test split), both run through :meth:`Predictor.logits` — the one inference path: the
largest absolute difference of calibrated probabilities must be under ``PARITY_TOL`` and the
top-1 classes identical, else :class:`ExportError`.
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

from prodclass.inference import OnnxBackend, softmax
from prodclass.runs import RunDir
from prodclass.serving.predictor import SIDECAR_FORMAT, Predictor

log = logging.getLogger(__name__)

PARITY_TOL = 1e-4


class ExportError(RuntimeError):
    """The exported graph does not reproduce the torch model (message gives the numbers)."""


def export_onnx(run_dir: str | Path, opset: int = 17, parity_images: int = 32, int8: bool = False,
                calibration_images: int = 128, progress: bool = False) -> dict:
    """Export the run's model to ONNX (``RunDir.onnx_file()``) with its JSON sidecar.

    Args:
        run_dir: a run directory written by :func:`prodclass.pipeline.run`.
        opset: ONNX opset (17+: LayerNorm etc. are native; EfficientNet needs only 11).
        parity_images: test-split images of the run used for the parity check (0: random inputs).
        int8: also write the static INT8 export (faster on CPUs with VNNI, not exact).
        calibration_images: training images used to calibrate the INT8 activation ranges.

    Returns:
        The sidecar dict (``parity``: ``max_abs_diff`` of probabilities and ``top1_agree``, over
        ``n`` images; with ``int8`` also ``int8`` with its test accuracy vs the float model's).

    Raises:
        prodclass.runs.RunDirError: no loadable model. ExportError: the parity check failed.
    """
    run = RunDir.open(run_dir)
    torch_pred = Predictor.from_run(run, backend="torch")
    data = _onnx_bytes(torch_pred, opset)
    onnx_pred = Predictor(OnnxBackend(data), torch_pred.classes, torch_pred.preprocessing, torch_pred.temperature)
    paths = _split_rows(run.read_dataset()[0], "test", parity_images)["image_path"].tolist() if parity_images else []
    diff, agree, n = _parity(torch_pred, onnx_pred, paths)
    if diff >= PARITY_TOL or agree < 1.0:
        raise ExportError(f"{run.path}: ONNX export differs from torch on {n} images: max |Δp| = {diff:.2e} "
                          f"(tolerance {PARITY_TOL:.0e}), top-1 agreement {agree:.3f}")
    sidecar = {
        "format": SIDECAR_FORMAT, "format_version": 1, "model": run.onnx_file().name, "input": "images",
        "output": "logits", "classes": torch_pred.classes, "preprocessing": torch_pred.preprocessing.to_dict(),
        "temperature": torch_pred.temperature, "threshold": torch_pred.threshold,
        "backbone": torch_pred.meta.get("backbone"), "opset": opset, "source_run": str(run.path.resolve()),
        "parity": {"n": n, "images": paths[:3], "max_abs_diff": diff, "top1_agree": agree},
    }
    run.write_onnx(data, sidecar)
    log.info("wrote %s (max |Δp| %.1e over %d images)", run.onnx_file(), diff, n)
    if int8:
        sidecar["int8"] = quantize_int8(run, sidecar, calibration_images)
    return sidecar


def _onnx_bytes(torch_pred: Predictor, opset: int) -> bytes:
    """The Predictor's torch model as a checked ONNX graph: ``images`` (B, 3, H, W) → ``logits`` (B, C)."""
    import onnx
    import torch

    size = torch_pred.preprocessing.input_size
    model = torch_pred.model.to(memory_format=torch.contiguous_format)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(2, 3, size, size),), buf, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    model.to(memory_format=torch.channels_last)
    onnx.checker.check_model(onnx.load_from_string(buf.getvalue()))
    return buf.getvalue()


def _parity(a: Predictor, b: Predictor, paths: list[str]) -> tuple[float, float, int]:
    """``(max |Δp|, top-1 agreement, n)`` of two Predictors on image files (through
    :meth:`Predictor.logits`), or on 8 random inputs when the run's images are not readable here."""
    if paths and all(Path(p).is_file() for p in paths):
        za, zb = a.logits(paths)[0], b.logits(paths)[0]
    else:
        log.warning("test images not readable; checking on random inputs")
        s = a.preprocessing.input_size
        x = np.random.default_rng(0).uniform(-1, 1, (8, 3, s, s)).astype(np.float32)
        za, zb = a.predict_logits(x), b.predict_logits(x)
    pa, pb = softmax(za, a.temperature), softmax(zb, b.temperature)
    return float(np.abs(pa - pb).max()), float((pa.argmax(1) == pb.argmax(1)).mean()), len(za)


def quantize_int8(run: RunDir | str | Path, sidecar: dict, calibration_images: int = 128) -> dict:
    """Static INT8 quantisation of the run's ONNX export → the INT8 export + sidecar.

    onnxruntime.quantization: ``quant_pre_process`` (shape inference, fusions), then
    ``quantize_static`` in QDQ format with per-channel int8 weights and uint8 activations whose
    ranges are the min/max over ``calibration_images`` training images of the run.

    Returns:
        ``{"file", "calibration_images", "test_n", "test_accuracy_fp32", "test_accuracy_int8",
        "top1_agree", "max_abs_diff"}``, measured on the run's whole stored test split.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    fp32 = Predictor.from_onnx(run.onnx_file())
    table = run.read_dataset()[0]
    calib = _split_rows(table, "train", calibration_images)["image_path"].tolist()
    data = _quantized(run.onnx_file(), np.stack([fp32.preprocessing(p) for p in calib]))
    q = Predictor(OnnxBackend(data), fp32.classes, fp32.preprocessing, fp32.temperature)
    test = _split_rows(table, "test")
    yt = test["label"].map({c: i for i, c in enumerate(fp32.classes)}).to_numpy()
    p32 = softmax(fp32.logits(test["image_path"].tolist())[0], fp32.temperature)
    p8 = softmax(q.logits(test["image_path"].tolist())[0], q.temperature)
    info = {"file": run.onnx_file(int8=True).name, "calibration_images": len(calib), "test_n": len(yt),
            "test_accuracy_fp32": float((p32.argmax(1) == yt).mean()),
            "test_accuracy_int8": float((p8.argmax(1) == yt).mean()),
            "top1_agree": float((p32.argmax(1) == p8.argmax(1)).mean()), "max_abs_diff": float(np.abs(p32 - p8).max())}
    run.write_onnx(data, {**sidecar, "model": info["file"], "parity": None, "quantization": info}, int8=True)
    return info


def _quantized(onnx_file: Path, calibration: np.ndarray) -> bytes:
    """QDQ static INT8 bytes of ``onnx_file``, activation ranges from float32 ``(n, 3, H, W)`` inputs."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calibration[i:i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(onnx_file), str(pre))
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return out.read_bytes()


def _split_rows(table, split: str, n: int | None = None):
    """Rows of one split of the stored dataset table; ``n`` evenly spaced ones (the table is sorted
    by class, so this spreads them over classes)."""
    t = table[table["split"] == split].reset_index(drop=True)
    if n is not None and n < len(t):
        t = t.iloc[np.unique(np.linspace(0, len(t) - 1, n).round().astype(int))].reset_index(drop=True)
    return t
