"""GGUF export: the LLM and mmproj files as gguf-py reads them back, the refusals, and llama.cpp's
greedy tokens against PyTorch's (through llama-cpp-python: `slow`, skipped when it is not importable
unless LSD_EDGE_REQUIRE_LLAMA_CPP=1)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lsd_edge.errors import ExportError
from lsd_edge.export.gguf.llm import LLAMA3_REGEX, QWEN2_REGEX, tokenizer_facts, write_llm
from lsd_edge.export.gguf.parity import llama_cpp_missing
from lsd_edge.export.gguf.pipeline import check_gguf_file, export_gguf
from lsd_edge.export.gguf.template import MARKER_FIRST, llama_cpp_template
from lsd_edge.export.gguf.vision import write_mmproj
from lsd_edge.models.load import load_llava
from lsd_edge.models.tokens import SPECIAL_TOKENS

from ..helpers import LIVELY_GGUF_BOUNDS, bpe_llava, one_red_line, run
from ..realshape import IMAGE_SIZE

MISSING = llama_cpp_missing()


def needs_llama_cpp():
    if MISSING is not None:
        if os.environ.get("LSD_EDGE_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail(f"LSD_EDGE_REQUIRE_LLAMA_CPP=1 but {MISSING}")
        pytest.skip(MISSING)


@pytest.fixture(scope="module")
def bpe_student(standins, tmp_path_factory) -> Path:
    """tests.helpers.bpe_llava: a tied Qwen2 64 wide over the stand-ins' byte-level BPE tokenizer,
    weights at 2/sqrt(fan-in) so that greedy answers depend on the question and the image."""
    return bpe_llava(standins["teacher"], tmp_path_factory.mktemp("bpe") / "bpe-student")


@pytest.fixture(scope="module")
def clip_llama_student(standins, tmp_path_factory) -> Path:
    """LLaVA-1.5's shape over the BPE tokenizer: CLIP (CLS dropped, layer -2 of 3) and a Llama LLM
    (llama.cpp runs the LLM; the CLIP tower is refused, see lsd_edge.export.gguf.vision)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from lsd_edge.models.load import save_model

    bpe = LlavaProcessor.from_pretrained(standins["teacher"])
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=bpe.tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=bpe.chat_template,
        image_token="<image>",
    )
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=None,
            eos_token_id=None,
        ),
        image_token_index=proc.image_token_id,
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "vision_tower" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2 / p.shape[1] ** 0.5)
    model.generation_config.eos_token_id = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = tmp_path_factory.mktemp("clip") / "clip-llama"
    save_model(model, proc, out)
    return out


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    vals = [f.parts[i] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING or (
        f.types[0] == gguf.GGUFValueType.ARRAY and f.types[-1] == gguf.GGUFValueType.STRING
    ):
        vals = [bytes(v).decode("utf-8") for v in vals]
    else:
        vals = [v.tolist()[0] for v in vals]
    return vals if f.types[0] == gguf.GGUFValueType.ARRAY else vals[0]


def _tensor(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist())))


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_files_read_back(bpe_student, tmp_path, quant):
    model, processor = load_llava(str(bpe_student), dtype="float32", device="cpu")
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    llm = write_llm(model, processor, eos, tmp_path / "s.gguf", quant, "s", "student")
    mmproj = write_mmproj(model, processor, tmp_path / "mmproj-s.gguf", quant, "s", "student")
    r = gguf.GGUFReader(str(llm))
    assert _field(r, "general.architecture") == "qwen2"
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"  # a plain ByteLevel pre-tokenizer
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == 320 and tokens[eos] == "<|im_end|>" and tokens[-1] == "[PAD319]"
    assert _field(r, "tokenizer.ggml.eos_token_id") == eos
    assert _field(r, "tokenizer.chat_template") == MARKER_FIRST  # the interleave layout, for llama.cpp
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reads token_embd as the output matrix
    want = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]
    assert next(t for t in r.tensors if t.name == "blk.0.attn_q.weight").tensor_type == want
    ref = model.model.language_model.layers[1].mlp.down_proj.weight.detach().numpy()
    tol = 1e-2 if quant == "f16" else 3e-2
    assert np.abs(_tensor(r, "blk.1.ffn_down.weight") - ref).max() <= tol * np.abs(ref).max()
    v = gguf.GGUFReader(str(mmproj))
    assert _field(v, "clip.projector_type") == "mlp"
    assert _field(v, "clip.vision.block_count") == 2  # layer -2 of 3: the last is never run
    assert _field(v, "clip.vision.feature_layer") == [2]
    assert _field(v, "clip.vision.image_size") == IMAGE_SIZE
    assert _field(v, "clip.vision.image_mean") == pytest.approx([0.5, 0.5, 0.5])
    vnames = {t.name for t in v.tensors}
    assert "v.blk.1.ffn_down.weight" in vnames and "v.blk.2.ln1.weight" not in vnames
    assert "v.post_ln.weight" not in vnames and {"mm.0.weight", "mm.2.bias"} <= vnames


