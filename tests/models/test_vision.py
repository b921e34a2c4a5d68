"""Edge vision: students that see with a lower resolution, fewer layers or another SigLIP tower, each
built, saved, loaded back and run on an image of its own size; the tower's weights checked against
the teacher's."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_utils import PILImageResampling

from lsd_edge.data.shapes import vocabulary
from lsd_edge.errors import RecipeError
from lsd_edge.models.build import build_tiny_model, build_tiny_processor, compose_llava, student_processor
from lsd_edge.models.load import load_llava, save_model
from lsd_edge.models.tokens import image_tokens
from lsd_edge.models.vision import Tower, cut_config, cut_tower, feature_layer_after_cut, grid_side
from lsd_edge.recipe.schema import StudentConfig, TinyConfig, VisionSize

from ..helpers import tiny_llm_folder

# A teacher tower with a grid worth resampling (32 px, patch 8: 4 x 4) and layers worth cutting (3).
TOWER = VisionSize(
    hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, patch_size=8, image_size=32
)
STUDENT_LLM = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)


@pytest.fixture(scope="module")
def teacher_processor():
    return build_tiny_processor(TOWER, vocabulary())


@pytest.fixture(scope="module")
def teacher(teacher_processor):
    cfg = TinyConfig(
        hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, vision=TOWER
    )
    return build_tiny_model(cfg, teacher_processor, seed=0).eval()


def _student(teacher, teacher_processor, **choice):
    tiny = TinyConfig(**STUDENT_LLM, vision="teacher")
    spec = StudentConfig(tiny=tiny, **choice)
    processor = student_processor(teacher_processor, spec)
    model = build_tiny_model(tiny, processor, vision_from=teacher, seed=1, **choice)
    return model.eval(), processor


def _round_trip(model, processor, folder):
    """Save, load back, and run the loaded model on one image through its processor's prompt."""
    save_model(model, processor, folder)
    model, processor = load_llava(str(folder))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (45, 37), "red"), text=text, return_tensors="pt")
    side = model.config.vision_config.image_size
    assert inputs["pixel_values"].shape[-2:] == (side, side)
    # the prompt holds one token per patch the tower gives
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == image_tokens(model.config)
    assert image_tokens(model.config) == (side // model.config.vision_config.patch_size) ** 2
    assert model.config.image_seq_length == image_tokens(model.config)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    return model, processor


def _grid(weight, side):
    """The teacher's (side^2, D) position embeddings resampled to 2 x 2 by F.interpolate, written out."""
    g = weight.reshape(side, side, -1).permute(2, 0, 1)[None]
    g = F.interpolate(g, size=(2, 2), mode="bicubic", align_corners=False)
    return g[0].permute(1, 2, 0).reshape(4, -1)


def test_lower_resolution_resamples_the_position_embeddings(tmp_path, teacher, teacher_processor):
    student, processor = _student(teacher, teacher_processor, image_size=16)
    tw = teacher.model.vision_tower.embeddings.position_embedding.weight.detach()
    sw = student.model.vision_tower.embeddings.position_embedding.weight.detach()
    assert sw.shape == (4, 32) and torch.equal(sw, _grid(tw, 4))
    # every other tower weight is the teacher's
    t_state = teacher.model.vision_tower.state_dict()
    for k, v in student.model.vision_tower.state_dict().items():
        if "position_embedding" not in k:
            assert torch.equal(v, t_state[k]), k
    loaded, proc = _round_trip(student, processor, tmp_path)
    assert torch.equal(loaded.model.vision_tower.embeddings.position_embedding.weight, sw)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vision_config"]["image_size"] == 16 and saved["image_seq_length"] == 4
    # the teacher's processor is untouched: the student speaks through a copy
    assert (
        teacher_processor.image_processor.size["height"] == 32 and proc.image_processor.size["height"] == 16
    )
    # it downscales with Lanczos, which transformers.js in Node does as PIL does (bicubic it does not),
    # and says so in the file the runtimes read; the teacher's keeps its own filter
    pre = json.loads((tmp_path / "processor_config.json").read_text())["image_processor"]
    assert pre["resample"] == PILImageResampling.LANCZOS == 1 and proc.image_processor.resample == 1
    assert teacher_processor.image_processor.resample == PILImageResampling.BICUBIC


def test_an_equal_size_leaves_the_tower_bit_identical(teacher, teacher_processor):
    student, processor = _student(teacher, teacher_processor, image_size=32)
    t_state = teacher.model.vision_tower.state_dict()
    for k, v in student.model.vision_tower.state_dict().items():
        assert torch.equal(v, t_state[k]), k
    assert student.config.image_seq_length == 16 and student.config.vision_config.image_size == 32


def test_resampling_keeps_a_cls_row_and_its_dtype():
    from lsd_edge.models.vision import resample_position_embeddings

    w = torch.randn(1 + 16, 8, dtype=torch.bfloat16)
    out = resample_position_embeddings(w, 4, 2, prefix=1)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 8) and torch.equal(out[0], w[0])
    assert torch.equal(out[1:], _grid(w[1:].float(), 4).to(torch.bfloat16))


