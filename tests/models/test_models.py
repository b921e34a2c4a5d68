"""Models: tiny build -> save -> reload, tokenizer checks, freezing by group, composing from parts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

from lsd_edge.data.shapes import vocabulary
from lsd_edge.errors import ModelError
from lsd_edge.models.build import build_tiny_model, build_tiny_processor, compose_llava, with_own_tokenizer
from lsd_edge.models.groups import count_params, set_trainable
from lsd_edge.models.info import model_info
from lsd_edge.models.load import load_llava, save_model
from lsd_edge.models.tokens import check_tokenizers, image_tokens
from lsd_edge.recipe.schema import ModelConfig, TinyConfig, VisionSize

from ..helpers import tiny_llm_folder


def _inputs(processor, model):
    n = model.config.image_seq_length
    ids = [processor.tokenizer.convert_tokens_to_ids("<|im_start|>")] + [processor.image_token_id] * n
    ids += processor.tokenizer("what color is the circle ?", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    return torch.tensor([ids]), torch.randn(1, 3, 16, 16)


def test_round_trip(tmp_path, tiny_teacher, processor):
    save_model(tiny_teacher, processor, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
    assert (tmp_path / "chat_template.jinja").is_file() or "chat_template" in (
        tmp_path / "processor_config.json"
    ).read_text()
    model, proc = load_llava(str(tmp_path))
    ids, px = _inputs(processor, tiny_teacher)
    with torch.no_grad():
        a = tiny_teacher(input_ids=ids, pixel_values=px).logits
        b = model(input_ids=ids, pixel_values=px).logits
    assert torch.equal(a, b)
    assert proc.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert proc.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    ) == processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert model.generation_config.eos_token_id


def test_student_shares_teacher_vision(tiny_teacher, tiny_student):
    for (n1, p1), (n2, p2) in zip(
        tiny_teacher.model.vision_tower.named_parameters(),
        tiny_student.model.vision_tower.named_parameters(),
        strict=True,
    ):
        assert n1 == n2 and torch.equal(p1, p2)
    assert p1.data_ptr() != p2.data_ptr()  # a copy: training one never moves the other
    s, t = count_params(tiny_student), count_params(tiny_teacher)
    assert s["llm"] < t["llm"] / 2 and s["vision"] == t["vision"]


def test_set_trainable_groups(tiny_student):
    m = copy.deepcopy(tiny_student)
    counts = set_trainable(m, ["projector"])
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("multi_modal_projector" in n for n in trainable)
    assert counts["projector"] == sum(p.numel() for p in m.model.multi_modal_projector.parameters())
    set_trainable(m, ["projector", "llm"])
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("language_model" in n for n in names) and not any("vision_tower" in n for n in names)


def test_another_tokenizer_passes_and_one_that_cannot_read_the_data_is_refused(processor):
    """A student with another vocabulary is distilled across tokenizers; refused only where its
    tokenizer cannot read the data, each in one line saying why."""
    vision = VisionSize(image_size=16, patch_size=8, hidden_size=32, num_heads=2)
    other = build_tiny_processor(vision, vocabulary())
    other.tokenizer.add_tokens(["hexagon"])
    check_tokenizers(processor, other)  # another vocabulary: passes
    words = with_own_tokenizer(processor, "word", ["what color is the circle ?", "red"])
    data = ["what color is the circle ?", "what color is the hexagon ?"]
    check_tokenizers(processor, words, lambda: data[:1])
    with pytest.raises(
        ModelError, match=r"reads the data's text 'what color is the hexagon \?' with unknown"
    ):
        check_tokenizers(processor, words, lambda: data)
    no_template = copy.deepcopy(words)
    no_template.chat_template = None
    no_template.tokenizer.chat_template = None
    with pytest.raises(ModelError, match="has no chat template"):
        check_tokenizers(processor, no_template)
    split = with_own_tokenizer(processor, "word", ["red"])
    split.image_token = "[img]"  # not a token of its vocabulary: read as pieces
    with pytest.raises(ModelError, match=r"does not keep the image token \[img\] as one token"):
        check_tokenizers(processor, split)


def test_padded_vocab_rows_are_not_a_difference(processor, tiny_teacher):
    padded = TinyConfig(
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=32,
        vision="teacher",
        pad_vocab_to_multiple_of=64,
    )
    student = build_tiny_model(padded, processor, vision_from=tiny_teacher)
    rows = -(-len(processor.tokenizer) // 64) * 64  # the tokenizer's length rounded up to 64
    assert student.config.text_config.vocab_size == rows != tiny_teacher.config.text_config.vocab_size
    check_tokenizers(processor.tokenizer, processor.tokenizer)  # one tokenizer: passes


def test_missing_and_broken_paths(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        load_llava(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match="is a file"):
        load_llava(str(tmp_path / "file"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_llava(str(tmp_path / "empty"))


def test_corrupt_weights(tmp_path, teacher_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(teacher_dir, bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot load"):
        load_llava(str(bad))


def test_hub_id_without_network_is_one_error():
    with pytest.raises(ModelError, match="cannot load"):
        load_llava("nobody-here/no-such-model-lsd-edge")


def test_model_info(teacher_dir):
    info = model_info(teacher_dir)
    assert info.params["total"] == sum(info.params[g] for g in ("vision", "projector", "llm"))
    assert (
        info.size_mb > 0
        and info.image_tokens == 4
        and info.llm == "qwen2"
        and info.vision == "siglip_vision_model"
    )


def test_compose_from_parts(tmp_path, tiny_teacher, processor):
    """A student from the teacher's vision tower + an LLM folder (AutoModelForCausalLM + tokenizer)."""
    llm = tiny_llm_folder(tmp_path / "llm", processor.tokenizer)
    spec = ModelConfig(llm=str(tmp_path / "llm"), vision="teacher")
    student, proc = compose_llava(spec, tiny_teacher, processor)
    assert torch.equal(
        student.model.language_model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight
    )
    assert torch.equal(student.lm_head.weight, llm.lm_head.weight)
    assert torch.equal(
        student.model.vision_tower.embeddings.patch_embedding.weight,
        tiny_teacher.model.vision_tower.embeddings.patch_embedding.weight,
    )
    assert student.model.multi_modal_projector.linear_1.out_features == 16
    ids, px = _inputs(processor, student)
    assert torch.isfinite(student(input_ids=ids, pixel_values=px).logits).all()


