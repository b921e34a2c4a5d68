"""A student that sees with another visual grid than its teacher (METHOD.md, "edge vision"): the
stages feed the teacher its own view and distil across the two grids, online and from a cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lsd_edge.errors import LsdEdgeError, RecipeError
from lsd_edge.models.build import student_processor
from lsd_edge.recipe.load import parse_recipe
from lsd_edge.train.pipeline import distill
from lsd_edge.train.sight import grid_map, same_grid, teacher_view, visual_grid

from ..helpers import TINY_VISION, scored_here


def _edge(recipe_dict, **loss):
    # the teacher sees 24 px images as 3 x 3 patches of 8 px, the student 16 px ones as 2 x 2: each
    # student cell overlaps four teacher cells in part (not an integer ratio)
    recipe_dict["teacher"]["tiny"]["vision"]["image_size"] = 24
    recipe_dict["student"]["image_size"] = 16
    for st in recipe_dict["stages"]:
        if st["kind"] in ("dpt", "dft"):
            st["loss"] = {"latent": 1.0, **loss}
    return recipe_dict


def test_a_student_on_a_smaller_grid_distils_every_term(recipe_dict):
    """Student 2 x 2 visual tokens, teacher 3 x 3: every distillation term is computed and finite in
    DPT and DFT (the teacher's targets pooled onto the student's grid), and the student evaluates."""
    d = _edge(recipe_dict)
    d["stages"][0]["trainable"] = ["vision", "projector", "llm"]
    d["stages"][0]["loss"]["vision"] = 1.0
    r = parse_recipe(d)
    report = distill(r)
    log = [json.loads(x) for x in (Path(r.run.output_dir) / "log.jsonl").read_text().splitlines()]
    for stage in ("dpt", "dft"):
        rows = [x for x in log if x["stage"] == stage]
        assert rows, stage
        for term in ("ce", "response_kl", "visual_kl", "relation", "latent") + (
            ("vision",) if stage == "dpt" else ()
        ):
            assert all(torch.isfinite(torch.tensor(x[term])) for x in rows), (stage, term)
            assert any(x[term] != 0 for x in rows), (stage, term)
    assert report["student"]["accuracy"] == scored_here(r, Path(r.run.output_dir) / "student")
    cfg = json.loads((Path(r.run.output_dir) / "student" / "config.json").read_text())
    assert cfg["vision_config"]["image_size"] == 16


def test_a_cached_stage_on_a_smaller_grid_matches_the_online_one(recipe_dict, tmp_path):
    """The cache stores the pooled targets (top-k covering the whole vocabulary: exact): DFT from the
    cache logs the losses DFT logs with the teacher online."""
    logs = {}
    for cached in (False, True):
        d = json.loads(json.dumps(recipe_dict))
        d["run"]["output_dir"] = str(tmp_path / f"run-{cached}")
        d = _edge(d)
        d["stages"][2]["loss"]["latent_pairs"] = [["projector", "projector"]]
        d["stages"][2]["trainable"] = ["vision", "projector", "llm"]
        d["stages"][2]["loss"]["vision"] = 0.5
        if cached:
            d["stages"][2]["teacher_cache"] = "auto"
            d["stages"][2]["teacher_cache_top_k"] = 100000
        r = parse_recipe(d)
        distill(r)
        rows = (Path(r.run.output_dir) / "log.jsonl").read_text().splitlines()
        logs[cached] = [json.loads(x) for x in rows if json.loads(x)["stage"] == "dft"]
        if cached:
            manifest = json.loads(
                (Path(r.run.output_dir) / "teacher-cache" / "dft" / "identity.json").read_text()
            )
            assert "student_grid" in json.dumps(manifest)
    for online, cached in zip(logs[False], logs[True], strict=True):
        for term in ("ce", "response_kl", "visual_kl", "relation", "latent", "vision"):
            assert cached[term] == pytest.approx(online[term], rel=2e-4, abs=1e-6), term


def test_grid_and_view_of_two_processors(processor):
    small = student_processor(processor, type("S", (), {"image_size": 8})())
    assert same_grid(processor, processor) and teacher_view(processor, processor) is None
    assert visual_grid(processor, "the teacher") == (2, 2) and visual_grid(small, "the student") == (1, 1)
    view = teacher_view(processor, small)
    assert view is not None and view.n_image_tokens == 4
    g = grid_map(processor, small, temperature=2.0)
    assert g.p.shape == (1, 4) and torch.allclose(g.p, torch.full((1, 4), 0.25)) and g.temperature == 2.0
    assert grid_map(processor, processor, 1.0) is None


def test_a_tower_whose_tokens_are_not_a_grid_is_refused(processor):
    """A CLIP tower read with its CLS token gives one token more than its patches: no grid to pool onto."""
    cls = student_processor(processor, type("S", (), {"image_size": 8})())
    cls.num_additional_image_tokens = 1
    with pytest.raises(RecipeError, match="the student gives 2 visual tokens for a 1x1 patch grid"):
        grid_map(processor, cls, 1.0)


# ------------------------------------------------------------------------ a student with another tokenizer


def _words(recipe_dict, mode="uld"):
    """The recipe's tiny student with a word-level tokenizer of its own, distilled by `mode`."""
    recipe_dict["student"]["tokenizer"] = "word"
    for st in recipe_dict["stages"]:
        if st["kind"] in ("dpt", "dft"):
            st["loss"] = {
                "latent": 1.0,
                "latent_pairs": [["projector", "projector"]],
                "cross_tokenizer": mode,
            }
    return recipe_dict


