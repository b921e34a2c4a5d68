"""The shipped real recipes, run end to end on real-shaped stand-ins with `--set` overrides only.

The stand-ins (tests/realshape.py) carry the real checkpoints' settings at toy sizes, so every code
path of `recipes/qwen0.5b.toml` and `recipes/qwen1.8b.toml` runs here: loading a LLaVA folder in
bf16, composing the student from the teacher's vision tower and an LLM folder (tied and untied,
padded rows differing from the teacher's), activation checkpointing, the three stages, evaluation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from lsd_edge.data.dataset import BatchLoader, LlavaDataset
from lsd_edge.distill.objective import Counts, loss_terms
from lsd_edge.distill.teacher import OnlineTeacher
from lsd_edge.errors import DataError
from lsd_edge.models.build import compose_llava
from lsd_edge.models.groups import compile_layers, set_activation_checkpointing, set_trainable
from lsd_edge.models.load import load_llava
from lsd_edge.models.tokens import check_tokenizers
from lsd_edge.recipe.load import load_recipe
from lsd_edge.recipe.schema import ModelConfig
from lsd_edge.train.pipeline import distill

from ..helpers import REPO, scored_here, tiny_llm_folder

REAL = {"qwen0.5b": "llm_tied", "qwen1.8b": "llm_untied"}


def real_overrides(standins: dict[str, Path], name: str, out: Path) -> list[str]:
    """Paths to the stand-ins and toy step counts; everything else is the shipped recipe's."""
    sets = [
        f"data.root={standins['data']}",
        f"teacher.path={standins['teacher']}",
        f"student.llm={standins[REAL[name]]}",
        f"run.output_dir={out}",
        "run.device=cpu",
        "run.checkpoint_every=1",
        "eval.max_samples=4",
        "eval.batch_size=4",
        "eval.max_new_tokens=3",
    ]
    for i in range(3):
        sets += [f"stages[{i}].max_steps=2", f"stages[{i}].batch_size=2", f"stages[{i}].grad_accum=2"]
    return sets


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_recipe_runs_on_standins(name, standins, tmp_path, monkeypatch):
    from lsd_edge.train import loop, step
    from lsd_edge.train.backends import base

    seen = {"checkpointing": [], "teacher_dtype": set()}
    real_ckpt, real_terms = loop.set_activation_checkpointing, base.loss_terms

    def spy_ckpt(model, on):
        seen["checkpointing"].append(on)
        real_ckpt(model, on)

    def spy_terms(student, teacher, *a, **kw):
        if teacher is not None:
            seen["teacher_dtype"].add(teacher.model.dtype)
        return real_terms(student, teacher, *a, **kw)

    monkeypatch.setattr(loop, "set_activation_checkpointing", spy_ckpt)  # off after a stage
    monkeypatch.setattr(step, "set_activation_checkpointing", spy_ckpt)  # on as a stage prepares
    monkeypatch.setattr(base, "loss_terms", spy_terms)
    recipe = load_recipe(REPO / "recipes" / f"{name}.toml", real_overrides(standins, name, tmp_path / "run"))
    assert recipe.data.max_length == 2048 and recipe.teacher.dtype == "bfloat16"
    report = distill(recipe)

    assert [s["name"] for s in report["stages"]] == ["dpt", "sft", "dft"]
    for s in report["stages"]:  # each stage's figure is its saved model's, scored here
        assert s["accuracy"] == scored_here(recipe, tmp_path / "run" / s["name"]), s["name"]
    assert seen["checkpointing"] == [True, False] * 3, "the recipe's student checkpoints every stage"
    assert seen["teacher_dtype"] == {torch.bfloat16}, "the recipe's bf16 teacher, on CPU too"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    dft = [r for r in log if r["stage"] == "dft"]
    assert len(dft) == 2 and all(
        torch.isfinite(torch.tensor(r[t]))
        for r in dft
        for t in ("ce", "response_kl", "visual_kl", "relation")
    )

    student, proc = load_llava(str(tmp_path / "run" / "student"))
    teacher, t_proc = load_llava(str(standins["teacher"]))
    llm_cfg = json.loads((standins[REAL[name]] / "config.json").read_text())
    cfg = student.config
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "full"
    assert cfg.text_config.vocab_size == llm_cfg["vocab_size"] != teacher.config.text_config.vocab_size
    tied = student.lm_head.weight.data_ptr() == student.model.language_model.embed_tokens.weight.data_ptr()
    assert tied == llm_cfg["tie_word_embeddings"]
    # the shared vision tower stayed frozen through all stages (a bf16 teacher's, in fp32)
    for (n, p), (_, q) in zip(
        student.model.vision_tower.named_parameters(),
        teacher.model.vision_tower.named_parameters(),
        strict=True,
    ):
        assert torch.equal(p, q.to(torch.bfloat16).float()), n
    assert proc.tokenizer.get_vocab() == t_proc.tokenizer.get_vocab()