def test_compose_with_an_llm_of_another_vocabulary_speaks_through_its_own_tokenizer(
    tmp_path, tiny_teacher, processor
):
    """student.llm with another vocabulary (SmolLM2 or Llama under a Qwen teacher): the student reads
    images as the teacher does and text in the LLM's own tokens, with the image token and the chat
    template's turn tokens the LLM lacks added as single special tokens (a turn ends on one token),
    its embeddings grown to hold them; distilled across the two vocabularies afterwards."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    words = ["what", "color", "is", "the", "shape", "?", "red", "blue", "<eos>", "<pad>"]
    raw = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    llm_tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    tiny_llm_folder(tmp_path / "llm", llm_tok)
    student, proc = compose_llava(
        ModelConfig(llm=str(tmp_path / "llm"), vision="teacher"), tiny_teacher, processor
    )
    tok = proc.tokenizer
    assert tok.get_vocab() != processor.tokenizer.get_vocab()
    assert all(tok.convert_tokens_to_ids(w) == i for i, w in enumerate(words))  # the LLM's own ids
    for special in ("<image>", "<|im_start|>", "<|im_end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    assert tok.pad_token_id is not None  # batches pad with it
    assert student.config.image_token_id == tok.convert_tokens_to_ids("<image>") >= len(words)
    assert student.get_input_embeddings().weight.shape[0] >= len(tok)
    assert proc.image_processor is processor.image_processor and proc.chat_template == processor.chat_template
    # it encodes a conversation, image included, and runs on it
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape ?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    text = proc.apply_chat_template(messages)
    inputs = proc(images=Image.new("RGB", (32, 32), "red"), text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == student.config.image_token_id).sum()) == image_tokens(student.config)
    assert torch.isfinite(student(**inputs).logits).all()
    check_tokenizers(processor, proc)  # another vocabulary that covers the data: distilled across


def test_safe_loading_defaults(teacher_dir):
    cfg = json.loads((teacher_dir / "config.json").read_text())
    assert cfg["model_type"] == "llava"
    assert not list(teacher_dir.glob("*.bin")), "weights are saved as safetensors"


def test_a_processor_that_is_not_the_vision_tower_s_is_refused(tmp_path, teacher_dir):
    import shutil

    folder = tmp_path / "mixed-up"
    shutil.copytree(teacher_dir, folder)
    pre = json.loads((folder / "processor_config.json").read_text())
    ip = pre.get("image_processor", pre)
    ip["size"] = {"height": 32, "width": 32}  # 16 visual tokens; the tower's 16 px give 4
    if "crop_size" in ip:
        ip["crop_size"] = {"height": 32, "width": 32}
    (folder / "processor_config.json").write_text(json.dumps(pre))
    with pytest.raises(
        ModelError,
        match=r"expands <image> to 16 visual tokens but its vision tower gives 4 \(16 px, patch 8\)",
    ):
        load_llava(str(folder))


def test_an_llm_folder_without_a_tokenizer_is_one_line(tmp_path, tiny_teacher, processor):
    tiny_llm_folder(tmp_path / "llm", processor.tokenizer)
    for f in (tmp_path / "llm").glob("*token*"):
        f.unlink()
    with pytest.raises(
        ModelError, match=r"^student.llm '.*llm' holds no tokenizer .*save the LLM's tokenizer"
    ):
        compose_llava(ModelConfig(llm=str(tmp_path / "llm"), vision="teacher"), tiny_teacher, processor)


def test_an_llm_folder_with_a_broken_tokenizer_is_one_line(tmp_path, tiny_teacher, processor):
    """A tokenizer file that cannot be read (`models.load.load_tokenizer`, also what `validate` and
    `distill` read before any model loads) is one line naming the key and what to give instead."""
    tiny_llm_folder(tmp_path / "llm", processor.tokenizer)
    (tmp_path / "llm" / "tokenizer.json").write_text("{ not json")
    with pytest.raises(
        ModelError, match=r"^cannot load the tokenizer of student.llm '.*llm': .*give a local folder$"
    ):
        compose_llava(ModelConfig(llm=str(tmp_path / "llm"), vision="teacher"), tiny_teacher, processor)
