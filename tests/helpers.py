"""What several test modules share: the repository root, a tiny recipe, export settings for tests,
and running the CLI in-process."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lsd_edge.cli.main import main
from lsd_edge.export.onnx.pipeline import ExportSettings

REPO = Path(__file__).resolve().parents[1]

TINY_VISION = {
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 64,
    "patch_size": 8,
    "image_size": 16,
}


def tiny_llm_folder(folder: Path, tokenizer, tie_word_embeddings: bool = False):
    """A one-layer Qwen2 LLM over `tokenizer`, saved with it to `folder` as a `student.llm`; returned."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(cfg)
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return llm


def tiny_recipe_dict(data_root: str, output_dir: str) -> dict:
    """A recipe small enough to run end to end in seconds."""
    return {
        "run": {"name": "test", "output_dir": output_dir, "seed": 0, "checkpoint_every": 2},
        "data": {
            "root": data_root,
            "max_length": 64,
            "shapes": {"seed": 0, "n_train": 32, "n_eval": 8, "image_size": 16, "questions_per_image": 2},
            "pretrain": {"path": "pretrain.json", "images": "images"},
            "instruct": {"path": "instruct.json", "images": "images"},
            "eval": {"path": "eval.json", "images": "images"},
        },
        "teacher": {
            "tiny": {
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 2,
                "num_kv_heads": 1,
                "intermediate_size": 64,
                "vision": dict(TINY_VISION),
            },
            "stages": [
                {
                    "name": "pt",
                    "kind": "pt",
                    "trainable": ["vision", "projector", "llm"],
                    "lr": 3e-3,
                    "max_steps": 3,
                    "batch_size": 8,
                },
                {
                    "name": "sft",
                    "kind": "sft",
                    "trainable": ["vision", "projector", "llm"],
                    "lr": 3e-3,
                    "max_steps": 3,
                    "batch_size": 8,
                },
            ],
        },
        "student": {
            "tiny": {
                "hidden_size": 16,
                "num_layers": 1,
                "num_heads": 2,
                "num_kv_heads": 1,
                "intermediate_size": 32,
                "vision": "teacher",
            }
        },
        "stages": [
            {
                "name": "dpt",
                "kind": "dpt",
                "trainable": ["projector", "llm"],
                "lr": 3e-3,
                "max_steps": 3,
                "batch_size": 8,
            },
            {"name": "sft", "kind": "sft", "lr": 3e-3, "max_steps": 3, "batch_size": 8},
            {"name": "dft", "kind": "dft", "lr": 3e-3, "max_steps": 4, "batch_size": 8, "grad_accum": 2},
        ],
        "eval": {"max_new_tokens": 3, "batch_size": 16},
    }


def lively_student(out: Path, seed: int = 3) -> Path:
    """A tiny student saved to `out` whose LLM weights are drawn at 2/sqrt(fan-in), not at the
    initializer's 0.02: untrained, yet its greedy answers differ from question to question, so a
    runtime that gets a token wrong shows it. Built over the ShapesVQA vocabulary, with a head size
    (16) that onnxruntime-genai's model builder takes. Another `seed` draws another such model."""
    import torch

    from lsd_edge.data.shapes import vocabulary
    from lsd_edge.models.build import build_tiny_model, build_tiny_processor
    from lsd_edge.models.load import save_model
    from lsd_edge.recipe.schema import TinyConfig, VisionSize

    proc = build_tiny_processor(VisionSize(**TINY_VISION), vocabulary())
    size = dict(num_layers=2, num_heads=4, num_kv_heads=2)
    teacher = build_tiny_model(
        TinyConfig(hidden_size=32, intermediate_size=64, vision=TINY_VISION, **size), proc, seed=0
    )
    student = build_tiny_model(
        TinyConfig(
            hidden_size=96, intermediate_size=256, vision="teacher", num_layers=2, num_heads=6, num_kv_heads=2
        ),
        proc,
        vision_from=teacher,
        seed=2,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if p.ndim == 2 and "vision_tower" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2 / p.shape[1] ** 0.5)
    save_model(student, proc, out)
    return out


# lively_student amplifies quantization error (int8 logits 0.2 off PyTorch's, int4 1.0, most greedy
# answers different: scripts/gate_bounds.py), so its quantized exports are gated on fp32 and
# accuracy only; the tests that use them compare runtimes on the same graphs, not with PyTorch.
LIVELY_VARIANT_BOUNDS = dict(max_variant_rel_logit_diff=10.0, min_variant_greedy_agreement=0.0)


