"""ONNX export: the three-graph layout, quantized sizes, the parity gate, locating the model, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lsd_edge.errors import ExportError
from lsd_edge.export.gated import latest_student
from lsd_edge.export.onnx.graphs import MergedDecoder
from lsd_edge.export.onnx.pipeline import (
    VARIANT_BOUNDS,
    ExportSettings,
    VariantBound,
    _gate,
    _variant_gate,
    export,
)
from lsd_edge.export.onnx.quantize import quantize_gather_rows
from lsd_edge.models.load import load_llava
from lsd_edge.runtime.onnx.layout import GRAPHS, REPORT, graph_file
from lsd_edge.runtime.onnx.runner import graph_threads
from lsd_edge.workspace import default_export_dir as default_output

from ..helpers import one_red_line, onnx_settings, run


def _report(folder: Path) -> dict:
    return json.loads((folder / REPORT).read_text())


def test_layout_and_report(onnx_dir):
    for g in GRAPHS:
        assert (onnx_dir / "onnx" / f"{g}.onnx").is_file() and (
            onnx_dir / "onnx" / f"{g}_int8.onnx"
        ).is_file()
    for f in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "processor_config.json",
    ):
        assert (onnx_dir / f).is_file(), f
    r = _report(onnx_dir)
    p = r["parity"]
    assert set(p) >= {"max_rel_logit_diff", "greedy_agreement", "accuracy_torch", "accuracy_onnx"}
    assert p["max_rel_logit_diff"] <= 1e-3 and p["greedy_agreement"] == 1.0
    assert p["variants"]["fp32"]["vision_max_rel_diff"] <= 1e-4
    assert p["accuracy_onnx"] >= p["accuracy_torch"] - 0.02 and p["accuracy_samples"] == 8
    assert r["gate"]["passed"] and r["default_variant"] == "int8"
    assert set(r["sizes_mb"]) >= {"fp32", "int8", "pytorch_safetensors"}
    assert r["speed"]["torch"]["decode_tokens_per_s"] > 0 and r["speed"]["onnx_int8"]["new_tokens"] == 8
    # the threads each graph's session was given, as the runner's rule gives them for these files
    assert r["speed"]["threads"]["onnxruntime"] == {
        v: {g: graph_threads(onnx_dir / graph_file(g, v)) for g in GRAPHS} for v in ("fp32", "int8")
    }
    assert r["timing_s"]["export"] > 0
    # a model folder lsd-edge did not distil: its card claims no teacher
    card = (onnx_dir / "README.md").read_text()
    assert "| teacher |" not in card and "the teacher's" not in card and "| this student |" in card


def test_decoder_io_names_and_dynamic_axes(onnx_dir):
    """The model builder's decoder keeps the names transformers.js and the runner feed."""
    s = ort.InferenceSession(str(onnx_dir / "onnx" / "decoder_model_merged.onnx"))
    ins = {i.name: i.shape for i in s.get_inputs()}
    outs = {o.name: o.shape for o in s.get_outputs()}
    assert {"inputs_embeds", "attention_mask"} <= set(ins) and "input_ids" not in ins
    past = [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert sorted(n for n in ins if n.startswith("past")) == sorted(past)
    assert sorted(outs) == sorted(["logits"] + [p.replace("past_key_values", "present") for p in past])
    assert all(isinstance(d, str) for d in ins["inputs_embeds"][:2])  # batch and sequence are dynamic
    assert isinstance(ins["past_key_values.0.key"][2], str) and isinstance(outs["present.0.key"][2], str)
    assert outs["logits"][1] == 1  # the last position's logits only


def test_the_decoder_is_the_model_builders(onnx_dir):
    r = _report(onnx_dir)
    for v in ("fp32", "int8"):
        d = r["decoder"][v]
        assert d["graph"].startswith("onnxruntime-genai model builder") and d["kv_cache"] == "shared"
        assert d["precision"] == v and d["options"] == {"exclude_embeds": "true", "prune_lm_head": "true"}
    # on the CPU the builder runs once, in fp32; int8 is its weights through MatMulNBits
    assert "quantized" not in r["decoder"]["fp32"] and "8 bits" in r["decoder"]["int8"]["quantized"]
    ops = {n.op_type for n in onnx.load(str(onnx_dir / graph_file("decoder_model_merged"))).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert not {"Concat", "Transpose", "Softmax"} & ops  # no cache concatenation, no transposed keys
    assert set(r["timing_s"]["decoder_builder_by_variant"]) == {"fp32", "int8"}
    assert r["peak_rss_mb"]["subprocess"] > 0 and r["peak_rss_mb"]["process"] > 0  # the builder's own
    assert not list((onnx_dir / "onnx").glob("model.onnx*")) and not (onnx_dir / ".builder").exists()


def test_quantized_decoder_is_small(onnx_dir):
    sizes = _report(onnx_dir)["sizes_mb"]
    fp32 = (onnx_dir / graph_file("decoder_model_merged")).stat().st_size
    int8 = (onnx_dir / graph_file("decoder_model_merged", "int8")).stat().st_size
    assert int8 <= 0.35 * fp32
    assert sizes["int8"]["total"] < sizes["fp32"]["total"]
    nodes = onnx.load(str(onnx_dir / "onnx" / "decoder_model_merged_int8.onnx")).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert nbits and not [n for n in nodes if n.op_type == "MatMul"]  # lm_head included
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (8, 32, 4)
    vision = {n.op_type for n in onnx.load(str(onnx_dir / "onnx" / "vision_encoder_int8.onnx")).graph.node}
    assert "MatMulInteger" in vision
    embed = onnx.load(str(onnx_dir / "onnx" / "embed_tokens_int8.onnx"))
    assert {i.data_type for i in embed.graph.initializer} >= {onnx.TensorProto.INT8}


def test_vision_encoder_is_the_models_image_path(onnx_dir, onnx_student_dir):
    model, processor = load_llava(str(onnx_student_dir))
    px = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = torch.stack(list(model.model.get_image_features(pixel_values=px).pooler_output)).numpy()
    s = ort.InferenceSession(str(onnx_dir / "onnx" / "vision_encoder.onnx"))
    got = s.run(None, {"pixel_values": px.numpy()})[0]
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5


def test_merged_decoder_prefill_then_decode_batch_of_two(onnx_dir, onnx_student_dir):
    """The builder's decoder, fed as transformers.js feeds it (a growing past, no position ids), on a
    batch of two computes the model's last-position logits, prefill and decode."""
    model, _ = load_llava(str(onnx_student_dir))
    model.eval()
    tc = model.config.text_config
    ids = torch.randint(5, tc.vocab_size, (2, 7))
    with torch.no_grad():
        full = model(input_ids=ids).logits.numpy()  # (2, 7, V)
        embeds = model.get_input_embeddings()(ids)
    s = ort.InferenceSession(str(onnx_dir / "onnx" / "decoder_model_merged.onnx"))
    head = tc.hidden_size // tc.num_attention_heads
    past = {
        i.name: np.zeros((2, tc.num_key_value_heads, 0, head), np.float32)
        for i in s.get_inputs()
        if i.name.startswith("past")
    }
    presents = [n.replace("past_key_values", "present") for n in past]
    feed = {"inputs_embeds": embeds[:, :6].numpy(), "attention_mask": np.ones((2, 6), np.int64)}
    outs = s.run(["logits", *presents], {**feed, **past})
    assert outs[0].shape == (2, 1, full.shape[-1]) and np.abs(outs[0][:, 0] - full[:, 5]).max() <= 1e-4
    step = {"inputs_embeds": embeds[:, 6:].numpy(), "attention_mask": np.ones((2, 7), np.int64)}
    outs = s.run(["logits", *presents], {**step, **dict(zip(past, outs[1:], strict=True))})
    assert np.abs(outs[0][:, 0] - full[:, 6]).max() <= 1e-4 and outs[1].shape[2] == 7


def test_traced_decoder_prefill_then_decode(tmp_path, student_dir, shapes_dir):
    """A head size GroupQueryAttention cannot take (8) gets lsd-edge's traced decoder, and says why."""
    r = export(student_dir, tmp_path / "o", onnx_settings(shapes_dir, quantize="none"))
    d = r.report["decoder"]["fp32"]
    assert d["kv_cache"] == "concat" and "multiple of 16, this LLM's is 8" in d["reason"]
    model, _ = load_llava(str(student_dir))
    tc = model.config.text_config
    ids = torch.randint(5, tc.vocab_size, (2, 7))
    with torch.no_grad():
        full = model(input_ids=ids).logits.numpy()  # (2, 7, V)
        embeds = model.get_input_embeddings()(ids)
    s = ort.InferenceSession(str(r.output / "onnx" / "decoder_model_merged.onnx"))
    assert [i.name for i in s.get_inputs()][:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    head = tc.hidden_size // tc.num_attention_heads
    past = {
        i.name: np.zeros((2, tc.num_key_value_heads, 0, head), np.float32)
        for i in s.get_inputs()
        if i.name.startswith("past")
    }
    feed = {
        "inputs_embeds": embeds[:, :6].numpy(),
        "attention_mask": np.ones((2, 6), np.int64),
        "position_ids": np.tile(np.arange(6), (2, 1)),
    }
    outs = s.run(None, {**feed, **past})
    assert np.abs(outs[0] - full[:, :6]).max() <= 1e-4
    step = {
        "inputs_embeds": embeds[:, 6:].numpy(),
        "attention_mask": np.ones((2, 7), np.int64),
        "position_ids": np.full((2, 1), 6),
    }
    outs = s.run(None, {**step, **dict(zip(past, outs[1:], strict=True))})
    assert np.abs(outs[0][:, 0] - full[:, 6]).max() <= 1e-4 and outs[1].shape[2] == 7
    # the wrapper that was traced computes what the model computes
    empty = [torch.zeros(a.shape) for a in past.values()]
    with torch.no_grad():
        wrapped = MergedDecoder(model)(
            embeds, torch.ones(2, 7, dtype=torch.long), torch.arange(7).expand(2, 7), empty
        )
    assert torch.allclose(wrapped[0], torch.from_numpy(full), atol=1e-5)


def test_quantize_gather_rows_keeps_rows_within_their_own_range():
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (10, 8)).astype(np.float32)
    w[3] *= 100  # an outlier row must not coarsen the others
    g = helper.make_graph(
        [helper.make_node("Gather", ["w", "ids"], ["out"], axis=0)],
        "g",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["b", "s", 8])],
        [numpy_helper.from_array(w, "w")],
    )
    m = quantize_gather_rows(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    s = ort.InferenceSession(m.SerializeToString())
    ids = np.arange(10, dtype=np.int64)[None]
    got = s.run(None, {"ids": ids})[0][0]
    err = np.abs(got - w).max(axis=1)
    assert np.all(err <= np.abs(w).max(axis=1) / 254 + 1e-9)


# ------------------------------------------------------------------------------------------ the gate


def _reuse_graphs(src: Path, damage: float = 0.0):
    """A `write_graphs` stand-in that copies already exported graphs (optionally with a damaged decoder)."""

    def fake(model, out, variants, target="cpu", opset=18, external_data_mb=1536.0, decoder="auto"):
        (out / "onnx").mkdir(exist_ok=True)
        for v in variants:
            for g in GRAPHS:
                shutil.copy2(src / graph_file(g, v), out / graph_file(g, v))
        if damage:
            path = out / graph_file("decoder_model_merged")
            m = onnx.load(str(path))
            big = max(m.graph.initializer, key=lambda t: len(t.raw_data))
            arr = onnx.numpy_helper.to_array(big) * (1 + damage)
            big.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), big.name))
            onnx.save(m, str(path))
        return {
            "decoder": {v: _report(src)["decoder"][v] for v in variants},
            "seconds": {},
            "builder_peak_mb": 0.0,
        }

    return fake


