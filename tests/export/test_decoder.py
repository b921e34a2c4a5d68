"""Which decoder an export gets (the model builder's or lsd-edge's traced one), and the builder's failures."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lsd_edge.errors import ExportError
from lsd_edge.export.onnx.decoder import (
    builder_error,
    builder_source,
    decoder_plans,
    run_builder,
    save_causal_lm,
)
from lsd_edge.export.onnx.pipeline import ExportSettings
from lsd_edge.models.load import load_llava

from ..helpers import one_red_line, run


def _tc(model_type="qwen2", hidden=64, heads=4):
    return SimpleNamespace(
        model_type=model_type,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=None,
    )


def test_the_builder_where_it_can_and_why_not_elsewhere(monkeypatch):
    plans = decoder_plans(_tc(), ["fp32", "int8"], "cpu")
    assert plans["fp32"].runs_builder and plans["fp32"].kv_cache == "shared"
    assert not plans["int8"].runs_builder and "8 bits" in plans["int8"].quantized
    for tc, variants, target, why in [
        (_tc("gemma"), ["fp32"], "cpu", "not set up for gemma language models"),
        (_tc(hidden=48), ["fp32"], "cpu", "multiple of 16, this LLM's is 12"),
        (_tc(), ["fp32", "fp16"], "cpu", "fp16 decoders for the CUDA execution provider only"),
    ]:
        got = decoder_plans(tc, variants, target)
        assert set(got) == set(variants) and all(s.kv_cache == "concat" for s in got.values())
        assert why in got["fp32"].reason
        with pytest.raises(ExportError, match=f"export.decoder = builder: .*{why.split(',')[0]}"):
            decoder_plans(tc, variants, target, "builder")
    assert "asked for" in decoder_plans(_tc(), ["fp32"], "cpu", "traced")["fp32"].reason
    monkeypatch.setattr("lsd_edge.export.onnx.decoder.builder_version", lambda: None)
    assert decoder_plans(_tc(), ["fp32"], "cpu")["fp32"].reason == "onnxruntime-genai is not installed"


def test_on_cuda_every_variant_is_a_builder_run_of_its_own():
    plans = decoder_plans(_tc(), ["fp32", "fp16"], "cuda")
    assert all(s.runs_builder and s.provider == "cuda" for s in plans.values())
    assert builder_source("0.18.0", "int4", "cuda").quantized is None
    assert "4 bits" in builder_source("0.18.0", "int4", "cpu").quantized


def test_the_llm_is_written_without_copies_of_the_model(tmp_path, onnx_student_dir):
    model, _ = load_llava(str(onnx_student_dir))
    save_causal_lm(model, tmp_path / "hf")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    lm = model.model.language_model.state_dict()
    assert set(tensors) == {f"model.{k}" for k in lm} | (
        set() if model.config.text_config.tie_word_embeddings else {"lm_head.weight"}
    )
    assert all(torch.equal(tensors[f"model.{k}"], v) for k, v in lm.items())
    assert '"architectures": [\n    "Qwen2ForCausalLM"' in (tmp_path / "hf" / "config.json").read_text()


def test_a_failing_builder_is_one_line(tmp_path):
    (tmp_path / "hf").mkdir()  # no config.json: the builder cannot read the model
    with pytest.raises(
        ExportError, match="the onnxruntime-genai model builder failed on the fp32 decoder"
    ) as e:
        run_builder(tmp_path / "hf", tmp_path / "out", builder_source("0.18.0", "fp32", "cpu"))
    assert "\n" not in str(e.value) and "--decoder traced" in str(e.value)


def test_builder_error_is_its_last_exception():
    out = "Reading layer 0\nTraceback (most recent call last):\n  File x\nValueError: bad head size\n(1) more"
    assert builder_error(out) == "ValueError: bad head size"
    assert builder_error("just text\nlast line") == "last line" and builder_error("") is None


def test_decoder_setting_is_checked(tmp_path, monkeypatch, capsys, onnx_student_dir):
    with pytest.raises(ExportError, match="decoder 'fast': choose auto, builder or traced"):
        ExportSettings.from_model_dir(onnx_student_dir, decoder="fast")
    code, _, err = run(monkeypatch, capsys, "export", str(onnx_student_dir), "--decoder", "fast")
    assert code == 1 and "choose auto, builder or traced" in one_red_line(err)


def test_builder_int4_with_external_data(tmp_path, onnx_student_dir, shapes_dir):
    """A decoder past the external-data threshold keeps its weights in <file>_data (moved, not
    reloaded), the int4 variant is quantized from it, and both pass the gate through the runner."""
    from lsd_edge.export.onnx.pipeline import export
    from lsd_edge.runtime.onnx.runner import OnnxRunner

    from ..helpers import onnx_settings

    r = export(
        onnx_student_dir, tmp_path / "o", onnx_settings(shapes_dir, quantize="int4", external_data_mb=0.0)
    )
    onnx_dir = r.output / "onnx"
    assert (onnx_dir / "decoder_model_merged.onnx_data").is_file()
    assert (onnx_dir / "decoder_model_merged_q4.onnx_data").is_file()
    assert not list(onnx_dir.glob("*.onnx.data")) and r.report["gate"]["passed"]
    assert (
        r.report["decoder"]["int4"]["kv_cache"] == "shared"
        and "4 bits" in r.report["decoder"]["int4"]["quantized"]
    )
    assert r.report["parity"]["variants"]["int4"]["samples"] > 0
    # the gate ran the int4 prompts through the int8 GEMM prefill, its weights read from <file>_data
    assert r.report["parity"]["variants"]["int4"]["prefill"] == "gemm"
    assert r.report["parity"]["variants"]["fp32"]["prefill"] == "exported"
    gemm, exported = OnnxRunner(r.output), OnnxRunner(r.output, prefill="exported")
    assert gemm.generate(None, "how many shapes are there ?", 4, ignore_eos=True).new_tokens == 4
    # auto on the CPU: a 4-bit image and prompt through the int8 GEMM, the vision encoder replaced
    assert gemm.gemm_graphs == ["vision_encoder", "decoder_model_merged"] and exported.gemm_graphs == []
    image = next((shapes_dir / "images").glob("*.png"))
    pixels = gemm.pixel_values(Image.open(image))
    got, want = gemm.image_features(pixels), exported.image_features(pixels)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05