def _distilled_terms(r) -> dict[str, list[dict]]:
    log = [json.loads(x) for x in (Path(r.run.output_dir) / "log.jsonl").read_text().splitlines()]
    return {st: [x for x in log if x["stage"] == st] for st in ("dpt", "dft")}


@pytest.mark.parametrize("mode", ["uld", "gold"])
def test_a_student_with_another_tokenizer_distils_every_term(recipe_dict, mode):
    """A word-level student under a BPE teacher: every distillation term computed and finite in DPT
    and DFT (ULD or GOLD on the logit terms), the student saved with its own tokenizer and evaluated."""
    d = _words(_edge(recipe_dict) if mode == "gold" else recipe_dict, mode)
    r = parse_recipe(d)
    report = distill(r)
    for stage, rows in _distilled_terms(r).items():
        assert rows, stage
        for term in ("ce", "response_kl", "visual_kl", "relation", "latent"):
            assert all(torch.isfinite(torch.tensor(x[term])) for x in rows), (stage, term)
            assert any(x[term] != 0 for x in rows), (stage, term)
    student = Path(r.run.output_dir) / "student"
    vocab = json.loads((student / "tokenizer.json").read_text())["model"]
    assert vocab["type"] == "WordLevel" and "red" in vocab["vocab"]
    teacher_vocab = json.loads((Path(r.run.output_dir) / "teacher" / "tokenizer.json").read_text())["model"]
    assert teacher_vocab["type"] == "BPE"
    assert report["student"]["accuracy"] == scored_here(r, student)


def _saved_word_student(recipe_dict, out: Path) -> Path:
    """A tiny LLaVA with a word-level processor of its own trained on the recipe's data, saved to `out`."""
    from lsd_edge.data.prepare import corpus_texts, prepare_data
    from lsd_edge.data.shapes import vocabulary
    from lsd_edge.models.build import build_tiny_model, build_tiny_processor, with_own_tokenizer
    from lsd_edge.models.load import save_model
    from lsd_edge.progress import QuietReporter
    from lsd_edge.recipe.schema import TinyConfig, VisionSize

    r = parse_recipe(recipe_dict)
    prepare_data(r, QuietReporter())
    base = build_tiny_processor(VisionSize(**TINY_VISION), vocabulary())
    words = with_own_tokenizer(base, "word", corpus_texts(r))
    tiny = TinyConfig(
        hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, vision=TINY_VISION
    )
    save_model(build_tiny_model(tiny, words), words, out)
    return out


