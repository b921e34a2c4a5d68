"""Recipes: the shipped ones validate, broken ones are refused with the user's own key named."""

from __future__ import annotations

import tomllib

import pytest

from lsd_edge.errors import RecipeError
from lsd_edge.recipe.load import apply_overrides, load_recipe, parse_recipe
from lsd_edge.recipe.schema import Recipe
from lsd_edge.recipe.toml import dumps_toml

from ..helpers import REPO

RECIPES = sorted((REPO / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.stages
    text = path.read_text()
    assert text.startswith("#"), "every recipe opens with a comment saying what it does"
    assert "lsd-edge distill" in text.split("\n\n")[0] + text[:2000]


def test_there_are_shipped_recipes():
    names = {p.name for p in RECIPES}
    assert {"tiny.toml", "qwen0.5b.toml"} <= names


def test_kind_defaults_follow_method(recipe_dict):
    r = parse_recipe(recipe_dict)
    dpt, sft, dft = r.stages
    assert dpt.loss.response_kl == 1.0 and dpt.loss.visual_kl == 1.0 and dpt.loss.relation == 0.5
    assert sft.loss.response_kl == 0.0 and not sft.distills
    assert dft.distills and dft.trainable == ["projector", "llm"]
    assert sft.data == "instruct"


def test_recipe_is_frozen(recipe_dict):
    r = parse_recipe(recipe_dict)
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        r.run.seed = 3  # type: ignore[misc]


def _problems(raw) -> list[str]:
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "r.toml")
    return e.value.problems


BROKEN = [
    ("negative lr", lambda d: d["stages"][2].update(lr=-1.0), "stages[2].lr"),
    ("lr as string", lambda d: d["stages"][0].update(lr="fast"), "stages[0].lr"),
    ("unknown stage key", lambda d: d["stages"][1].update(lrr=1e-3), "stages[1].lrr"),
    ("unknown top key", lambda d: d.update(trainer={}), "trainer"),
    ("missing stages", lambda d: d.pop("stages"), "stages"),
    ("missing teacher", lambda d: d.pop("teacher"), "teacher"),
    ("bad kind", lambda d: d["stages"][0].update(kind="kd"), "stages[0].kind"),
    ("bad device", lambda d: d["run"].update(device="tpu"), "run.device"),
    ("no steps", lambda d: d["stages"][1].pop("max_steps"), "stages[1]"),
    ("kd weight on sft", lambda d: d["stages"][1].update(loss={"response_kl": 1.0}), "stages[1]"),
    ("bad kl kind", lambda d: d["stages"][2].update(loss={"kl": "wasserstein"}), "stages[2].loss.kl"),
    ("zero batch", lambda d: d["stages"][0].update(batch_size=0), "stages[0].batch_size"),
    ("bad group", lambda d: d["stages"][0].update(trainable=["vision", "eyes"]), "stages[0].trainable[1]"),
    ("two model sources", lambda d: d["student"].update(path="some/model"), "student"),
    ("bad policy", lambda d: d["data"].update(bad_samples="ignore"), "data.bad_samples"),
    ("duplicate stage", lambda d: d["stages"][1].update(name="dpt"), "stages"),
    ("unknown data set", lambda d: d["data"].pop("pretrain"), "stages[0].data"),
    ("lr_scale of no group", lambda d: d["stages"][0].update(lr_scale={"eyes": 2.0}), "stages[0].lr_scale"),
    ("lr_scale zero", lambda d: d["stages"][0].update(lr_scale={"vision": 0}), "stages[0].lr_scale.vision"),
    ("negative jitter", lambda d: d["data"]["shapes"].update(jitter=-1), "data.shapes.jitter"),
    (
        "image size off the patch",
        lambda d: d["student"].update(image_size=12),
        "student.image_size 12 is not a",
    ),
    (
        "image size above the teacher",
        lambda d: d["student"].update(image_size=24),
        "student.image_size 24 is above",
    ),
    ("vision layers zero", lambda d: d["student"].update(vision_layers=0), "student.vision_layers"),
    (
        "vision layers past the teacher",
        lambda d: d["student"].update(vision_layers=2),
        "student.vision_layers 2 is out",
    ),
    (
        "image size on a saved student",
        lambda d: d.update(student={"path": "some/model", "image_size": 8}),
        "student.image_size: a student.path model is used as saved",
    ),
    (
        "vision layers with tower sizes",
        lambda d: d["student"].update(
            vision_layers=1, tiny={**d["student"]["tiny"], "vision": {"image_size": 16}}
        ),
        "student.vision_layers: [student.tiny.vision] sizes build a tower of their own; set its num_layers",
    ),
    (
        "a tower folder and tower sizes",
        lambda d: d["student"].update(
            vision="some/siglip", tiny={**d["student"]["tiny"], "vision": {"image_size": 16}}
        ),
        "student.vision: a folder and [student.tiny.vision] sizes",
    ),
    (
        "a tokenizer of its own on a saved student",
        lambda d: d.update(student={"path": "some/model", "tokenizer": "word"}),
        "student: tokenizer: only a tiny student trains a tokenizer of its own",
    ),
    (
        "a vocabulary size without a bpe",
        lambda d: d["student"].update(tokenizer="word", tokenizer_vocab=400),
        "student: tokenizer_vocab: the size of a BPE tokenizer",
    ),
    (
        "bad cross-tokenizer loss",
        lambda d: d["stages"][2].update(loss={"cross_tokenizer": "kl"}),
        "stages[2].loss.cross_tokenizer",
    ),
    (
        "temperature zero",
        lambda d: d["stages"][2].update(loss={"temperature": 0}),
        "stages[2].loss.temperature",
    ),
]


@pytest.mark.parametrize("name,mutate,key", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_recipes_name_the_key(recipe_dict, name, mutate, key):
    mutate(recipe_dict)
    problems = _problems(recipe_dict)
    assert any(p.startswith(key) for p in problems), problems


def test_student_tokenizer_choices_parse(recipe_dict):
    recipe_dict["student"].update(tokenizer="bpe", tokenizer_vocab=320)
    recipe_dict["stages"][2]["loss"] = {"cross_tokenizer": "gold"}
    r = parse_recipe(recipe_dict)
    assert (r.student.tokenizer, r.student.tokenizer_vocab, r.stages[2].loss.cross_tokenizer) == (
        "bpe",
        320,
        "gold",
    )
    assert (
        parse_recipe(recipe_dict | {"stages": recipe_dict["stages"][:2]}).stages[0].loss.cross_tokenizer
        == "uld"
    )


def test_edge_vision_choices_parse(recipe_dict):
    recipe_dict["student"].update(image_size=8, vision_layers=1)
    r = parse_recipe(recipe_dict)
    assert (r.student.image_size, r.student.vision_layers) == (8, 1)
    # the shipped default reads the teacher's tower cut to its first layer, at half its image size
    tiny = load_recipe(REPO / "recipes" / "tiny.toml").student
    assert (tiny.image_size, tiny.vision_layers, tiny.tiny.vision) == (16, 1, "teacher")


def test_every_problem_reported_at_once(recipe_dict):
    recipe_dict["stages"][0]["lr"] = -1
    recipe_dict["stages"][1]["batch_size"] = "x"
    recipe_dict["run"]["devcie"] = "cpu"
    problems = _problems(recipe_dict)
    assert len(problems) == 3
    assert {p.split(":")[0] for p in problems} == {"stages[0].lr", "stages[1].batch_size", "run.devcie"}


def test_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[run]\nname = "x"\nseed = = 3\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "line 3" in str(e.value) and "bad.toml" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.toml")


def test_not_utf8(tmp_path):
    p = tmp_path / "bin.toml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RecipeError, match="bin.toml: not a UTF-8 text file; a recipe is TOML"):
        load_recipe(p)


def test_overrides_are_typed(recipe_dict):
    r = parse_recipe(
        recipe_dict, overrides=["stages[2].lr=5e-4", "run.seed=7", "run.name=abc", "stages.0.batch_size=4"]
    )
    assert r.stages[2].lr == 5e-4 and r.run.seed == 7 and r.run.name == "abc" and r.stages[0].batch_size == 4
    r = parse_recipe(recipe_dict, overrides=["stages[2].loss.kl=reverse", "stages[2].loss.temperature=2"])
    assert r.stages[2].loss.kl == "reverse" and r.stages[2].loss.temperature == 2.0


def test_override_problems(recipe_dict):
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe_dict, overrides=["stages[9].lr=1", "novalue", "run.seed=x"])
    text = " ".join(e.value.problems)
    assert "out of range" in text and "KEY=VALUE" in text
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe_dict, overrides=["run.seed=notanint"])
    assert e.value.problems[0].startswith("run.seed")
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe_dict, overrides=["run.sede=1"])
    assert e.value.problems[0].startswith("run.sede")


