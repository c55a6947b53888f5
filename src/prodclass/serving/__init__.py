"""Serving: the :class:`~prodclass.serving.predictor.Predictor` (the one inference path for users),
ONNX export, resumable batch prediction, the REST API and the Gradio demo.
"""