def test_failed_gate_keeps_artifacts_beside(tmp_path, monkeypatch, onnx_dir, onnx_student_dir, shapes_dir):
    monkeypatch.setattr("lsd_edge.export.onnx.pipeline.write_graphs", _reuse_graphs(onnx_dir, damage=0.05))
    out = tmp_path / "onnx"
    with pytest.raises(ExportError, match="parity gate failed: fp32 logits differ") as e:
        export(onnx_student_dir, out, onnx_settings(shapes_dir))
    assert "\n" not in str(e.value) and str(tmp_path / "onnx.failed") in str(e.value)
    assert not out.exists()
    r = _report(tmp_path / "onnx.failed")
    assert r["gate"]["passed"] is False and "fp32 logits" in r["gate"]["reasons"][0]
    assert (tmp_path / "onnx.failed" / "onnx" / "decoder_model_merged_int8.onnx").is_file()
    # a later good export replaces the failed folder
    monkeypatch.setattr("lsd_edge.export.onnx.pipeline.write_graphs", _reuse_graphs(onnx_dir))
    export(onnx_student_dir, out, onnx_settings(shapes_dir, quantize="none"))
    assert out.is_dir() and not (tmp_path / "onnx.failed").exists()
    assert _report(out)["variants"] == ["fp32"]