def test_apply_overrides_does_not_touch_input(recipe_dict):
    before = repr(recipe_dict)
    apply_overrides(recipe_dict, ["run.seed=3"])
    assert repr(recipe_dict) == before


def test_resolved_recipe_round_trips_through_toml(recipe_dict):
    r = parse_recipe(recipe_dict)
    again = Recipe.model_validate(tomllib.loads(r.to_toml()))
    assert again == r


def test_dumps_toml_nested():
    text = dumps_toml(
        {"a": 1, "t": {"b": "x", "u": {"c": [1, 2]}}, "arr": [{"n": 1}, {"n": 2, "sub": {"k": True}}]}
    )
    assert tomllib.loads(text) == {
        "a": 1,
        "t": {"b": "x", "u": {"c": [1, 2]}},
        "arr": [{"n": 1}, {"n": 2, "sub": {"k": True}}],
    }


def test_distill_schedule_factors():
    from lsd_edge.recipe.distill import DistillSchedule

    assert DistillSchedule().factor(5, 10) == 1.0
    lin = DistillSchedule(kind="linear_decay", start=1.0, end=0.0)
    assert lin.factor(0, 11) == 1.0 and lin.factor(10, 11) == 0.0 and abs(lin.factor(5, 11) - 0.5) < 1e-9
    warm = DistillSchedule(kind="warm_start", warm_steps=3, ramp_steps=2)
    assert [warm.factor(s, 10) for s in range(6)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