def test_llama_llm_file_and_clip_refusal(clip_llama_student, tmp_path):
    model, processor = load_llava(str(clip_llama_student), dtype="float32", device="cpu")
    llm = write_llm(model, processor, None, tmp_path / "c.gguf", "q8_0", "c", "c")
    r = gguf.GGUFReader(str(llm))
    assert _field(r, "general.architecture") == "llama"
    q = model.model.language_model.layers[0].self_attn.q_proj.weight.detach().numpy()
    got = _tensor(r, "blk.0.attn_q.weight")
    assert not np.allclose(got, q, atol=0.05)  # permuted for llama.cpp's rope ...
    assert np.allclose(np.sort(got, axis=None), np.sort(q, axis=None), atol=0.05)  # ... same values
    with pytest.raises(ExportError, match="CLS token llama.cpp's llava graph .* puts after the patches"):
        write_mmproj(model, processor, tmp_path / "mmproj-c.gguf", "q8_0", "c", "c")


def test_selection_llama_cpp_does_not_make_is_refused(bpe_student, tmp_path):
    from lsd_edge.export.gguf.vision import check_vision

    model, _ = load_llava(str(bpe_student), dtype="float32", device="cpu")
    model.config.vision_feature_select_strategy = "default"  # would drop a SigLIP patch
    with pytest.raises(ExportError, match="llama.cpp always reads it as 'full'"):
        check_vision(model.config, "m")


def test_chat_template_for_llama_cpp(bpe_student, standins):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(bpe_student)
    assert llama_cpp_template(processor)[0] == MARKER_FIRST
    processor.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    template, note = llama_cpp_template(processor)
    assert template == processor.chat_template and "model's own" in note


def test_the_tiny_models_layout_gets_its_own_llama_cpp_template(bpe_student):
    """The embedded default's template (each image on its line, a space before an answer) renders
    llama.cpp's messages (the media marker inside the text) as it renders the model's, on a second
    turn too; the interleave layout's template would not."""
    from transformers import AutoProcessor

    from lsd_edge.export.gguf.template import MARKER_EACH_LINE, MEDIA_MARKER, _render
    from lsd_edge.models.tokens import CHAT_TEMPLATE

    processor = AutoProcessor.from_pretrained(bpe_student)
    processor.chat_template = CHAT_TEMPLATE
    template, note = llama_cpp_template(processor)
    assert template == MARKER_EACH_LINE and "each media marker on its line" in note
    turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "is it a circle ?"}]},
    ]
    want = processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert "<image>\nwhat color ?" in want and "assistant\n red<|im_end|>" in want
    # as llama-server gives them: the marker and the text of each turn in one string
    llama = [
        {"role": "user", "content": MEDIA_MARKER + "what color ?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "is it a circle ?"},
    ]
    assert _render(template, llama).replace(MEDIA_MARKER, "<image>") == want
    assert _render(MARKER_FIRST, llama).replace(MEDIA_MARKER, "<image>") != want


@pytest.fixture(scope="module")
def word_level_dir(student_dir, tmp_path_factory) -> Path:
    """The tiny student with a word-level tokenizer over the same tokens (what the tiny models had
    before their byte-level BPE), which GGUF cannot hold."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    model, processor = load_llava(str(student_dir), dtype="float32", device="cpu")
    tok = Tokenizer(tokenizer_models.WordLevel(processor.tokenizer.get_vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    processor.tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>"
    )
    out = tmp_path_factory.mktemp("word-level") / "student"
    from lsd_edge.models.load import save_model

    save_model(model, processor, out)
    return out


def test_word_level_tokenizer_is_refused(word_level_dir, tmp_path):
    with pytest.raises(ExportError, match="byte-level BPE tokenizer, as Qwen's or Llama's, is needed"):
        export_gguf(word_level_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_word_level_refusal_is_one_red_line(word_level_dir, tmp_path, monkeypatch, capsys):
    code, _, err = run(
        monkeypatch, capsys, "export", str(word_level_dir), "--gguf", "--output", str(tmp_path / "o")
    )
    assert code == 1
    assert "WordLevel, which GGUF has no equivalent for" in one_red_line(err)


def test_tiny_models_tokenizer_goes_to_gguf(student_dir):
    """The tiny models' own tokenizer (lsd_edge.models.bpe) is one GGUF holds, with GPT-2's pre-tokenizer."""
    _, processor = load_llava(str(student_dir), dtype="float32", device="cpu")
    assert tokenizer_facts(processor.tokenizer, "tiny")["pre"] == "gpt-2"


def test_cli_gguf_options(student_dir, tmp_path, monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "export", str(student_dir), "--gguf", "--int4")
    assert code == 1 and "--gguf takes --quant" in one_red_line(err)
    code, _, err = run(monkeypatch, capsys, "export", str(student_dir), "--gguf", "--quant", "q4")
    assert code == 1 and "--quant q4: choose one of f16, q8_0, q4_0" in one_red_line(err)
    args = ("export", str(student_dir), "--gguf", "--mmproj-quant", "q4_0", "--output", str(tmp_path / "o"))
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 1 and "--mmproj-quant q4_0: choose one of f16, q8_0" in one_red_line(err)
    code, _, err = run(monkeypatch, capsys, "export", str(student_dir), "--mmproj-quant", "f16")
    assert code == 1 and "--quant and --mmproj-quant go with --gguf" in one_red_line(err)


def test_q4_0_keeps_the_token_matrix_in_q8_0_and_the_mmproj_above_4_bits(bpe_student, tmp_path):
    """q4_0: the layers' matrices in Q4_0, the token embedding (tied: the output too) in Q8_0, as
    llama-quantize keeps them above 4 bits; the mmproj follows the LLM's quant but never below q8_0."""
    from lsd_edge.export.gguf.pipeline import GgufSettings

    model, processor = load_llava(str(bpe_student), dtype="float32", device="cpu")
    llm = write_llm(model, processor, None, tmp_path / "q.gguf", "q4_0", "q", "q")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(llm)).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert [GgufSettings(quant=q).mmproj for q in ("f16", "q8_0", "q4_0")] == ["f16", "q8_0", "q8_0"]
    assert GgufSettings(quant="q4_0", mmproj_quant="f16").mmproj == "f16"
    with pytest.raises(ExportError, match="--mmproj-quant q4_0: choose one of f16, q8_0"):
        write_mmproj(model, processor, tmp_path / "m.gguf", "q4_0", "m", "m")


