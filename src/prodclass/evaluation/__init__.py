"""Evaluation: metrics, calibration (temperature scaling, ECE), abstention thresholds and the run
report (Jinja2 templates, one plotting module).

Every function takes arrays and returns values; only :class:`prodclass.runs.RunDir` writes files.
"""