@pytest.mark.parametrize("layer,kept,moved", [(-1, 2, -1), (-2, 2, -2), (1, 2, 1), (3, 2, 2), (0, 1, 0)])
def test_the_feature_layer_moves_with_the_cut(layer, kept, moved):
    assert feature_layer_after_cut(layer, kept) == moved


@pytest.mark.parametrize("teacher_layer", [-1, -2, 3])
def test_fewer_layers_give_the_teacher_s_features_at_the_moved_layer(
    tmp_path, teacher, teacher_processor, teacher_layer
):
    t = copy.deepcopy(teacher)
    t.config.vision_feature_layer = teacher_layer
    student, processor = _student(t, teacher_processor, vision_layers=2)
    assert (
        student.config.vision_config.num_hidden_layers == 2
        and len(student.model.vision_tower.encoder.layers) == 2
    )
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        hs_t = t.model.vision_tower(px, output_hidden_states=True).hidden_states  # 4: embeddings + 3 layers
        hs_s = student.model.vision_tower(px, output_hidden_states=True).hidden_states  # 3
    # -1 and -2 keep their place from the top of the kept layers; layer 3 (cut away) reads layer 2
    expected = {-1: hs_t[2], -2: hs_t[1], 3: hs_t[2]}[teacher_layer]
    assert torch.equal(hs_s[student.config.vision_feature_layer], expected)
    loaded, _ = _round_trip(student, processor, tmp_path)
    assert loaded.config.vision_feature_layer == student.config.vision_feature_layer


def test_both_choices_at_once(tmp_path, teacher, teacher_processor):
    student, processor = _student(teacher, teacher_processor, image_size=24, vision_layers=1)
    assert image_tokens(student.config) == 9 and student.config.vision_config.num_hidden_layers == 1
    _round_trip(student, processor, tmp_path)


def test_a_smaller_tower_from_sizes(tmp_path, teacher):
    small = VisionSize(
        hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, patch_size=8, image_size=16
    )
    processor = build_tiny_processor(small, vocabulary())
    student = build_tiny_model(TinyConfig(**STUDENT_LLM, vision=small), processor, seed=1)
    loaded, _ = _round_trip(student, processor, tmp_path)
    assert loaded.config.vision_config.hidden_size == 16 and image_tokens(loaded.config) == 4