def test_missing_or_corrupt_gguf_is_one_line(tmp_path):
    with pytest.raises(ExportError, match="no such GGUF file") as e:
        check_gguf_file(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ExportError, match="not a readable GGUF file") as e:
        check_gguf_file(bad)
    assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_cpp_greedy_tokens_equal_pytorch(bpe_student, standins, tmp_path, quant):
    needs_llama_cpp()
    data = standins["data"]
    settings = {"quant": quant, "samples": 4, "data": data / "eval/gqa_testdev_balanced.json", "images": data}
    if quant == "q8_0":
        settings.update(LIVELY_GGUF_BOUNDS)
    result = export_gguf(bpe_student, tmp_path / "gguf", settings)
    out = result.output
    assert {p.name for p in out.iterdir()} >= {"bpe-student.gguf", "mmproj-bpe-student.gguf", "Modelfile"}
    report = json.loads((out / "export_report.json").read_text())
    parity = report["parity"]
    assert report["gate"]["passed"] and parity["first_token_agreement"] == 1.0, parity["tokens"]
    assert parity["tokenizer"]["agreement"] == 1.0
    if quant == "f16":
        assert parity["greedy_agreement"] == 1.0, parity["tokens"]
        assert parity["max_rel_logit_diff"] < 2e-2
    else:
        # Q8_0 quantizes activations too, so a random model's later tokens drift. Measured here
        # (llama-cpp-python 0.3.36 from its sdist, portable CPU build): max relative logit difference
        # 0.103; the answers agree with PyTorch's on their first 4, 2, 6 and 8 of 8 tokens. Bounds with
        # room for another CPU; broken scales or weights give ~1 and agreement at chance.
        assert parity["max_rel_logit_diff"] < 0.2
        agreed = sum(_agreed_prefix(t["torch"], t["llama_cpp"]) for t in parity["tokens"])
        assert agreed >= 0.4 * sum(len(t["torch"]) for t in parity["tokens"]), parity["tokens"]
    # the answers depend on the image: llama.cpp reads the image embeddings, not only the text
    answers = {tuple(t["torch"]) for t in parity["tokens"]}
    assert len(answers) > 1, parity["tokens"]
    # scored on the eval questions, and gated: within the quant's bound of PyTorch's (f16: the same
    # answers, so the same accuracy)
    drop = report["gate"]["bound"][quant]["max_accuracy_drop"]
    assert parity["accuracy_llama_cpp"] >= parity["accuracy_torch"] - drop
    if quant == "f16":
        assert parity["accuracy_llama_cpp"] == parity["accuracy_torch"]


def test_llama_cpp_answers_are_decoded_and_scored_as_pytorchs(teacher_dir, shapes_dir):
    """The glue that lets the one accuracy path score llama.cpp: images as given or at the tower's size, the
    prompt's image token and stop tokens from PyTorch's runner, tokens decoded by its tokenizer
    (a stand-in for llama.cpp that answers with PyTorch's own tokens)."""
    from lsd_edge.data.questions import load_eval_items
    from lsd_edge.evaluate.accuracy import evaluate_answers
    from lsd_edge.export.gguf.parity import LlamaCppAnswers
    from lsd_edge.runtime.torch_runner import TorchRunner

    torch_runner = TorchRunner(teacher_dir)
    size = torch_runner.processor.image_processor.size
    seen = []

    class Echo:
        def greedy(self, ids, image_id, images, max_new_tokens, stop_ids, vocab_rows):
            assert image_id == torch_runner.encoder.image_id and stop_ids == torch_runner.stop_ids
            seen.append({im.size for im in images})
            px = torch_runner.pixel_values(images)
            return torch_runner.generate_ids(ids, px, max_new_tokens).token_ids, []

    items = load_eval_items(shapes_dir / "eval.json", shapes_dir / "images", torch_runner.processor)
    wh = (size["width"], size["height"])
    got = evaluate_answers(LlamaCppAnswers(Echo(), torch_runner, wh), items, 4)
    want = evaluate_answers(torch_runner, items, 4)
    assert got.as_dict() == want.as_dict() and seen and all(s == {wh} for s in seen)
    # without a size, mtmd is handed the images as they are (it resizes them itself, as llama.cpp's
    # apps do); with one, the processor's pixels whatever the image's size
    large = [replace(it, images=[im.resize((2 * wh[0], 2 * wh[1])) for im in it.images]) for it in items]
    for size_given, expected in ((None, (2 * wh[0], 2 * wh[1])), (wh, wh)):
        seen.clear()
        LlamaCppAnswers(Echo(), torch_runner, size_given).answers(large, 2)
        assert seen and all(s == {expected} for s in seen), (size_given, seen)


