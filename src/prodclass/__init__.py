"""prodclass: catalog → curated split → features → model → predictions → report / serving.

One package per stage (layers enforced by import-linter; docs/architecture.md):

- :mod:`prodclass.catalog`    — source readers producing the one Catalog table
- :mod:`prodclass.curate`     — label rules, min/max per class, the stored stratified split
- :mod:`prodclass.features`   — the backbone registry (``create_backbone``) and the embedding cache
- :mod:`prodclass.models`     — heads, the Classifier and its safe format, training and fine-tuning
- :mod:`prodclass.evaluation` — metrics, calibration, abstention, plots and the report
- :mod:`prodclass.serving`    — the ``Predictor``, ONNX export, batch prediction, REST API, demo
- :mod:`prodclass.pipeline`   — ``run(config)``: the whole job, writing one run directory
- :mod:`prodclass.runs` (``RunDir``), :mod:`prodclass.inference` (the one images → logits path),
  :mod:`prodclass.preprocess`, :mod:`prodclass.config`, :mod:`prodclass.io` — the shared base
"""

__version__ = "0.1.0"
