"""prodclass: catalog → curated split → embeddings/images → model → predictions → report.

Each pipeline stage is one module:

- :mod:`prodclass.catalog`    — source readers producing the one Catalog table
- :mod:`prodclass.curate.rules`   — label rules, min/max per class, stored stratified split
- :mod:`prodclass.features.backbones`  — registry of pretrained image backbones (``create_backbone``)
- :mod:`prodclass.preprocess` — the one image-loading/preprocessing function
- :mod:`prodclass.features.embeddings` — content-hash keyed embedding cache
- :mod:`prodclass.models.heads` / :mod:`prodclass.models.train` — classifier heads and their training
- :mod:`prodclass.evaluation.metrics`   — metrics and plots on the test split
- :mod:`prodclass.serving.predictor`    — the ``Predictor`` used by the CLI, servers and batch jobs
- :mod:`prodclass.pipeline`   — ``run(config)``: the whole job, writing one run directory
"""

__version__ = "0.1.0"