def _agreed_prefix(want: list[int], got: list[int]) -> int:
    """How many first tokens of two greedy answers are the same."""
    n = 0
    for a, b in zip(want, got, strict=False):
        if a != b:
            break
        n += 1
    return n


@pytest.mark.slow
@pytest.mark.parametrize("which", ["qwen2", "llama"])
def test_llama_cpp_text_only_greedy(bpe_student, clip_llama_student, tmp_path, which):
    """The LLM file alone, no mmproj: llama.cpp's greedy tokens of text-only prompts equal PyTorch's."""
    needs_llama_cpp()
    from lsd_edge.export.gguf.parity import LlamaCppRunner
    from lsd_edge.runtime.torch_runner import TorchRunner

    torch_runner = TorchRunner(bpe_student if which == "qwen2" else clip_llama_student, dtype="float32")
    eos = torch_runner.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    path = write_llm(torch_runner.model, torch_runner.processor, eos, tmp_path / "t.gguf", "f16", "t", "t")
    runner = LlamaCppRunner(path)
    try:
        for q in ("what color is the circle ?", "how many shapes are there ?", "say the word blue ."):
            ids = torch_runner.prompt_ids(q, with_image=False)
            want = torch_runner.generate_ids(ids, None, 8).token_ids
            got, _ = runner.greedy(ids, -1, [], 8, torch_runner.stop_ids, torch_runner.vocab_rows)
            assert got == want, q
            assert (
                runner.tokenize(
                    torch_runner.encoder.render(
                        [{"role": "user", "content": [{"type": "text", "text": q}]}], True
                    )
                )
                == ids
            )
    finally:
        runner.close()


def test_gate_rules_and_bounds():
    """Each reason the GGUF gate gives, on figures just past the quant's bounds, and bounds from the
    settings, the recipe's [export.gguf] and the measured ones. Below `ACCURACY_DECIDES` (an untrained
    model) the logits and tokens decide beside the accuracy; from it, the accuracy and the answers."""
    from dataclasses import replace

    from lsd_edge.export.gguf.pipeline import ACCURACY_DECIDES, QUANT_BOUNDS, GgufSettings, _gate

    s = GgufSettings(quant="q8_0")
    b = QUANT_BOUNDS["q8_0"]
    low = ACCURACY_DECIDES - 0.2  # an untrained model's accuracy: logits and tokens decide too
    ok = {
        "max_rel_logit_diff": b.max_rel_logit_diff,
        "first_token_agreement": b.min_first_token_agreement,
        "greedy_token_agreement": b.min_greedy_agreement,
        "accuracy_samples": 500,
        "accuracy_torch": low,
        "accuracy_llama_cpp": low - b.max_accuracy_drop,
        "answer_agreement": b.min_answer_agreement,
        "tokenizer": {"agreement": 1.0},
    }
    assert _gate(ok, s) == [] and s.bound == b
    assert _gate({**ok, "max_rel_logit_diff": 0.6}, s) == [
        "llama.cpp's q8_0 logits differ from PyTorch's by 6.00e-01 (relative) > 0.05, the q8_0 bound"
    ]
    assert _gate({**ok, "max_rel_logit_diff": float("nan")}, s)  # NaN logits pass no bound
    assert _gate({**ok, "first_token_agreement": 0.5}, s) == [
        "llama.cpp's q8_0 first greedy token equals PyTorch's on 50% of prompts, below 75%"
    ]
    assert _gate({**ok, "greedy_token_agreement": 0.25}, s) == [
        "llama.cpp's q8_0 greedy answers keep PyTorch's tokens for 25% of their length, below 50%"
    ]
    assert _gate({**ok, "accuracy_llama_cpp": 0.1}, s) == [
        "llama.cpp's q8_0 exact match 10.0% is more than 1 points below PyTorch's 30.0% on 500 eval questions"
    ]
    assert _gate({**ok, "tokenizer": {"agreement": 2 / 3}}, s) == [
        "llama.cpp tokenizes 33% of the chat prompts differently from the HF tokenizer"
    ]
    assert _gate({**ok, "accuracy_torch": None, "accuracy_llama_cpp": None}, s) == []
    # a trained model: logits and tokens are reported, accuracy and answers decide
    trained = {**ok, "accuracy_torch": 0.95, "accuracy_llama_cpp": 0.94, "max_rel_logit_diff": 0.6}
    assert _gate({**trained, "first_token_agreement": 0.5, "greedy_token_agreement": 0.1}, s) == []
    assert _gate({**trained, "accuracy_llama_cpp": 0.93}, s) == [
        "llama.cpp's q8_0 exact match 93.0% is more than 1 points below PyTorch's 95.0% on 500 eval questions"
    ]
    assert _gate({**trained, "accuracy_llama_cpp": float("nan")}, s)  # NaN passes no bound either
    f16 = GgufSettings(quant="f16")
    assert _gate({**trained, "accuracy_llama_cpp": 0.95, "answer_agreement": 1.0}, f16) == []
    assert _gate({**trained, "accuracy_llama_cpp": 0.95, "answer_agreement": 0.998}, f16) == [
        "llama.cpp's f16 answers 99.8% of the eval questions as PyTorch does, below 100%"
    ]
    assert _gate(trained, replace(s, accuracy_decides_from=1.0))  # logits decide again
    mine = GgufSettings(quant="f16", max_rel_logit_diff=0.1)
    assert mine.bound == replace(QUANT_BOUNDS["f16"], max_rel_logit_diff=0.1)