def test_gate_rules():
    s = ExportSettings(max_rel_logit_diff=1e-3, max_accuracy_drop=0.02)
    ok = {"max_rel_logit_diff": 1e-6, "greedy_agreement": 1.0}
    assert _gate(s, ok, 0.5, 0.49) == [] and _gate(s, ok, None, None) == []
    (why,) = _gate(s, ok, 0.5, 0.47)
    assert why == "int8 accuracy 47.0% is more than 2 points below PyTorch's 50.0%"
    assert "greedy tokens match PyTorch on 75%" in _gate(s, {**ok, "greedy_agreement": 0.75}, None, None)[0]
    assert "fp32 logits differ" in _gate(s, {**ok, "max_rel_logit_diff": 2e-3}, 0.5, 0.5)[0]


def test_variant_gate_rules():
    s = ExportSettings(quantize="int4")
    ok = {"max_rel_logit_diff": 0.2, "greedy_agreement": 0.5}
    assert _variant_gate(s, ok) == [] and _variant_gate(ExportSettings(quantize="none"), {}) == []
    assert s.variant_bound == VARIANT_BOUNDS["int4"]
    assert _variant_gate(s, {**ok, "max_rel_logit_diff": 0.5}) == [
        "int4 logits differ from PyTorch by 5.00e-01 (relative) > 4e-01, the int4 bound"
    ]
    assert _variant_gate(s, {**ok, "greedy_agreement": 0.25}) == [
        "int4 greedy tokens match PyTorch on 25% of samples, below 50%"
    ]
    # the settings' own bounds replace the measured ones, one at a time
    mine = ExportSettings(quantize="int8", max_variant_rel_logit_diff=0.3)
    assert mine.variant_bound == VariantBound(0.3, VARIANT_BOUNDS["int8"].min_greedy_agreement)
    assert _variant_gate(mine, {"max_rel_logit_diff": 0.25, "greedy_agreement": 1.0}) == []