def _siglip_folder(folder, image_size=32):
    """A tiny SigLIP (with the pooling head LLaVA never uses) and its image processor, as on the hub."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    cfg = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )
    torch.manual_seed(3)
    SiglipVisionModel(cfg).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return SiglipVisionModel.from_pretrained(folder)


@pytest.mark.parametrize("choice", [{}, {"image_size": 16, "vision_layers": 1}])
def test_a_siglip_folder_as_the_student_s_tower(tmp_path, teacher, teacher_processor, choice):
    siglip = _siglip_folder(tmp_path / "siglip")
    tiny_llm_folder(tmp_path / "llm", teacher_processor.tokenizer)
    spec = StudentConfig(llm=str(tmp_path / "llm"), vision=str(tmp_path / "siglip"), **choice)
    student, processor = compose_llava(spec, teacher, teacher_processor)
    state = student.model.vision_tower.state_dict()
    assert not any(k.startswith("head.") for k in state)
    assert torch.equal(
        state["encoder.layers.0.mlp.fc1.weight"],
        siglip.encoder.layers[0].mlp.fc1.weight,
    )
    side = choice.get("image_size", 32)
    assert student.config.vision_config.image_size == side and student.config.vision_feature_layer == -1
    assert processor.tokenizer.get_vocab() == teacher_processor.tokenizer.get_vocab()
    _round_trip(student, processor, tmp_path / "student")


def test_a_composed_student_cuts_the_teacher_s_tower(tmp_path, teacher, teacher_processor):
    tiny_llm_folder(tmp_path / "llm", teacher_processor.tokenizer)
    spec = StudentConfig(llm=str(tmp_path / "llm"), vision="teacher", image_size=16, vision_layers=2)
    student, processor = compose_llava(spec, teacher, teacher_processor)
    tw = teacher.model.vision_tower.embeddings.position_embedding.weight.detach()
    assert torch.equal(student.model.vision_tower.embeddings.position_embedding.weight, _grid(tw, 4))
    _round_trip(student, processor, tmp_path / "student")


@pytest.mark.parametrize(
    "choice,message",
    [
        (
            {"image_size": 20},
            r"^recipe: student.image_size 20 is not a multiple of the teacher's tower's patch size 8",
        ),
        ({"image_size": 64}, r"^recipe: student.image_size 64 is above the teacher's tower's 32 px"),
        (
            {"vision_layers": 4},
            r"^recipe: student.vision_layers 4 is out of range: the teacher's tower has 1 to 3 layers",
        ),
    ],
)
def test_a_bad_choice_on_a_loaded_tower_is_one_error(teacher, choice, message):
    with pytest.raises(RecipeError, match=message):
        cut_tower(Tower.of(teacher), where="the teacher's tower", **choice)


def test_a_cut_that_leaves_no_feature_layer_is_refused(teacher):
    config = teacher.config.vision_config
    with pytest.raises(RecipeError, match=r"^recipe: student.vision_layers 1 leaves no hidden state -3"):
        cut_config(config, -3, None, 1)


def test_a_llava_folder_s_tower_cut_for_the_student(tmp_path, teacher, teacher_processor):
    save_model(teacher, teacher_processor, tmp_path / "llava")
    tiny_llm_folder(tmp_path / "llm", teacher_processor.tokenizer)
    spec = StudentConfig(
        llm=str(tmp_path / "llm"), vision=str(tmp_path / "llava"), image_size=16, vision_layers=2
    )
    student, processor = compose_llava(spec, teacher, teacher_processor)
    state, t_state = student.model.vision_tower.state_dict(), teacher.model.vision_tower.state_dict()
    assert "encoder.layers.2.mlp.fc1.weight" not in state and len(state) < len(t_state)
    assert torch.equal(state["encoder.layers.1.mlp.fc1.weight"], t_state["encoder.layers.1.mlp.fc1.weight"])
    _round_trip(student, processor, tmp_path / "student")


def test_a_siglip_config_is_read_as_load_siglip_reads_it(tmp_path):
    """`Tower.of_config` (what validate's estimate reads) agrees with `load_siglip` (what a run builds)."""
    from transformers import AutoConfig

    from lsd_edge.models.vision import load_siglip

    _siglip_folder(tmp_path)
    read = Tower.of_config(AutoConfig.from_pretrained(tmp_path))
    built, _ = load_siglip(str(tmp_path))
    assert (read.feature_layer, read.select_strategy, read.state) == (-1, "full", None)
    assert read.config.to_dict() == built.config.to_dict() and not read.config.vision_use_head
    cut = cut_tower(built, 16, 1)
    assert cut.state["embeddings.position_embedding.weight"].shape == (4, 16) and grid_side(cut.config) == 2