def test_a_saved_student_with_its_own_tokenizer_is_distilled(recipe_dict, tmp_path):
    """student.path: a LLaVA folder with a word-level processor of its own (a hub id or local folder)."""
    d = _words(recipe_dict)
    d["student"] = {"path": str(_saved_word_student(d, tmp_path / "saved"))}
    r = parse_recipe(d)
    distill(r)
    rows = _distilled_terms(r)
    assert all(any(x["response_kl"] != 0 for x in rows[st]) for st in ("dpt", "dft"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"teacher_cache": "auto"}, r"a teacher cache .* cannot serve it; set teacher_cache = 'off'"),
        (
            {"loss": {"latent": 1.0, "latent_pairs": [["projector", "projector"], [-1, -1]]}},
            r"text positions do not pair one to one and loss.latent_pairs \[-1, -1\] cannot align",
        ),
    ],
)
def test_what_needs_one_tokenization_is_refused_before_any_stage_trains(recipe_dict, change, message):
    d = _words(recipe_dict)
    d["stages"][2].update(change)
    r = parse_recipe(d)
    with pytest.raises(LsdEdgeError, match=r"stage 'dft': the student's tokenizer differs .*" + message):
        distill(r)
    # a word-level student surely reads other tokens: refused before the teacher is even trained
    assert not (Path(r.run.output_dir) / "teacher").exists(), "nothing trained"
    # a saved student's tokenizer is known once it is loaded: refused before any stage trains
    d["student"] = {"path": str(_saved_word_student(d, Path(r.run.output_dir).parent / "saved"))}
    r = parse_recipe(d)
    with pytest.raises(LsdEdgeError, match=r"stage 'dft': the student's tokenizer differs .*" + message):
        distill(r)
    assert (Path(r.run.output_dir) / "teacher").exists() and not (Path(r.run.output_dir) / "dpt").exists()


def test_a_teacher_cache_is_not_made_across_tokenizers(recipe_dict):
    from lsd_edge.train.offline import cache_teacher

    r = parse_recipe(_words(recipe_dict))
    with pytest.raises(LsdEdgeError, match="a teacher cache .* cannot serve it"):
        cache_teacher(r, "dft")


def test_a_tiny_students_own_bpe_is_another_vocabulary_only_at_another_size(recipe_dict):
    """`student.tokenizer = "bpe"` trains the tiny models' BPE on the recipe's text: at the default size
    it is the tiny teacher's own tokenizer (no view, no cross-vocabulary terms), smaller it is not."""
    from lsd_edge.data.prepare import corpus_texts, prepare_data
    from lsd_edge.models.build import build_tiny_processor
    from lsd_edge.progress import QuietReporter
    from lsd_edge.recipe.schema import VisionSize
    from lsd_edge.train.sight import vocab_map
    from lsd_edge.train.student import tiny_student_processor

    r = parse_recipe(recipe_dict)
    prepare_data(r, QuietReporter())
    teacher = build_tiny_processor(VisionSize(**TINY_VISION), corpus_texts(r))
    recipe_dict["student"]["tokenizer"] = "bpe"
    same = tiny_student_processor(parse_recipe(recipe_dict), teacher)
    assert vocab_map(teacher, same, r.stages[2]) is None and teacher_view(teacher, same) is None
    recipe_dict["student"]["tokenizer_vocab"] = 300
    small = tiny_student_processor(parse_recipe(recipe_dict), teacher)
    assert len(small.tokenizer) == 300 < len(teacher.tokenizer)
    vmap = vocab_map(teacher, small, r.stages[2])
    assert vmap is not None and vmap.mode == "uld" and teacher_view(teacher, small).encoder is not None


def test_the_cli_refuses_layer_pairs_across_tokenizers_in_one_red_line(
    recipe_dict, tmp_path, monkeypatch, capsys
):
    from ..helpers import distill_red_line

    d = _words(recipe_dict)
    d["stages"][0]["loss"]["latent_pairs"] = [["projector", "projector"], [-1, -1]]
    line = distill_red_line(monkeypatch, capsys, d, tmp_path)
    assert "stage 'dpt': the student's tokenizer differs from the teacher's" in line
    assert "keep only ['projector', 'projector'] pairs or set loss.latent = 0" in line