def _scale_lm_head(m: onnx.ModelProto) -> None:
    """The lm_head's quantization scales doubled: every logit twice what it should be."""
    scales = [t for t in m.graph.initializer if "lm_head" in t.name and "scale" in t.name]
    assert scales, [t.name for t in m.graph.initializer]
    for t in scales:
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * 2, t.name))


def _scramble_weight(m: onnx.ModelProto) -> None:
    """The bytes of the largest quantized weight reversed: its values land in the wrong places."""
    big = max(
        (t for t in m.graph.initializer if t.data_type != onnx.TensorProto.FLOAT),
        key=lambda t: len(t.raw_data),
    )
    arr = onnx.numpy_helper.to_array(big)
    big.CopyFrom(onnx.numpy_helper.from_array(arr.reshape(-1)[::-1].reshape(arr.shape).copy(), big.name))


@pytest.mark.parametrize(
    "quantize,damage",
    [("int8", _scale_lm_head), ("int4", _scramble_weight)],
    ids=["int8-scales", "int4-weight"],
)
def test_a_broken_quantized_export_is_refused_without_eval_data(
    quantize, damage, tmp_path, monkeypatch, onnx_student_dir
):
    from lsd_edge.export.onnx import pipeline

    write_graphs = pipeline.write_graphs

    def broken(model, out, variants, *args, **kw):
        made = write_graphs(model, out, variants, *args, **kw)
        path = out / graph_file("decoder_model_merged", variants[-1])
        m = onnx.load(str(path))
        damage(m)
        onnx.save(m, str(path))
        return made

    monkeypatch.setattr(pipeline, "write_graphs", broken)
    s = ExportSettings(quantize=quantize, parity_samples=4, max_new_tokens=4, bench_tokens=4, bench_repeats=1)
    with pytest.raises(ExportError, match=f"parity gate failed: {quantize} logits differ from PyTorch") as e:
        export(onnx_student_dir, tmp_path / "o", s)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()
    r = _report(tmp_path / "o.failed")
    assert r["parity"]["source"].startswith("synthetic") and r["parity"]["accuracy_onnx"] is None
    assert r["gate"]["passed"] is False and r["parity"]["variants"]["fp32"]["greedy_agreement"] == 1.0
    assert all(why.startswith(f"{quantize} ") for why in r["gate"]["reasons"]), r["gate"]["reasons"]
    own = r["parity"]["variants"][r["variants"][-1]]
    assert own["max_rel_logit_diff"] > 2 * VARIANT_BOUNDS[quantize].max_rel_logit_diff
    assert r["gate"]["variant_bound"] == {quantize: asdict(VARIANT_BOUNDS[quantize])}