def test_real_recipe_stops_before_training_on_missing_data(standins, tmp_path):
    sets = real_overrides(standins, "qwen0.5b", tmp_path / "run") + ["data.eval.path=eval/missing.json"]
    recipe = load_recipe(REPO / "recipes" / "qwen0.5b.toml", sets)
    with pytest.raises(DataError, match=r"data\.eval\.path: .*missing\.json is not a file"):
        distill(recipe)
    assert not (tmp_path / "run" / "dpt").exists(), "nothing trained"


@pytest.mark.parametrize("which", ["llm_tied", "llm_untied"])
def test_compose_keeps_llm_weights_and_ties(which, standins):
    from transformers import AutoModelForCausalLM

    teacher, processor = load_llava(str(standins["teacher"]), dtype="bfloat16")
    llm = AutoModelForCausalLM.from_pretrained(standins[which])
    student, proc = compose_llava(ModelConfig(llm=str(standins[which]), vision="teacher"), teacher, processor)
    assert proc is processor
    check_tokenizers(processor.tokenizer, proc.tokenizer)
    img = processor.image_token_id
    assert img < student.config.text_config.vocab_size == llm.config.vocab_size
    emb = student.model.language_model.embed_tokens.weight
    assert torch.equal(emb, llm.model.embed_tokens.weight)
    if llm.config.tie_word_embeddings:
        assert student.lm_head.weight is emb
    else:
        assert student.lm_head.weight is not emb and torch.equal(student.lm_head.weight, llm.lm_head.weight)
    assert student.model.vision_tower.embeddings.patch_embedding.weight.dtype == torch.float32


