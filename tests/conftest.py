"""Shared fixtures: a small ShapesVQA set, tiny models saved with save_pretrained, tiny recipes.

Everything is built from configs in temporary folders; nothing is downloaded.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the commands tests start (see set_num_threads below)

from transformers.utils import logging as hf_logging  # noqa: E402

from .helpers import LIVELY_VARIANT_BOUNDS, TINY_VISION, lively_student, onnx_settings, tiny_recipe_dict  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

# Tests run tiny ops, where a second thread only waits: on a shared 2-core machine at load 7, a
# (60 x 48) @ (48 x 320) matmul took 0.05 ms on 1 thread and 5.5 ms on 2.
torch.set_num_threads(1)


@pytest.fixture
def recipe_dict(tmp_path):
    return copy.deepcopy(tiny_recipe_dict(str(tmp_path / "data"), str(tmp_path / "run")))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from lsd_edge.data.shapes import generate

    out = tmp_path_factory.mktemp("shapes")
    generate(out, seed=0, n_train=32, n_eval=8, image_size=16, questions_per_image=2)
    return out


@pytest.fixture(scope="session")
def processor(shapes_dir):
    from lsd_edge.data.shapes import vocabulary
    from lsd_edge.models.build import build_tiny_processor
    from lsd_edge.recipe.schema import VisionSize

    return build_tiny_processor(VisionSize(**TINY_VISION), vocabulary())


@pytest.fixture(scope="session")
def tiny_teacher(processor):
    from lsd_edge.models.build import build_tiny_model
    from lsd_edge.recipe.schema import TinyConfig

    cfg = TinyConfig(
        hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, vision=TINY_VISION
    )
    return build_tiny_model(cfg, processor, seed=0).eval()


@pytest.fixture(scope="session")
def tiny_student(processor, tiny_teacher):
    from lsd_edge.models.build import build_tiny_model
    from lsd_edge.recipe.schema import TinyConfig

    cfg = TinyConfig(
        hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, vision="teacher"
    )
    return build_tiny_model(cfg, processor, vision_from=tiny_teacher, seed=1)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tiny_teacher, processor) -> Path:
    from lsd_edge.models.load import save_model

    out = tmp_path_factory.mktemp("teacher")
    save_model(tiny_teacher, processor, out)
    return out


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tiny_student, processor) -> Path:
    from lsd_edge.models.load import save_model

    out = tmp_path_factory.mktemp("student")
    save_model(tiny_student, processor, out)
    return out


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def standins(tmp_path_factory) -> dict[str, Path]:
    """Real-shaped tiny teacher, tied and untied student LLMs and LLaVA-layout data (tests/realshape.py)."""
    from lsd_edge.data.shapes import generate

    from .realshape import IMAGE_SIZE, build_standins

    tmp = tmp_path_factory.mktemp("standins")
    generate(tmp / "shapes", seed=0, n_train=24, n_eval=8, image_size=IMAGE_SIZE, questions_per_image=2)
    return build_standins(tmp, tmp / "shapes")


@pytest.fixture(scope="session")
def onnx_student_dir(tmp_path_factory, tiny_teacher, processor) -> Path:
    """A student wide enough that its weights, not graph structure, dominate the ONNX files' size, with
    a head size (32) that onnxruntime-genai's model builder takes: its export has the builder's decoder."""
    from lsd_edge.models.build import build_tiny_model
    from lsd_edge.models.load import save_model
    from lsd_edge.recipe.schema import TinyConfig

    cfg = TinyConfig(
        hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256, vision="teacher"
    )
    model = build_tiny_model(cfg, processor, vision_from=tiny_teacher, seed=2)
    out = tmp_path_factory.mktemp("onnx_student")
    save_model(model, processor, out)
    return out


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory, onnx_student_dir, shapes_dir) -> Path:
    """`onnx_student_dir` exported once (fp32 + int8), shared by the export and runner tests."""
    from lsd_edge.export.onnx.pipeline import export

    out = tmp_path_factory.mktemp("exports") / "onnx"
    return export(onnx_student_dir, out, onnx_settings(shapes_dir)).output


@pytest.fixture(scope="session")
def lively_dir(tmp_path_factory) -> Path:
    """A lively student (`helpers.lively_student`): its greedy answers differ from question to question,
    so a comparison of answers shows a runtime that got a token, an image or a question wrong."""
    return lively_student(tmp_path_factory.mktemp("lively") / "student")


@pytest.fixture(scope="session")
def lively_onnx_dir(tmp_path_factory, lively_dir, shapes_dir) -> Path:
    """`lively_dir` exported once (fp32 + int8)."""
    from lsd_edge.export.onnx.pipeline import export

    out = tmp_path_factory.mktemp("lively_exports") / "onnx"
    return export(lively_dir, out, onnx_settings(shapes_dir, **LIVELY_VARIANT_BOUNDS)).output