def test_without_eval_data_checks_random_images(tmp_path, monkeypatch, onnx_dir, onnx_student_dir):
    monkeypatch.setattr("lsd_edge.export.onnx.pipeline.write_graphs", _reuse_graphs(onnx_dir))
    s = ExportSettings(quantize="none", parity_samples=2, max_new_tokens=3, bench_tokens=4, bench_repeats=1)
    r = export(onnx_student_dir, tmp_path / "o", s).report
    assert r["parity"]["source"].startswith("synthetic") and r["parity"]["accuracy_onnx"] is None
    assert r["parity"]["greedy_agreement"] == 1.0


def test_missing_eval_data(tmp_path, onnx_student_dir):
    s = ExportSettings(data=tmp_path / "nope.json")
    with pytest.raises(ExportError, match="no such eval data file"):
        export(onnx_student_dir, tmp_path / "o", s)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_export_tiny_student_with_external_data_and_int4(tmp_path, student_dir, shapes_dir):
    r = export(student_dir, tmp_path / "o", onnx_settings(shapes_dir, quantize="int4", external_data_mb=0.0))
    out = r.output
    for g in GRAPHS:
        assert (out / "onnx" / f"{g}.onnx_data").is_file()
    # transformers.js is told which graphs keep their weights in <file>_data (the tiny q4 graphs'
    # tensors are all below ONNX's 1 KB threshold for external data, so some stay inline)
    js = json.loads((out / "config.json").read_text())["transformers.js_config"]
    data = {f.name.removesuffix("_data"): 1 for f in (out / "onnx").glob("*.onnx_data")}
    assert js["dtype"] == "q4" and js["use_external_data_format"] == data and len(data) >= 3
    assert r.report["gate"]["passed"] and r.report["parity"]["variants"]["fp32"]["greedy_agreement"] == 1.0
    ops = {n.op_type for n in onnx.load(str(out / "onnx" / "decoder_model_merged_q4.onnx")).graph.node}
    assert "MatMulNBits" in ops


# ----------------------------------------------------------------------------------- settings, paths


def test_settings_come_from_the_recipe(tmp_path, onnx_student_dir, recipe_dict):
    from lsd_edge.recipe.load import parse_recipe

    folder = tmp_path / "student"
    shutil.copytree(onnx_student_dir, folder)
    recipe_dict["export"] = {"quantize": "int4", "target": "cuda", "parity_samples": 3}
    (folder / "recipe.toml").write_text(parse_recipe(recipe_dict).to_toml())
    s = ExportSettings.from_model_dir(folder)
    assert (s.quantize, s.target, s.parity_samples, s.max_new_tokens) == ("int4", "cuda", 3, 3)
    assert s.data is None and "eval data" in s.note  # the recipe's data was never generated here
    s = ExportSettings.from_model_dir(folder, quantize="fp16", data=tmp_path / "x.json")
    assert s.quantize == "fp16" and s.data == tmp_path / "x.json" and s.note is None
    with pytest.raises(ExportError, match="quantize 'int3'"):
        ExportSettings.from_model_dir(folder, quantize="int3")


def test_settings_use_the_recipes_eval_data_when_it_is_there(
    tmp_path, onnx_student_dir, recipe_dict, shapes_dir
):
    from lsd_edge.recipe.load import parse_recipe

    folder = tmp_path / "student"
    shutil.copytree(onnx_student_dir, folder)
    recipe_dict["data"]["root"] = str(shapes_dir)
    (folder / "recipe.toml").write_text(parse_recipe(recipe_dict).to_toml())
    s = ExportSettings.from_model_dir(folder)
    assert (s.data, s.images, s.note) == (shapes_dir / "eval.json", shapes_dir / "images", None)
    s = ExportSettings.from_model_dir(folder, data=tmp_path / "mine.json")
    assert s.data == tmp_path / "mine.json" and s.images is None  # not the recipe's image folder