def test_validate_names_each_stage_distill_refuses_across_tokenizers(
    recipe_dict, tmp_path, monkeypatch, capsys
):
    """`lsd-edge validate` shows, under each stage's key, what `distill` refuses of a student with its
    own tokenizer (a layer latent pair, a teacher cache), before any model loads; a recipe without
    them validates."""
    from lsd_edge.recipe.toml import dumps_toml

    from ..helpers import run

    d = _words(recipe_dict)
    path = tmp_path / "r.toml"
    path.write_text(dumps_toml(d))
    code, out, _ = run(monkeypatch, capsys, "validate", str(path), "--no-memory")
    assert code == 0 and "valid" in out
    d["stages"][0]["loss"]["latent_pairs"] = [["projector", "projector"], [-1, -1]]
    d["stages"][2]["teacher_cache"] = "auto"
    path.write_text(dumps_toml(d))
    code, _, err = run(monkeypatch, capsys, "validate", str(path), "--no-memory")
    assert code == 1 and "2 problem(s) in the recipe" in err
    flat = " ".join(err.split())
    assert "stages[0]: the student's tokenizer differs from the teacher's, so text positions" in flat
    assert "stages[2]: the student's tokenizer differs from the teacher's, so a teacher cache" in flat


def test_validate_reads_a_student_llms_tokenizer_against_the_teachers(
    standins, tmp_path, monkeypatch, capsys
):
    """A `student.llm` of another vocabulary than the `teacher.path` checkpoint (read from the two
    tokenizers' files): a teacher cache is refused by `validate`; the stand-in LLM of the teacher's
    own vocabulary is not, and an LLM folder that cannot be read leaves the check to `distill`."""
    from lsd_edge.data.prepare import corpus_texts, prepare_data
    from lsd_edge.models.bpe import word_tokenizer
    from lsd_edge.progress import QuietReporter
    from lsd_edge.recipe.load import load_recipe

    from ..helpers import REPO, run, tiny_llm_folder

    recipe = REPO / "recipes" / "qwen0.5b.toml"
    sets = [f"data.root={standins['data']}", f"teacher.path={standins['teacher']}"]
    prepare_data(load_recipe(recipe, [*sets, f"student.llm={standins['llm_tied']}"]), QuietReporter())
    tiny_llm_folder(tmp_path / "llm", word_tokenizer(corpus_texts(load_recipe(recipe, sets))))
    cache = ["stages[2].teacher_cache=auto"]
    for llm, refused in ((tmp_path / "llm", True), (standins["llm_tied"], False), (tmp_path / "none", False)):
        args = [a for s in [*sets, f"student.llm={llm}", *cache] for a in ("--set", s)]
        code, _, err = run(monkeypatch, capsys, "validate", str(recipe), "--no-memory", *args)
        assert (code == 1) == refused, (llm, err)
        assert ("stages[2]: the student's tokenizer differs" in " ".join(err.split())) == refused


def test_distill_refuses_a_student_llm_of_another_vocabulary_before_the_teacher_loads(
    standins, tmp_path, monkeypatch
):
    """With `student.llm` and `teacher.path` folders, the tokenizers' files tell that the two differ:
    a stage that needs one tokenization is refused before the (maybe large) teacher is loaded."""
    from lsd_edge.data.prepare import corpus_texts
    from lsd_edge.models.bpe import word_tokenizer
    from lsd_edge.recipe.load import load_recipe
    from lsd_edge.train import teacher

    from ..helpers import REPO, tiny_llm_folder

    recipe = REPO / "recipes" / "qwen0.5b.toml"
    sets = [f"data.root={standins['data']}", f"teacher.path={standins['teacher']}"]
    tiny_llm_folder(tmp_path / "llm", word_tokenizer(corpus_texts(load_recipe(recipe, sets))))
    sets += [
        f"student.llm={tmp_path / 'llm'}",
        "stages[2].teacher_cache=auto",
        f"run.output_dir={tmp_path / 'run'}",
    ]

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(teacher, "load_llava", no_teacher)
    with pytest.raises(LsdEdgeError, match="stage 'dft': the student's tokenizer differs from the teacher's"):
        distill(load_recipe(recipe, [*sets, "run.device=cpu"]))