def test_recipe_sets_the_gguf_bounds(bpe_student, tmp_path, recipe_dict):
    import shutil

    from lsd_edge.export.gguf.pipeline import GgufSettings
    from lsd_edge.recipe.load import parse_recipe

    folder = tmp_path / "m"
    shutil.copytree(bpe_student, folder)
    recipe_dict["export"] = {"gguf": {"max_rel_logit_diff": 0.7, "min_greedy_agreement": 0.2}}
    (folder / "recipe.toml").write_text(parse_recipe(recipe_dict).to_toml())
    s = GgufSettings.from_model_dir(folder, quant="q8_0", min_greedy_agreement=0.1)
    assert (s.bound.max_rel_logit_diff, s.bound.min_greedy_agreement) == (0.7, 0.1)


def test_gguf_settings_use_the_recipes_eval_split(bpe_student, tmp_path, recipe_dict, shapes_dir):
    """As the ONNX export: the recipe's eval split (all of it, eval.max_samples, its max_new_tokens)
    judges the GGUF accuracy, the user's --data replaces it, and a split not here is named."""
    import shutil

    from lsd_edge.export.gguf.pipeline import GgufSettings
    from lsd_edge.recipe.load import parse_recipe

    folder = tmp_path / "m"
    shutil.copytree(bpe_student, folder)
    (folder / "recipe.toml").write_text(parse_recipe(recipe_dict).to_toml())
    s = GgufSettings.from_model_dir(folder)
    assert s.data is None and "eval data" in s.note and s.max_new_tokens == 3
    recipe_dict["data"]["root"] = str(shapes_dir)
    recipe_dict["eval"] = {"max_samples": 5}
    (folder / "recipe.toml").write_text(parse_recipe(recipe_dict).to_toml())
    s = GgufSettings.from_model_dir(folder, quant="q4_0")
    assert (s.data, s.images, s.note, s.eval_samples) == (
        shapes_dir / "eval.json",
        shapes_dir / "images",
        None,
        5,
    )
    s = GgufSettings.from_model_dir(folder, data=tmp_path / "mine.json")
    assert s.data == tmp_path / "mine.json" and s.images is None


@pytest.fixture(scope="module")
def untrained_bpe(standins, tmp_path_factory) -> Path:
    """recipes/tiny.toml's student size (64 wide, 4 layers) over the stand-ins' BPE tokenizer, untrained:
    q8_0's measured bounds hold for it (scripts/gate_bounds.py --gguf, 'embedded-size')."""
    return bpe_llava(
        standins["teacher"], tmp_path_factory.mktemp("bpe") / "untrained", layers=4, lively=False
    )


def _q8_0_blocks(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    """A Q8_0 tensor's bytes in the file (writable with mode r+), one row per 32-value block: a float16
    scale (2 bytes) then 32 int8 quants."""
    t = next(t for t in reader.tensors if t.name == name)
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, t.tensor_type
    return t.data.reshape(-1, 34)


def _scale(llm: Path, name: str, factor: float) -> None:
    """A Q8_0 tensor's scales multiplied by `factor` in the written file."""
    blocks = _q8_0_blocks(gguf.GGUFReader(str(llm), "r+"), name)
    blocks[:, :2] = (blocks[:, :2].copy().view(np.float16) * factor).view(np.uint8)


def _double_scales(llm: Path, mmproj: Path) -> None:
    """The token matrix's Q8_0 scales doubled (tied: it is the output matrix too): logits twice what
    they should be."""
    _scale(llm, "token_embd.weight", 2.0)


def _scramble_weight(llm: Path, mmproj: Path) -> None:
    """The token matrix's quants reversed, scales kept: its values in the wrong places."""
    blocks = _q8_0_blocks(gguf.GGUFReader(str(llm), "r+"), "token_embd.weight")
    blocks[:, 2:] = blocks[:, 2:].reshape(-1)[::-1].reshape(blocks.shape[0], 32)


def _field_values(path: Path, key: str, values: list) -> None:
    """A numeric metadata field rewritten in the file (same type and length)."""
    f = gguf.GGUFReader(str(path), "r+").fields[key]
    for i, v in zip(f.data, values, strict=True):
        f.parts[i][...] = v


def _imagenet_norm(llm: Path, mmproj: Path) -> None:
    """The mmproj written with CLIP's (ImageNet's) mean and std instead of SigLIP's 0.5: llama.cpp
    normalizes the pixels as the tower never saw them."""
    _field_values(mmproj, "clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    _field_values(mmproj, "clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])


def _norm_eps(llm: Path, mmproj: Path) -> None:
    """The RMSNorm epsilon written as 1e-2 (another config key's) instead of the model's 1e-6."""
    _field_values(llm, "qwen2.attention.layer_norm_rms_epsilon", [1e-2])


def _down_scales(llm: Path, mmproj: Path) -> None:
    """One layer's MLP down projection 30% too large (its Q8_0 scales off, as from a wrong divisor)."""
    _scale(llm, "blk.1.ffn_down.weight", 1.3)