def _fake_run(root: Path, name: str, student_src: Path) -> Path:
    run_dir = root / name
    shutil.copytree(student_src, run_dir / "student")
    (run_dir / "report.json").write_text("{}")
    return run_dir


def test_latest_student_and_default_output(tmp_path, onnx_student_dir):
    with pytest.raises(ExportError, match="no finished run"):
        latest_student(tmp_path / "runs")
    old = _fake_run(tmp_path / "runs", "old", onnx_student_dir)
    new = _fake_run(tmp_path / "runs", "new", onnx_student_dir)
    (tmp_path / "runs" / "unfinished" / "student").mkdir(parents=True)
    t = time.time()
    os.utime(old / "report.json", (t, t))
    os.utime(new / "report.json", (t - 100, t - 100))
    assert latest_student(tmp_path / "runs") == old / "student"
    assert default_output(old / "student") == old / "onnx"
    assert default_output(tmp_path / "my-model") == tmp_path / "my-model-onnx"


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_bare_export_picks_the_latest_run(
    tmp_path, monkeypatch, capsys, onnx_dir, onnx_student_dir, shapes_dir
):
    monkeypatch.setattr("lsd_edge.export.onnx.pipeline.write_graphs", _reuse_graphs(onnx_dir))
    run_dir = _fake_run(tmp_path / "runs", "tiny", onnx_student_dir)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(
        monkeypatch,
        capsys,
        "export",
        "--int8",
        "--data",
        str(shapes_dir / "eval.json"),
        "--samples",
        "2",
        "--eval-samples",
        "4",
    )
    assert code == 0, err
    assert "most recent run" in out and "runs/tiny/student" in out
    assert "parity gate passed" in out and "tok/s ONNX int8" in out and "decoder_model_merged" in out
    r = _report(run_dir / "onnx")
    assert r["picked_latest_run"] and r["parity"]["accuracy_samples"] == 4


@pytest.mark.parametrize(
    "args,needle",
    [
        (["export", "no/such/dir"], "no such model folder"),
        (["export", "STUDENT", "--int8", "--int4"], "pick one of"),
        (["export", "STUDENT", "--target", "tpu"], "choose cpu or cuda"),
        (["export", "STUDENT", "--data", "nope.json"], "no such eval data file"),
        (["export"], "no finished run"),
    ],
)
def test_cli_bad_input_isone_red_line(tmp_path, monkeypatch, capsys, onnx_student_dir, args, needle):
    monkeypatch.chdir(tmp_path)
    args = [str(onnx_student_dir) if a == "STUDENT" else a for a in args]
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 1
    assert needle in one_red_line(err)


@pytest.mark.slow
def test_llava15_style_model_exports(tmp_path, processor, shapes_dir):
    """CLIP vision (CLS dropped, second-to-last layer, shortest-edge resize + center crop) and a Llama LLM."""
    from PIL import Image
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from lsd_edge.models.load import save_model
    from lsd_edge.models.tokens import num_image_tokens
    from lsd_edge.runtime.onnx.runner import OnnxRunner

    ip = CLIPImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, do_center_crop=True
    )
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=processor.tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=processor.chat_template,
        image_token="<image>",
    )
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(proc.tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        image_token_index=proc.image_token_id,
        image_seq_length=num_image_tokens(proc),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    save_model(LlavaForConditionalGeneration(cfg), proc, tmp_path / "llava15")
    r = export(tmp_path / "llava15", tmp_path / "onnx", onnx_settings(shapes_dir))
    assert r.report["gate"]["passed"] and r.report["parity"]["variants"]["fp32"]["vision_max_rel_diff"] < 1e-5
    runner = OnnxRunner(r.output)
    # the export's processor counts what the vision encoder graph returns (CLS already dropped), as
    # transformers.js counts: patches + num_additional_image_tokens
    pc = json.loads((r.output / "processor_config.json").read_text())
    assert (pc["vision_feature_select_strategy"], pc["num_additional_image_tokens"]) == ("full", 0)
    assert runner.n_image_tokens == 4 and num_image_tokens(LlavaProcessor.from_pretrained(r.output)) == 4
    rng = np.random.default_rng(0)
    for shape in [(37, 53, 3), (64, 20, 3), (10, 12, 3)]:  # wide, tall, upscaled
        im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        want = proc.image_processor(images=[im], return_tensors="pt")["pixel_values"].numpy()
        assert np.array_equal(runner.pixel_values(im), want)
