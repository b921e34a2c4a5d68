"""`--arch` architectures: the edge students' sizes at real scale (counted on the meta device, no
weights), and at a tiny scale the same composition as `lsd-edge distill`'s for the same [student]."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lsd_edge.data.shapes import vocabulary
from lsd_edge.errors import RecipeError
from lsd_edge.models.archs import (
    ARCHS,
    Arch,
    arch_processor,
    llava_config,
    qwen2_config,
    siglip_config,
)
from lsd_edge.models.build import compose_llava
from lsd_edge.models.info import ModelShape, random_model
from lsd_edge.models.tokens import image_tokens
from lsd_edge.recipe.schema import StudentConfig
from lsd_edge.runtime.torch_runner import TorchRunner

from ..helpers import tiny_llm_folder

SO400M_WIDTH = 1152  # one position-embedding row of SigLIP-so400m


@pytest.fixture(scope="module")
def shapes():
    return {n: ModelShape.of(ARCHS[n].config()) for n in ARCHS if n.startswith("qwen0.5b")}


def test_edge_students_see_with_fewer_tokens_through_qwen05b_s_llm(shapes):
    base = shapes["qwen0.5b"]
    assert base.image_tokens == 729
    assert base.params == {
        "vision": 397_747_744,
        "projector": 2_230_272,
        "llm": 463_987_712,
        "total": 863_965_728,
    }
    want_tokens = {"qwen0.5b-edge-b16": 196, "qwen0.5b-edge-224": 256, "qwen0.5b-edge-168": 144}
    assert {n: s.image_tokens for n, s in shapes.items() if n != "qwen0.5b"} == want_tokens
    for s in shapes.values():
        assert s.params["llm"] == base.params["llm"] and s.layers == base.layers and s.vocab == base.vocab
        assert s.sight.tokens == s.image_tokens
    # the teacher's tower at a lower resolution: the same tower, fewer position rows
    for name in ("qwen0.5b-edge-224", "qwen0.5b-edge-168"):
        fewer = (729 - want_tokens[name]) * SO400M_WIDTH
        assert shapes[name].params["vision"] == base.params["vision"] - fewer
        assert shapes[name].params["projector"] == base.params["projector"]
        assert shapes[name].sight.layers == 26 and shapes[name].sight.patch_size == 14
    # SigLIP-B/16: 12 layers of 768, about 86M parameters, a projector from 768 wide
    b16 = shapes["qwen0.5b-edge-b16"]
    assert b16.params["vision"] == 85_797_120 and b16.params["vision"] < base.params["vision"] / 4
    assert b16.params["projector"] == 768 * 1024 + 1024 + 1024 * 1024 + 1024
    assert (b16.sight.image_size, b16.sight.patch_size, b16.sight.layers) == (224, 16, 12)


def test_the_recipe_an_edge_arch_stands_for():
    assert ARCHS["qwen0.5b-edge-224"].student == {
        "llm": "Qwen/Qwen1.5-0.5B-Chat",
        "vision": "teacher",
        "image_size": 224,
    }
    assert ARCHS["qwen0.5b-edge-b16"].student["vision"] == "google/siglip-base-patch16-224"
    assert ARCHS["qwen0.5b"].student == {"vision": "teacher", "llm": "Qwen/Qwen1.5-0.5B-Chat"}
    for a in ARCHS.values():
        assert (a.student is not None) == (a.role == "student") and a.onnx == (a.role == "student")
        StudentConfig(**(a.student or {"llm": "x"}))  # each is a valid [student] table


# A teacher tower with a grid worth resampling (42 px, patch 14: 3 x 3) and layers worth cutting.
TINY_TOWER = dict(hidden=32, intermediate=64, layers=3, heads=2, image_size=42)
TINY_TEXT = dict(vocab=512, hidden=32, layers=1, heads=2, kv=2, tied=True, intermediate=64)


def _tiny(student: dict, tower: dict = TINY_TOWER) -> Arch:
    return Arch("tiny-edge", "a tiny edge student", "student", tower, TINY_TEXT, "float32", True, student)


def _teacher(tmp_path):
    """A tiny teacher whose tower has TINY_TOWER's sizes, with a processor and an LLM folder over it."""
    processor = arch_processor(42, 14, vocabulary())
    config = llava_config(
        siglip_config(**TINY_TOWER), qwen2_config(**TINY_TEXT), processor.image_token_id, layer=-1
    )
    teacher = random_model(config, torch.float32, torch.device("cpu"), seed=0)
    tiny_llm_folder(tmp_path / "llm", processor.tokenizer)
    return teacher, processor


VISION_KEYS = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers")


@pytest.mark.parametrize(
    "choice", [{"image_size": 28}, {"vision_layers": 2}, {"image_size": 28, "vision_layers": 1}]
)
def test_an_edge_arch_is_the_student_distill_composes(tmp_path, choice):
    """The tiny arch's config against `compose_llava`'s for the same [student] table on a teacher
    with the arch's tower: the same tower, read the same way, the same visual tokens."""
    teacher, processor = _teacher(tmp_path)
    spec = StudentConfig(llm=str(tmp_path / "llm"), vision="teacher", **choice)
    built, built_processor = compose_llava(spec, teacher, processor)
    arch = _tiny(dict(vision="teacher", llm=str(tmp_path / "llm"), **choice)).config()
    got, want = arch.vision_config.to_dict(), built.config.vision_config.to_dict()
    assert {k: got[k] for k in VISION_KEYS} == {k: want[k] for k in VISION_KEYS}
    for k in ("vision_feature_layer", "vision_feature_select_strategy", "image_seq_length"):
        assert getattr(arch, k) == getattr(built.config, k)
    assert image_tokens(arch) == (choice.get("image_size", 42) // 14) ** 2


def test_a_smaller_tower_arch_sees_through_its_own_processor():
    """A tiny edge arch with another tower (patch 16) built with random weights as the bench builds
    it: its prompt holds the config's visual tokens and the vision encoder is timed."""
    tower = dict(hidden=16, intermediate=32, layers=1, heads=2, image_size=32, patch=16)
    config = _tiny(dict(vision="google/siglip-base-patch16-224", llm="x"), tower).config()
    processor = arch_processor(config.vision_config.image_size, config.vision_config.patch_size, vocabulary())
    model = random_model(config, torch.float32, torch.device("cpu"), seed=0)
    runner = TorchRunner.from_model(model, processor, "tiny-edge")
    g = runner.generate(Image.new("RGB", (40, 30), "red"), "what color is the circle ?", 2, ignore_eos=True)
    assert runner.prompt_ids("what color is the circle ?", True).count(processor.image_token_id) == 4
    assert image_tokens(config) == 4 and g.vision_s > 0 and g.prefill_s >= 0


def test_a_bad_edge_choice_names_the_arch():
    with pytest.raises(RecipeError, match="--arch tiny-edge's tower"):
        _tiny(dict(vision="teacher", llm="x", image_size=30)).config()