def _broken_export(monkeypatch, damage):
    """export_gguf with `damage(llm, mmproj)` applied to the written files, before they are checked."""
    from lsd_edge.export.gguf import pipeline

    write_mmproj = pipeline.write_mmproj

    def broken(model, processor, out, quant, name, what):
        mmproj = write_mmproj(model, processor, out, quant, name, what)
        damage(out.with_name(out.name.removeprefix("mmproj-")), mmproj)
        return mmproj

    monkeypatch.setattr(pipeline, "write_mmproj", broken)


def _failed(out: Path) -> dict:
    return json.loads((out.with_name(out.name + ".failed") / "export_report.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_double_scales, _scramble_weight], ids=["scales", "weight"])
def test_a_broken_q8_0_export_is_refused_without_eval_data(untrained_bpe, tmp_path, monkeypatch, damage):
    from lsd_edge.export.gguf.pipeline import QUANT_BOUNDS

    needs_llama_cpp()
    _broken_export(monkeypatch, damage)
    out = tmp_path / "gguf"
    with pytest.raises(ExportError, match="GGUF parity gate failed: llama.cpp's q8_0 logits differ") as e:
        export_gguf(untrained_bpe, out, {"quant": "q8_0", "samples": 4})
    assert "\n" not in str(e.value) and not out.exists()
    r = _failed(out)
    p = r["parity"]
    assert p["source"].startswith("synthetic") and p["accuracy_llama_cpp"] is None
    assert r["gate"]["passed"] is False and r["gate"]["reasons"][0].startswith("llama.cpp's q8_0 logits")
    assert p["max_rel_logit_diff"] > 5 * QUANT_BOUNDS["q8_0"].max_rel_logit_diff, p
    # these untrained students' greedy answers survive the damage: the logits carry the gate
    assert p["first_token_agreement"] >= QUANT_BOUNDS["q8_0"].min_first_token_agreement, p
    assert r["gate"]["bound"] == {"q8_0": asdict(QUANT_BOUNDS["q8_0"])}


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, quant", [(_imagenet_norm, "f16"), (_norm_eps, "q8_0")], ids=["image-norm", "norm-eps"]
)
def test_a_wrong_hyperparameter_is_refused_on_first_tokens(bpe_student, tmp_path, monkeypatch, damage, quant):
    """A hyperparameter written wrong moves the first greedy token (on the lively student: its answers
    depend on the image and the question); in q8_0, under the lively bounds, before the logits' bound."""
    needs_llama_cpp()
    _broken_export(monkeypatch, damage)
    out = tmp_path / "gguf"
    with pytest.raises(ExportError, match=f"llama.cpp's {quant} first greedy token equals PyTorch's on"):
        export_gguf(bpe_student, out, {"quant": quant, "samples": 4, **LIVELY_GGUF_BOUNDS})
    r = _failed(out)
    assert r["parity"]["first_token_agreement"] <= 0.5 and r["parity"]["tokenizer"]["agreement"] == 1.0
    if quant == "q8_0":
        assert not any("logits" in why for why in r["gate"]["reasons"]), r["gate"]["reasons"]


@pytest.mark.slow
def test_a_layer_off_by_30_percent_is_refused_on_greedy_tokens(bpe_student, tmp_path, monkeypatch):
    """One layer's Q8_0 scales 30% too large: the logits stay inside the lively bound, the answers
    drift from their second token on."""
    needs_llama_cpp()
    _broken_export(monkeypatch, _down_scales)
    out = tmp_path / "gguf"
    with pytest.raises(ExportError, match="llama.cpp's q8_0 greedy answers keep PyTorch's tokens for"):
        export_gguf(bpe_student, out, {"quant": "q8_0", "samples": 8, **LIVELY_GGUF_BOUNDS})
    r = _failed(out)
    assert r["parity"]["greedy_token_agreement"] < 0.35, r["parity"]["tokens"]
    assert not any("logits" in why for why in r["gate"]["reasons"]), r["gate"]["reasons"]


def _eval_data(standins) -> dict:
    data = standins["data"]
    return {"data": data / "eval/gqa_testdev_balanced.json", "images": data}


@pytest.mark.slow
def test_accuracy_decides_and_f16_answers_as_pytorch(bpe_student, standins, tmp_path):
    """Judged as a trained model is (`accuracy_decides_from` 0 on the untrained lively student): every
    eval question answered by llama.cpp's f16 file as PyTorch answers it, the same exact match."""
    needs_llama_cpp()
    settings = {"quant": "f16", "samples": 2, "accuracy_decides_from": 0.0, **_eval_data(standins)}
    report = export_gguf(bpe_student, tmp_path / "gguf", settings).report
    p = report["parity"]
    assert report["gate"]["passed"] and report["gate"]["judged_by"] == p["judged_by"] == "accuracy"
    assert p["answer_agreement"] == 1.0 and p["accuracy_llama_cpp"] == p["accuracy_torch"]
    assert p["accuracy_llama_cpp_same_pixels"] == p["accuracy_torch"]
    assert p["accuracy_samples"] == len(json.loads(settings["data"].read_text()))


@pytest.mark.slow
def test_a_broken_file_is_refused_on_its_answers_when_accuracy_decides(
    bpe_student, standins, tmp_path, monkeypatch
):
    """The mmproj's pixel normalization written wrong: judged on accuracy, llama.cpp's f16 answers
    differ from PyTorch's on the eval questions, and the gate says so in one line."""
    needs_llama_cpp()
    _broken_export(monkeypatch, _imagenet_norm)
    out = tmp_path / "gguf"
    settings = {"quant": "f16", "samples": 2, "accuracy_decides_from": 0.0, **_eval_data(standins)}
    with pytest.raises(
        ExportError, match=r"llama.cpp's f16 answers [\d.]+% of the eval questions as PyTorch"
    ) as e:
        export_gguf(bpe_student, out, settings)
    assert "\n" not in str(e.value)
    r = _failed(out)
    assert r["gate"]["judged_by"] == "accuracy" and r["parity"]["answer_agreement"] < 1.0
    assert not any("logits" in why or "first greedy" in why for why in r["gate"]["reasons"])


@pytest.mark.slow
def test_q4_0_export_passes_its_measured_bounds(untrained_bpe, standins, tmp_path):
    """A q4_0 LLM with its q8_0 mmproj, on recipes/tiny.toml's student size (untrained): llama.cpp
    keeps q4_0's logit and token bounds, and runs the 4-bit file with the right tensor types."""
    needs_llama_cpp()
    report = export_gguf(untrained_bpe, tmp_path / "gguf", {"quant": "q4_0", "samples": 4}).report
    assert report["gate"]["passed"] and report["settings"]["mmproj"] == "q8_0"
    r = gguf.GGUFReader(str(tmp_path / "gguf" / "untrained.gguf"))
    assert {t.tensor_type for t in r.tensors if t.name.startswith("blk.") and t.data.ndim == 2} == {
        gguf.GGMLQuantizationType.Q4_0
    }


@pytest.mark.slow
def test_lost_merges_are_refused_on_the_tokenizer(bpe_student, tmp_path, monkeypatch):
    """A writer that loses half the BPE merges: llama.cpp splits the chat prompts into other ids (the
    gate's greedy check feeds PyTorch's ids, so only the tokenizer check can see it)."""
    from lsd_edge.export.gguf import llm

    needs_llama_cpp()
    facts = llm.tokenizer_facts

    def half_the_merges(tokenizer, what):
        f = facts(tokenizer, what)
        return {**f, "merges": f["merges"][: len(f["merges"]) // 2]}

    monkeypatch.setattr(llm, "tokenizer_facts", half_the_merges)
    out = tmp_path / "gguf"
    with pytest.raises(ExportError, match=r"llama.cpp tokenizes \d+% of the chat prompts differently") as e:
        export_gguf(bpe_student, out, {"quant": "f16", "samples": 2})
    assert "\n" not in str(e.value)
    r = _failed(out)
    assert r["gate"]["reasons"] == [str(e.value).split("failed: ")[1].split("; the export")[0]]
    assert r["parity"]["greedy_token_agreement"] == 1.0


@pytest.mark.slow
def test_llama_cpp_refuses_a_corrupt_file_in_one_line(tmp_path):
    needs_llama_cpp()
    from lsd_edge.export.gguf.parity import LlamaCppRunner

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(256))
    with pytest.raises(ExportError, match="llama.cpp cannot load it") as e:
        LlamaCppRunner(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ExportError, match="no such GGUF file"):
        LlamaCppRunner(tmp_path / "missing.gguf")


@pytest.mark.slow
def test_cli_export_gguf(bpe_student, tmp_path, monkeypatch, capsys):
    needs_llama_cpp()
    code, out, err = run(
        monkeypatch,
        capsys,
        "export",
        str(bpe_student),
        "--gguf",
        "--quant",
        "f16",
        "--output",
        str(tmp_path / "g"),
    )
    assert code == 0, err
    assert "parity gate passed" in out
    modelfile = (tmp_path / "g" / "Modelfile").read_text()
    assert "FROM ./bpe-student.gguf" in modelfile and "FROM ./mmproj-bpe-student.gguf" in modelfile


def test_missing_llama_cpp_is_refused_before_writing(bpe_student, tmp_path, monkeypatch):
    import lsd_edge.export.gguf.pipeline as pipeline

    monkeypatch.setattr(pipeline, "llama_cpp_missing", lambda: "llama-cpp-python is not importable (x)")
    with pytest.raises(ExportError, match=r"the GGUF parity gate runs llama.cpp through it; pip install"):
        export_gguf(bpe_student, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_untied_padded_teacher_stand_in(standins, tmp_path):
    """The stand-in teacher as a LLaVA to export: untied lm_head (output.weight), 64 padded rows, a
    48-wide LLM whose rows Q8_0 cannot block (F16 fallback)."""
    needs_llama_cpp()
    result = export_gguf(standins["teacher"], tmp_path / "gguf", {"quant": "q8_0", "samples": 3})
    assert result.report["gate"]["passed"], result.report["parity"]["tokens"]
    r = gguf.GGUFReader(str(tmp_path / "gguf" / "teacher.gguf"))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["output.weight"] == gguf.GGMLQuantizationType.F16


def _with_pre_tokenizer(tokenizer, regex: str | None):
    """A copy of `tokenizer` whose pre-tokenizer splits with `regex` first (Qwen2's and Llama 3's way)."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.mark.parametrize(
    "regex, name",
    [(QWEN2_REGEX, "qwen2"), (LLAMA3_REGEX, "llama-bpe"), (r"\s+|\w+", None)],
)
def test_pre_tokenizer_names(standins, regex, name):
    from transformers import AutoTokenizer

    tok = _with_pre_tokenizer(AutoTokenizer.from_pretrained(standins["teacher"]), regex)
    if name is None:
        with pytest.raises(ExportError, match="neither GPT-2's, Qwen2's nor Llama 3's"):
            tokenizer_facts(tok, "t")
    else:
        assert tokenizer_facts(tok, "t")["pre"] == name


@pytest.mark.slow
@pytest.mark.parametrize("regex", [QWEN2_REGEX, LLAMA3_REGEX])
def test_llama_cpp_splits_as_the_hf_pre_tokenizer(bpe_student, tmp_path, regex):
    """The pre-tokenizer name written makes llama.cpp split text (digits, contractions, newlines) as HF does."""
    needs_llama_cpp()
    from lsd_edge.export.gguf.parity import LlamaCppRunner

    model, processor = load_llava(str(bpe_student), dtype="float32", device="cpu")
    processor.tokenizer = _with_pre_tokenizer(processor.tokenizer, regex)
    path = write_llm(model, processor, None, tmp_path / "p.gguf", "f16", "p", "p")
    runner = LlamaCppRunner(path)
    try:
        for text in (
            "there are 12345 shapes , isn't it ?\n\n  what's RED",
            "<|im_start|>user\nhi 3.14<|im_end|>\n",
        ):
            assert (
                runner.tokenize(text) == processor.tokenizer(text, add_special_tokens=False)["input_ids"]
            ), text
    finally:
        runner.close()


def test_the_summary_says_what_judged_the_gate():
    """`lsd-edge export --gguf` prints what decided (accuracy or logits), both exact matches and the
    share of equal answers, or why accuracy was not compared."""
    from lsd_edge.cli.render import gguf_report
    from lsd_edge.export.gguf.pipeline import QUANT_BOUNDS

    parity = {
        "samples": 4,
        "source": "eval.json",
        "max_rel_logit_diff": 0.3,
        "first_token_agreement": 1.0,
        "greedy_token_agreement": 1.0,
        "greedy_agreement": 1.0,
        "tokenizer": {"agreement": 1.0},
        "judged_by": "accuracy",
        "accuracy_samples": 500,
        "accuracy_torch": 0.95,
        "accuracy_llama_cpp": 0.946,
        "answer_agreement": 0.99,
    }
    report = {
        "model_dir": "m",
        "output": "o",
        "files": {},
        "settings": {"quant": "q4_0", "mmproj": "q8_0"},
        "parity": parity,
        "gate": {"bound": {"q4_0": asdict(QUANT_BOUNDS["q4_0"])}},
    }
    lines = [x for x in gguf_report(report) if isinstance(x, str)]
    assert lines[0] == "model: m (q4_0, mmproj q8_0)"
    assert lines[1] == (
        "gate judged by accuracy; exact match on 500 eval questions: PyTorch 95.0%, llama.cpp 94.6% "
        "resizing the images itself (at most 1 points below); same answers from the same pixels 99.0% "
        "(floor 0%)"
    )
    parity["accuracy_llama_cpp_same_pixels"] = 0.948  # a report that has it says it
    lines = [x for x in gguf_report(report) if isinstance(x, str)]
    assert "itself (at most 1 points below), 94.8% from PyTorch's pixels; same answers" in lines[1]
    parity.update(judged_by="logits", accuracy_torch=None, accuracy_llama_cpp=None)
    report["settings"]["note"] = "the recipe's eval data x is not here; pass --data to compare accuracy"
    lines = [x for x in gguf_report(report) if isinstance(x, str)]
    assert lines[1] == f"gate judged by logits; {report['settings']['note']}"


@pytest.mark.parametrize("image_size, passes", [((16, 16), 1), ((32, 32), 2)])
def test_the_accuracy_pass_scores_the_images_as_given(monkeypatch, image_size, passes):
    """llama.cpp's exact match is of the images as given (mtmd resizes them) and the agreement of the
    processor's pixels; images already at the tower's size are the same both ways: one pass."""
    from types import SimpleNamespace

    from PIL import Image

    from lsd_edge.data.questions import EvalItem
    from lsd_edge.export.gguf import pipeline

    items = [EvalItem(f"q{i}", "color", [1, 2], [Image.new("RGB", image_size)], "red") for i in range(4)]
    calls = []

    class Answers:
        def __init__(self, runner, torch_runner, size):
            self.size = size

        def answers(self, items, n):
            calls.append(self.size)
            # from the processor's pixels every answer is right, from the images as given half
            return ["red"] * len(items) if self.size else ["red", "blue"] * (len(items) // 2)

    monkeypatch.setattr(pipeline, "parity_items", lambda *a: (items, "eval"))
    monkeypatch.setattr(pipeline, "LlamaCppAnswers", Answers)
    torch_runner = SimpleNamespace(processor=None, answers=lambda items, n: ["red"] * len(items))
    settings = SimpleNamespace(data="d", images=None, eval_samples=None, max_new_tokens=2)
    rep = pipeline._accuracy(torch_runner, None, (16, 16), settings)
    assert calls == [(16, 16), None][:passes]
    assert rep["accuracy_torch"] == rep["accuracy_llama_cpp_same_pixels"] == rep["answer_agreement"] == 1.0
    assert rep["accuracy_llama_cpp"] == (1.0 if passes == 1 else 0.5)