def bpe_llava(teacher: Path, out: Path, layers: int = 2, lively: bool = True) -> Path:
    """A LLaVA over the stand-in teacher's byte-level BPE tokenizer (tests/realshape.py), as GGUF can
    carry it: SigLIP read at layer -2 with 'full' selection, a tied Qwen2 64 wide (so Q8_0's 32-value
    blocks fit its rows). `lively`: weights drawn at 2/sqrt(fan-in), so that greedy answers depend on
    the question and the image (the GGUF tests' student, 2 layers); else transformers' initialisation
    (with 4 layers: recipes/tiny.toml's [student.tiny] size, untrained)."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from lsd_edge.models.archs import llava_config, qwen2_config, siglip_config
    from lsd_edge.models.load import save_model

    from .realshape import IMAGE_SIZE

    processor = LlavaProcessor.from_pretrained(teacher)
    tok = processor.tokenizer
    config = llava_config(
        siglip_config(32, 64, 3, 2, IMAGE_SIZE),
        qwen2_config(320, 64, layers, 4, 2, tied=True, intermediate=128),
        tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lively and p.ndim == 2 and "vision_tower" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2 / p.shape[1] ** 0.5)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    save_model(model, processor, out)
    return out


# bpe_llava's lively student amplifies Q8_0's error (logits 0.17-0.30 off PyTorch's, 71-73% of each
# greedy answer kept, one first token in 16 flipped: scripts/gate_bounds.py --gguf), so its q8_0
# exports are gated on about twice those figures instead of q8_0's measured bounds.
LIVELY_GGUF_BOUNDS = dict(max_rel_logit_diff=0.6, min_greedy_agreement=0.35)


def scored_here(recipe, model_dir: Path) -> float:
    """The eval-split accuracy of a saved model, scored in the test as a run scores it (the recipe's
    [eval] settings and data): what a run reports for that folder must equal it."""
    from lsd_edge.evaluate.greedy import eval_split
    from lsd_edge.models.load import load_llava
    from lsd_edge.progress import QuietReporter

    model, processor = load_llava(str(model_dir))
    return eval_split(recipe, model, processor, "test", QuietReporter())["accuracy"]


def write_records(tmp_path: Path, records: list, name: str = "d.json") -> Path:
    """LLaVA-format records written as a JSON list (or JSONL when `name` ends with .jsonl)."""
    p = tmp_path / name
    if name.endswith(".jsonl"):
        p.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        p.write_text(json.dumps(records))
    return p


def onnx_settings(shapes_dir: Path, **kw):
    """Export settings small enough for tests: few parity samples, a short speed check."""
    base = dict(
        quantize="int8",
        data=shapes_dir / "eval.json",
        images=shapes_dir / "images",
        parity_samples=4,
        max_new_tokens=4,
        bench_tokens=8,
        bench_repeats=1,
    )
    return ExportSettings(**{**base, **kw})


def run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["lsd-edge", *args])
    # set, not deleted: monkeypatch then restores the variable's absence after the test, whatever the
    # command did to it ("0" reads as unset: only "1" shows tracebacks)
    monkeypatch.setenv("LSD_EDGE_DEBUG", "0")
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_red_line(err: str) -> str:
    """The CLI's error output, checked to be exactly one line starting `error:` (no traceback, no
    second line, no wrapped tail), and returned."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), f"not one red line:\n{err}"
    return lines[0]


def red_line_after_progress(err: str) -> str:
    """The CLI's error output after a command's progress lines (bars, "loading ..." notes on stderr):
    its last line, checked to be its only `error:` line and whole (a wrapped or second line would come
    last), with no traceback."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error:"), f"no red line last:\n{err}"
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


def distill_red_line(monkeypatch, capsys, recipe_dict: dict, tmp_path: Path) -> str:
    """`lsd-edge distill` of `recipe_dict` (written to tmp_path/r.toml) that fails: exit 1 and its one
    red line after the progress lines, returned."""
    from lsd_edge.recipe.toml import dumps_toml

    path = tmp_path / "r.toml"
    path.write_text(dumps_toml(recipe_dict))
    code, _, err = run(monkeypatch, capsys, "distill", str(path))
    assert code == 1
    return red_line_after_progress(err)


def require_dev(name: str):
    """Import a dev dependency (pyproject's [dev] extra): a test that needs it skips without it, and
    fails instead under LSD_EDGE_REQUIRE_DEV=1 (CI), where a broken import must not pass as a skip."""
    import importlib

    import pytest

    try:
        return importlib.import_module(name)
    except ImportError as e:
        if os.environ.get("LSD_EDGE_REQUIRE_DEV") == "1":
            pytest.fail(f"LSD_EDGE_REQUIRE_DEV=1 but {name} does not import: {e}")
        pytest.skip(f"{name} does not import ({e}); pip install -e '.[dev]'")
