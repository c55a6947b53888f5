"""Saving and loading a Classifier in the safe model format (weights in safetensors, metadata in JSON).

:func:`save_classifier` writes the whole Classifier's tensors through
:meth:`prodclass.runs.RunDir.write_model` (``model.safetensors``) and beside them the JSON that
rebuilds the network without the training config: backbone name, head kind and sizes, classes,
preprocessing, stage and epoch. :func:`load_classifier` builds the architecture from that JSON
(no pretrained weights are read) and fills it from the safetensors file, whose loader only parses
a header and raw tensor bytes: loading a run never executes code from it.
"""

from __future__ import annotations

from pathlib import Path

from prodclass.features.backbones import create_backbone
from prodclass.models.heads import Classifier, create_head
from prodclass.preprocess import Preprocessing
from prodclass.runs import RunDir, RunDirError


def classifier_meta(model: Classifier, classes: list[str], head_cfg: dict, **extra) -> dict:
    """The JSON description of ``model`` stored in ``model.json``.

    Args:
        model: backbone + head.
        classes: C class names, index = logit position.
        head_cfg: ``{"kind", "hidden_dim", "dropout"}`` that rebuild the head.
        extra: more JSON-able keys (``stage``, ``epoch``, ...).
    """
    return {"backbone": model.backbone.name, "head": dict(head_cfg), "classes": list(classes),
            "preprocessing": model.backbone.preprocessing.to_dict(), **extra}


def save_classifier(run: RunDir, model: Classifier, classes: list[str], head_cfg: dict, **extra) -> None:
    """Write ``model`` into ``run`` (weights ~18 MB for EfficientNet-Lite0, plus a small JSON).

    Args: as :func:`classifier_meta`.
    """
    run.write_model(model.state_dict(), classifier_meta(model, classes, head_cfg, **extra))


def build_classifier(meta: dict) -> Classifier:
    """An untrained Classifier of the architecture ``meta`` (a ``model.json``) describes.

    Raises:
        KeyError: an unknown backbone or a missing key. ValueError: an unknown head kind.
    """
    backbone = create_backbone(meta["backbone"], pretrained=False,
                               preprocessing=Preprocessing.from_dict(meta["preprocessing"]))
    head = meta["head"]
    return Classifier(backbone, create_head(head["kind"], backbone.embed_dim, len(meta["classes"]),
                                            head.get("hidden_dim", 256), head.get("dropout", 0.0)))


def load_classifier(run: RunDir | str | Path) -> tuple[Classifier, dict]:
    """Rebuild the Classifier saved by :func:`save_classifier`.

    Returns:
        ``(model, meta)``: the Classifier in eval mode on the CPU, and ``model.json``'s content
        (``classes``, ``preprocessing``, ``backbone``, ``head``, ...).

    Raises:
        prodclass.runs.RunDirError: no model, a format-1 model (names the migration command), a
            weights file that is not safetensors, or weights that do not fit the architecture.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    state, meta = run.read_model()
    try:
        model = build_classifier(meta)
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise RunDirError(f"{run.weights_file}: does not fit {run.model_meta_file} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    return model.eval(), meta
