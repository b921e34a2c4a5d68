"""lsd-edge's public Python API: `load_runner`, a model folder in, a `Runner` out.

    from lsd_edge.infer import load_runner

    runner = load_runner("runs/tiny/onnx")  # or runs/tiny/student, a PyTorch folder
    print(runner.generate("image.png", "what color is the circle ?", max_new_tokens=32).text)

The public names are the four this module exports: `load_runner`, the `Runner` protocol it returns,
the `SamplingParams` `Runner.generate` takes and the `Generation` it gives back; the package is
typed (`py.typed`). Everything else in `lsd_edge` is the toolchain's own and may change.

This module sits above both runners and imports the one a folder needs when it is asked for, so
loading an ONNX export never imports torch (an import-linter contract keeps this module torch-free).
"""

from __future__ import annotations

from pathlib import Path

from lsd_edge.errors import RuntimeModelError
from lsd_edge.runtime.runner import Runner
from lsd_edge.runtime.textgen import Generation, SamplingParams
from lsd_edge.workspace import is_export_folder

__all__ = ["Generation", "Runner", "SamplingParams", "load_runner"]


def load_runner(path: str | Path, device: str = "cpu", name: str | None = None, **kw) -> Runner:
    """A runner for a model folder: HF weights -> TorchRunner; ONNX files -> OnnxRunner (torch-free).

    `device` is "cpu" or "cuda"; further keywords go to the runner (an ONNX export's `variant`,
    `threads`; a PyTorch folder's `dtype`)."""
    p = Path(path)
    if not p.exists():
        raise RuntimeModelError(
            f"{p}: no such model folder; give a folder written by lsd-edge distill or export"
        )
    if is_export_folder(p):
        from lsd_edge.runtime.onnx.runner import OnnxRunner  # onnxruntime only when asked for

        return OnnxRunner(p, device=device, name=name, **kw)
    from lsd_edge.runtime.torch_runner import TorchRunner  # torch only when asked for

    return TorchRunner(p, device=device, name=name, **kw)
