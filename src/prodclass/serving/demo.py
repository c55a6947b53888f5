"""The web demo: upload a product photo or take one with the camera, see its top-5 product types.

A Gradio app over one :class:`prodclass.serving.predictor.Predictor`: an image input (upload or webcam),
example images from the run's test split, the top-5 classes as confidence bars, and a
"Not sure — send to review" message when the Predictor abstains (top-1 probability under the
run's abstention threshold). It never phones home: analytics and the version check are off, no
share link is made, and the theme uses system fonts (the default may fetch Google Fonts). Example
images are copied into Gradio's cache when the app is built; no other server path is served.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at import and in Blocks(): no telemetry

import gradio as gr  # noqa: E402

MAX_UPLOAD = "16mb"


def example_images(run_dir: str | Path, n: int = 8) -> list[str]:
    """Up to ``n`` test-split images of distinct classes from the run's stored split
    (absolute paths that exist; ``[]`` when the run has no stored split)."""
    from prodclass.runs import RunDir

    run = RunDir(run_dir)
    if not run.has_dataset():
        return []
    t = run.read_dataset()[0]
    t = t[t["split"] == "test"].groupby("label").head(1)
    return [p for p in t["image_path"] if Path(p).is_file()][:n]


def review_message(labels: list[str], probs: list[float], abstain: bool, threshold: float | None) -> str:
    """The Markdown shown under the bars: the top label, or the review notice when abstaining."""
    if abstain:
        return (f"### ⚠️ Not sure — send to review\nBest guess **{labels[0]}** at {probs[0]:.0%} is under the "
                f"review threshold of {threshold:.0%}; a person should check this product.")
    return f"### {labels[0]} ({probs[0]:.0%})"


def build_demo(run_dir: str | Path, predictor=None, examples: list[str] | None = None,
               backend: str = "torch") -> gr.Blocks:
    """The Gradio Blocks app for one run directory.

    Args:
        predictor: default ``Predictor.from_run(run_dir, backend=backend)``.
        examples: example image paths (default :func:`example_images`).
        backend: ``torch``, ``onnx``, ``onnx-int8`` or ``auto`` (see ``Predictor.from_run``).

    Raises:
        FileNotFoundError, ValueError: not a loadable run directory.
    """
    from prodclass.serving.api import model_id
    from prodclass.serving.predictor import Predictor

    predictor = predictor or Predictor.from_run(run_dir, backend=backend)
    mid = model_id(run_dir)
    top_k = min(5, len(predictor.classes))

    def classify(path: str | None):
        if path is None:
            return None, "Upload a product photo or take one with the camera."
        p = predictor.predict([path], top_k=top_k)[0]
        if p.error:
            return None, f"**Could not read this image:** {p.error.split(': ', 1)[-1]}"
        return dict(zip(p.labels, p.probs, strict=True)), review_message(p.labels, p.probs, p.abstain, predictor.threshold)

    with gr.Blocks(title="prodclass demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# What product is this?\nUpload a product photo or take one with your camera. "
                    f"Model `{mid}`: {len(predictor.classes)} product types.")
        with gr.Row():
            with gr.Column():
                # filepath: Gradio only reads the header; load_image checks the pixel count before decoding
                image = gr.Image(sources=["upload", "webcam"], type="filepath", label="Product photo", height=320)
            with gr.Column():
                bars = gr.Label(num_top_classes=top_k, label=f"Top {top_k} product types")
                verdict = gr.Markdown(elem_id="verdict")
        examples = example_images(run_dir) if examples is None else examples
        if examples:
            gr.Examples(examples, inputs=image, label="Examples from the test split")
        image.change(classify, image, [bars, verdict])
    return demo


def launch_demo(run_dir: str | Path, host: str = "127.0.0.1", port: int = 7860, block: bool = True, **kwargs) -> gr.Blocks:
    """Build and start the demo on ``http://host:port`` (never a public share link).

    Args:
        block: wait until interrupted (the CLI); False returns at once (tests: call ``.close()``).
        kwargs: more :func:`build_demo` arguments.
    """
    demo = build_demo(run_dir, **kwargs)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=not block,
                max_file_size=MAX_UPLOAD, ssr_mode=False,
                show_error=True, theme=theme)
    return demo
