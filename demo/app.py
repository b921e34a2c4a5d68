"""The lsd-edge demo as a Spaces-style app: `python demo/app.py`, or `gradio demo/app.py` to reload on edits.

A thin launcher over the library (`lsd_edge.demo`), as `lsd-edge demo` is: it serves the latest run
under runs/ (its teacher, its student and the student's ONNX export), or the folders named by
LSD_EDGE_TEACHER, LSD_EDGE_STUDENT (a PyTorch folder or an export) and LSD_EDGE_ONNX, on
LSD_EDGE_DEVICE (auto). It binds GRADIO_SERVER_NAME:GRADIO_SERVER_PORT, 127.0.0.1:7860 by default.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lsd_edge.demo.examples import shapes_examples
from lsd_edge.demo.models import load_models, resolve_paths
from lsd_edge.demo.page import Limits, build_app, launch
from lsd_edge.errors import LsdEdgeError


def _path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def make_demo():
    """The page over the models the environment names (or the latest run's)."""
    paths = resolve_paths(_path("LSD_EDGE_TEACHER"), _path("LSD_EDGE_STUDENT"), _path("LSD_EDGE_ONNX"))
    examples = shapes_examples([paths.run, paths.student, paths.teacher])
    teacher, students = load_models(paths, os.environ.get("LSD_EDGE_DEVICE", "auto"), examples)
    return build_app(teacher, students, examples, Limits(), paths.notes)


try:
    demo = make_demo()  # the name `gradio demo/app.py` looks for
except LsdEdgeError as e:
    sys.exit(f"error: {e}")

if __name__ == "__main__":
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    for url in launch(demo, host, int(os.environ.get("GRADIO_SERVER_PORT", "7860"))):
        print(f"serving the demo on {url} (Ctrl+C stops it)")
    demo.block_thread()
