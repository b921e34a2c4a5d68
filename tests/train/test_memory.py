"""Peak-memory estimates: checked against measured peaks, and against the shipped recipes' headers.

Measurements run real steps (lsd_edge.train.loss_terms, backward, AdamW) on random-weight models
built from config files, so only `config.json` folders are written here.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from lsd_edge.models.info import ModelShape
from lsd_edge.recipe.load import load_recipe
from lsd_edge.train.measure import measure_step
from lsd_edge.train.memory import GIB, estimate_recipe, recipe_configs

from ..helpers import REPO, run
from ..realshape import write_real_configs, write_small_configs


def _recipe(folder, *sets):
    base = [f"teacher.path={folder}/teacher", f"student.llm={folder}/llm", "run.device=cpu"]
    for i in range(3):
        base += [f"stages[{i}].batch_size=2", f"stages[{i}].grad_accum=2"]
    return load_recipe(REPO / "recipes" / "qwen0.5b.toml", base + ["data.max_length=96", *sets])


@pytest.mark.parametrize(
    "stage,sets",
    [
        # DFT: fp32 teacher, no checkpointing
        (
            2,
            [
                "student.gradient_checkpointing=false",
                "stages[2].gradient_checkpointing=false",
                "teacher.dtype=float32",
            ],
        ),
        (1, []),  # SFT: no teacher terms, checkpointed student
        (2, []),  # DFT as the recipe has it: bf16 teacher, checkpointed student
        (0, []),  # DPT: projector only, gradients through the frozen LLM
        (2, ["stages[2].loss.chunk_size=16"]),  # DFT with chunked logit losses
    ],
)
def test_estimate_matches_measured_peak_on_cpu(tmp_path, stage, sets):
    folder = write_small_configs(tmp_path, 128, 192, 2048)
    recipe = _recipe(folder, *sets)
    est = estimate_recipe(recipe)[stage]
    assert est.device == "cpu" and est.seq_len == 96
    measured = measure_step(recipe, recipe.stages[stage], device=torch.device("cpu"), steps=2)
    ratio = est.total / measured.peak_bytes
    assert 0.85 < ratio < 1.2, (est.as_dict(), measured.peak_bytes)


def test_estimate_follows_chunked_losses_and_a_teacher_cache(tmp_path):
    """The chunked path keeps an lm_head-sized gradient per output, so it pays off at real batch sizes:
    8 samples of 512 tokens here (4,096 positions)."""
    folder = write_small_configs(tmp_path, 192, 256, 4096)
    size = ["stages[2].batch_size=8", "data.max_length=512", "stages[2].loss.chunk_size=0"]
    plain = estimate_recipe(_recipe(folder, *size))[2]
    chunked = estimate_recipe(_recipe(folder, *size, "stages[2].loss.chunk_size=256"))[2]
    cached = estimate_recipe(_recipe(folder, *size, "stages[2].teacher_cache=auto"))[2]
    assert chunked.logits < plain.logits / 4 and chunked.teacher_weights == plain.teacher_weights > 0
    assert cached.teacher_weights == cached.teacher_forward == 0 < plain.teacher_forward
    assert cached.logits < plain.logits and cached.activations == plain.activations


def test_estimate_parts_follow_the_recipe(tmp_path):
    folder = write_small_configs(tmp_path, 192, 256, 4096)
    dpt, sft, dft = estimate_recipe(_recipe(folder))
    plain = estimate_recipe(_recipe(folder, "student.gradient_checkpointing=false"))[1]
    assert dpt.gradients < sft.gradients / 20, "DPT trains the projector only"
    assert sft.teacher_forward == 0 < dft.teacher_forward and sft.logits < dft.logits
    assert sft.activations < plain.activations, "checkpointing keeps less"
    assert dft.optimizer == 2 * dft.gradients
    teacher, student = (ModelShape.of(c) for c in recipe_configs(_recipe(folder)))
    assert student.image_tokens == teacher.image_tokens == 49
    assert dft.teacher_weights == 2 * teacher.params["total"], "bf16 teacher"
    assert dft.student_weights == 4 * student.params["total"], "fp32 student"


@pytest.fixture(scope="module")
def real_configs(tmp_path_factory):
    return write_real_configs(tmp_path_factory.mktemp("real-configs"))


@pytest.mark.parametrize("name,llm", [("qwen0.5b", "Qwen1.5-0.5B-Chat"), ("qwen1.8b", "Qwen1.5-1.8B-Chat")])
def test_shipped_recipe_headers_state_the_estimate(real_configs, name, llm):
    """The header's figures are what the estimator gives for the real models (config sizes only),
    and every stage fits an 80 GB GPU with room for the CUDA context and fragmentation."""
    path = REPO / "recipes" / f"{name}.toml"
    recipe = load_recipe(
        path,
        [f"teacher.path={real_configs['llava-interleave-qwen-7b-hf']}", f"student.llm={real_configs[llm]}"],
    )
    rows = estimate_recipe(recipe)
    stated = dict(re.findall(r"(DPT|SFT|DFT) ([\d.]+) GiB", path.read_text()))
    assert stated == {r.stage.upper(): f"{r.total / GIB:.1f}" for r in rows}
    assert all(r.total < 70 * GIB for r in rows)
    # the global batches of LLaVA-KD: 256 for DPT, 128 for SFT and DFT
    assert [s.batch_size * s.grad_accum for s in recipe.stages] == [256, 128, 128]


def _cli(monkeypatch, capsys, *args):
    code, out, err = run(monkeypatch, capsys, *args)
    return code, out + err


def test_validate_prints_the_estimate(monkeypatch, capsys, real_configs):
    recipe = str(REPO / "recipes" / "qwen1.8b.toml")
    sets = [
        "--set",
        f"teacher.path={real_configs['llava-interleave-qwen-7b-hf']}",
        "--set",
        f"student.llm={real_configs['Qwen1.5-1.8B-Chat']}",
    ]
    monkeypatch.setenv("COLUMNS", "160")
    code, out = _cli(monkeypatch, capsys, "validate", recipe, *sets)
    assert code == 0 and "estimated peak memory per process, GiB (CUDA, bf16 autocast)" in out
    assert re.search(r"dft\*\s+2\s+8\.35\s+6\.87\s+13\.73\s+15\.16", out), out
    code, out = _cli(monkeypatch, capsys, "validate", recipe, "--no-memory", *sets)
    assert code == 0 and "estimated peak" not in out


def test_validate_without_the_hub_still_validates(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out = _cli(monkeypatch, capsys, "validate", str(REPO / "recipes" / "qwen0.5b.toml"))
    assert code == 0 and "valid" in out
    assert "memory estimate unavailable: cannot read the config of teacher.path" in out


def test_memory_command_measures(monkeypatch, capsys, tmp_path):
    folder = write_small_configs(tmp_path, 64, 96, 1024)
    out_json = tmp_path / "m.json"
    args = ["memory", str(REPO / "recipes" / "qwen0.5b.toml"), "--measure", "--steps", "2", "--seq-len", "64"]
    sets = [
        f"teacher.path={folder}/teacher",
        f"student.llm={folder}/llm",
        "run.device=cpu",
        "teacher.dtype=float32",
    ]
    sets += ["stages[2].batch_size=1", "stages[2].grad_accum=1"]
    code, out = _cli(
        monkeypatch, capsys, *args, "--json", str(out_json), *[a for s in sets for a in ("--set", s)]
    )
    assert code == 0, out
    data = json.loads(out_json.read_text())
    assert [r["stage"] for r in data["estimate"]] == ["dpt", "sft", "dft"]
    m = data["measured"]
    assert m["stage"] == "dft" and m["peak_bytes"] > 0 and m["tokens_per_s"] > 0 and m["mfu"] is None
    code, out = _cli(monkeypatch, capsys, *args, "--stage", "nope", *[a for s in sets for a in ("--set", s)])
    assert code == 1 and "no such stage" in out


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [1, 2])
def test_estimate_matches_measured_peak_on_cuda(tmp_path, stage):
    """bf16 autocast, bf16 teacher, checkpointed student: the estimate against max_memory_allocated."""
    folder = write_small_configs(tmp_path, 512, 768, 32000)
    recipe = _recipe(folder, "run.device=cuda", "data.max_length=512")
    est = estimate_recipe(recipe)[stage]
    measured = measure_step(recipe, recipe.stages[stage], device=torch.device("cuda"), steps=2)
    assert 0.75 < est.total / measured.peak_bytes < 1.35, (est.as_dict(), measured.as_dict())


def test_an_on_policy_stage_counts_its_generation(tmp_path):
    """The student's answers are written one at a time: one sequence's KV cache over the prompt and
    max_new_tokens, which grows with max_new_tokens, and only a stage with on_policy holds it."""
    folder = write_small_configs(tmp_path, 192, 256, 4096)
    plain = estimate_recipe(_recipe(folder))[2]
    short, long = (
        estimate_recipe(_recipe(folder, f"stages[2].on_policy.max_new_tokens={n}"))[2] for n in (16, 256)
    )
    assert plain.generation == 0 < short.generation < long.generation
    assert long.total - plain.total == long.generation and short.logits == plain.logits
    _, student = (ModelShape.of(c) for c in recipe_configs(_recipe(folder)))
    per_position = 4 * 2 * student.layers * student.kv_hidden  # fp32 keys and values, every layer
    assert long.generation - short.generation == per_position * (256 - 16)