@pytest.mark.parametrize("tied", [True, False])
def test_compose_grows_an_llm_without_room_for_the_image_token(tied, standins, tmp_path):
    """An LLM whose embedding rows end at its tokenizer: the image token needs one more row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..realshape import build_llm

    tok = AutoTokenizer.from_pretrained(standins["llm_tied"])
    folder = build_llm(tmp_path / "llm", tok, tied=tied, pad_to=1)
    small = AutoModelForCausalLM.from_pretrained(folder)
    teacher, processor = load_llava(str(standins["teacher"]))
    student, _ = compose_llava(ModelConfig(llm=str(folder), vision="teacher"), teacher, processor)
    assert student.config.text_config.vocab_size == processor.image_token_id + 1 == len(tok) + 1
    rows = len(tok)
    assert torch.equal(
        student.model.language_model.embed_tokens.weight[:rows], small.model.embed_tokens.weight
    )
    assert torch.equal(student.lm_head.weight[:rows], small.lm_head.weight)
    assert (student.lm_head.weight is student.model.language_model.embed_tokens.weight) == tied


def _composed(standins, which="llm_untied", teacher_dtype="bfloat16"):
    teacher, processor = load_llava(str(standins["teacher"]), dtype=teacher_dtype)
    teacher.requires_grad_(False).eval()
    student, _ = compose_llava(
        ModelConfig(llm=str(standins[which]), vision="teacher"), teacher, processor, seed=1
    )
    ds = LlavaDataset(
        standins["data"] / "llava_v1_5_mix665k.json", standins["data"], processor, max_length=2048
    )
    batch = BatchLoader(ds, processor.tokenizer.pad_token_id).batch([0, 1, 2, len(ds) - 1])
    return teacher, student, processor, batch


def _stage(kind="dft", trainable=("projector", "llm")):
    from lsd_edge.recipe.schema import StageConfig

    return StageConfig.model_validate(
        dict(name="x", kind=kind, trainable=list(trainable), max_steps=1, batch_size=4)
    )


@pytest.mark.parametrize("trainable", [("projector",), ("projector", "llm")])
def test_activation_checkpointing_gives_the_same_gradients(trainable, standins):
    """Checkpointed layers recompute in backward; the gradients (also the projector's, through a
    frozen LLM) are the ones of the plain forward."""
    teacher, student, processor, batch = _composed(standins, teacher_dtype="float32")
    stage = _stage(trainable=trainable)
    counts = Counts.of([batch], student.config.image_seq_length)
    grads = []
    for on in (False, True):
        model = copy.deepcopy(student)
        set_trainable(model, stage.trainable)
        model.train()
        set_activation_checkpointing(model, on)
        terms = loss_terms(
            model, OnlineTeacher(teacher), batch, stage, counts, len(processor.tokenizer), None
        )
        sum(terms.values()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        set_activation_checkpointing(model, False)
        assert not model.model.language_model.gradient_checkpointing
    assert grads[0].keys() == grads[1].keys() and any("multi_modal_projector" in n for n in grads[0])
    for n in grads[0]:
        assert grads[0][n] is not None and torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_bf16_teacher_on_cpu_matches_fp32_teacher(standins):
    """A bf16 teacher's terms are the fp32 teacher's to bf16 precision; its logits are soft-maxed in
    fp32 and it never gets gradients."""
    t32, student, processor, batch = _composed(standins, teacher_dtype="float32")
    t16, _ = load_llava(str(standins["teacher"]), dtype="bfloat16")
    t16.requires_grad_(False).eval()
    assert {p.dtype for p in t16.parameters()} == {torch.bfloat16}
    stage = _stage()
    counts = Counts.of([batch], student.config.image_seq_length)
    vocab = len(processor.tokenizer)
    a = loss_terms(student, OnlineTeacher(t32), batch, stage, counts, vocab, None)
    b = loss_terms(student, OnlineTeacher(t16), batch, stage, counts, vocab, None)
    assert all(v.dtype == torch.float32 for v in b.values())
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0.05, atol=2e-3), (k, a[k], b[k])
    sum(b.values()).backward()
    assert all(p.grad is None for p in t16.parameters())


def test_compile_keeps_names_and_outputs(standins):
    """run.compile compiles each decoder layer in place: checkpoints keep their parameter names."""
    _, student, processor, batch = _composed(standins)
    before = student.state_dict().keys()
    with torch.no_grad():
        ref = student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    compile_layers(student, backend="eager")
    assert student.state_dict().keys() == before
    with torch.no_grad():
        out = student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    assert torch.allclose(ref, out, atol=1e-6)


@pytest.mark.gpu
def test_real_recipe_on_cuda_with_compile(standins, tmp_path):
    """On CUDA: bf16 autocast, bf16 teacher, compiled checkpointed student, end to end."""
    sets = [s for s in real_overrides(standins, "qwen0.5b", tmp_path / "run") if s != "run.device=cpu"]
    recipe = load_recipe(REPO / "recipes" / "qwen0.5b.toml", sets + ["run.device=cuda", "run.compile=true"])
    report = distill(recipe)
    assert report["device"].startswith("cuda")
    assert all(torch.isfinite(torch.tensor(v)) for s in report["stages"] for v in s["last_losses"].values())


def test_the_edge_recipe_runs_on_standins(standins, tmp_path):
    """recipes/qwen0.5b-edge.toml: the teacher's tower at a lower resolution (14 px here, a 1 x 1 grid,
    against the stand-in teacher's 30 px, 2 x 2), distilled across the two grids; DPT trains the tower
    with the vision-tower term, and the student saves as a LLaVA folder that says what it sees."""
    sets = real_overrides(standins, "qwen0.5b", tmp_path / "run") + ["student.image_size=14"]
    recipe = load_recipe(REPO / "recipes" / "qwen0.5b-edge.toml", sets)
    assert recipe.stages[0].loss.weight("vision") > 0 and "vision" in recipe.stages[0].trainable
    report = distill(recipe)
    assert [s["name"] for s in report["stages"]] == ["dpt", "sft", "dft"]
    assert report["stages"][-1]["accuracy"] == scored_here(recipe, tmp_path / "run" / "dft")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    dpt = [r for r in log if r["stage"] == "dpt"]
    assert dpt and all(torch.isfinite(torch.tensor(r["vision"])) and r["vision"] > 0 for r in dpt)
    student, proc = load_llava(str(tmp_path / "run" / "student"))
    teacher, _ = load_llava(str(standins["teacher"]))
    assert student.config.vision_config.image_size == 14 and proc.image_processor.size["height"] == 14
    moved = [
        n
        for (n, p), (_, q) in zip(
            student.model.vision_tower.named_parameters(),
            teacher.model.vision_tower.named_parameters(),
            strict=True,
        )
        if p.shape == q.shape and not torch.equal(p, q.to(torch.bfloat16).float())
    ]
    assert moved, "DPT trained the student's tower"


def test_on_policy_dft_runs_on_the_edge_recipe_s_standins(standins, tmp_path):
    """recipes/qwen0.5b-edge.toml with on_policy in DFT (every micro-batch): the student writes its
    answers with the real chat template and tokenizer, the bf16 teacher scores them on its own view
    (another grid), CE has no labelled answer left, the response KL trains."""
    sets = real_overrides(standins, "qwen0.5b", tmp_path / "run") + [
        "student.image_size=14",
        "stages[2].on_policy.lmbda=1.0",
        "stages[2].on_policy.max_new_tokens=3",
    ]
    recipe = load_recipe(REPO / "recipes" / "qwen0.5b-edge.toml", sets)
    report = distill(recipe)
    assert [s["name"] for s in report["stages"]] == ["dpt", "sft", "dft"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    dft = [r for r in log if r["stage"] == "dft"]
    assert len(dft) == 2 and all(r["own_answers"] > 0 and r["ce"] == 0 for r in dft)
    assert all(torch.isfinite(torch.tensor(r["response_kl"])) and r["response_kl"] > 0 for r in dft)


def test_a_student_llm_with_another_tokenizer_distils_on_the_standins(standins, tmp_path):
    """recipes/qwen0.5b.toml with `student.llm` an LLM of another vocabulary (a word-level tokenizer
    over the data, as SmolLM2 or Llama 3.2 would be under a Qwen teacher): composed, it reads images
    as the teacher does and text in its own tokens, and every stage distils across the two
    vocabularies (ULD on the response and visual logits, answers aligned by their text)."""
    from lsd_edge.data.prepare import corpus_texts, prepare_data
    from lsd_edge.models.bpe import word_tokenizer
    from lsd_edge.progress import QuietReporter

    sets = real_overrides(standins, "qwen0.5b", tmp_path / "run")
    recipe = load_recipe(REPO / "recipes" / "qwen0.5b.toml", sets)
    prepare_data(recipe, QuietReporter())
    words = word_tokenizer(corpus_texts(recipe))
    tiny_llm_folder(tmp_path / "llm", words)
    recipe = load_recipe(REPO / "recipes" / "qwen0.5b.toml", sets + [f"student.llm={tmp_path / 'llm'}"])
    report = distill(recipe)
    assert [s["name"] for s in report["stages"]] == ["dpt", "sft", "dft"]
    student, proc = load_llava(str(tmp_path / "run" / "student"))
    teacher, teacher_proc = load_llava(str(standins["teacher"]))
    assert proc.tokenizer.get_vocab() != teacher_proc.tokenizer.get_vocab()
    assert proc.tokenizer.convert_tokens_to_ids("red") == words.convert_tokens_to_ids("red")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    for stage in ("dpt", "dft"):
        rows = [r for r in log if r["stage"] == stage]
        assert rows and all(r["response_kl"] > 0 and r["visual_kl"] > 0 for r in rows), stage
    assert report["stages"][-1]["accuracy"] == scored_here(recipe, tmp_path / "run" / "dft")
