"""Make ``import torchvision`` (and so ``import timm``) work with the CPU build of torch.

torchvision 0.28.0 is the release that matches torch 2.13.0, but its compiled operator
library cannot be loaded against the CPU-only torch wheel. Its Python package then fails at
import time in ``torchvision/_meta_registrations.py``, which registers fake (meta) kernels for
``torchvision::nms`` and ``torchvision::qnms`` and raises ``RuntimeError: operator
torchvision::nms does not exist``. Defining those two operator schemas first lets the import
succeed; the operators themselves stay unimplemented (prodclass never calls NMS).

Import this module before anything that imports torchvision or timm; :mod:`prodclass.features.backbones`
does so. It is idempotent and does nothing when the compiled ops did load.
"""

from __future__ import annotations

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB = None


def ensure_torchvision_importable() -> None:
    """Define missing ``torchvision::nms``/``qnms`` schemas so torchvision can be imported."""
    global _LIB
    missing = [name for name in _SCHEMAS if not _op_exists(name)]
    if not missing:
        return
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _LIB.define(_SCHEMAS[name])


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


ensure_torchvision_importable()
