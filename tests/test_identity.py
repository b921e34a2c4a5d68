"""One manifest type behind every stale check: what a folder is tied to, and one message naming each
changed field and what to do."""

from __future__ import annotations

import pytest

from lsd_edge.errors import LsdEdgeError, TrainingError
from lsd_edge.identity import IDENTITY_FILE, Manifest, flatten, settings
from lsd_edge.recipe.schema import StageConfig


def test_flatten_names_fields_as_a_recipe_writes_them():
    assert flatten({"stages": [{"lr": 1e-3}, {"loss": {"kl": "jsd"}}], "run.seed": 0}) == {
        "stages[0].lr": 1e-3,
        "stages[1].loss.kl": "jsd",
        "run.seed": 0,
    }
    assert flatten({"a": {}, "b": []}) == {"a": {}, "b": []}


def test_a_folder_made_from_the_same_identity_matches(tmp_path):
    m = Manifest(
        "the thing in", {"data.shapes": {"jitter": 1, "seed": 0}, "pairs": (("projector", "projector"),)}
    )
    m.write(tmp_path)
    assert (tmp_path / IDENTITY_FILE).is_file() and m.matches(tmp_path)
    m.check(tmp_path, "never raised")
    # JSON turns tuples into lists: the same identity still
    assert Manifest(
        "x", {"data.shapes": {"seed": 0, "jitter": 1}, "pairs": [["projector", "projector"]]}
    ).matches(tmp_path)


def test_every_changed_field_is_named_with_its_values_and_the_remedy(tmp_path):
    Manifest("the thing in", {"data.shapes": {"jitter": 1, "seed": 0}, "teacher": "abc"}).write(tmp_path)
    changed = Manifest(
        "the thing in",
        {"data.shapes": {"jitter": 3, "seed": 0}, "teacher": "def"},
        {"teacher": "the teacher's weights"},
    )
    with pytest.raises(TrainingError) as e:
        changed.check(tmp_path, "delete it", TrainingError)
    assert str(e.value) == (
        f"the thing in {tmp_path} is stale: data.shapes.jitter changed (1 -> 3); "
        "the teacher's weights changed (teacher: 'abc' -> 'def'); delete it"
    )


def test_settings_at_their_default_are_left_out_and_read_as_default(tmp_path):
    """A setting at its default is not recorded, so a release adding an option keeps folders valid."""
    stage = StageConfig(name="sft", kind="sft", max_steps=10, lr=3e-3)
    Manifest("stage in", {"stages": [settings(stage)]}).write(tmp_path)
    back_to_default = Manifest("stage in", {"stages": [settings(stage.model_copy(update={"lr": 1e-4}))]})
    assert back_to_default.problems(tmp_path) == ["stages[0].lr changed (0.003 -> default)"]


def test_a_folder_without_or_with_a_damaged_identity_is_stale(tmp_path):
    m = Manifest("the cache in", {"k": 1})
    with pytest.raises(
        LsdEdgeError, match=r"is stale: it has no identity.json \(made by an earlier lsd-edge"
    ):
        m.check(tmp_path, "make it again")
    (tmp_path / IDENTITY_FILE).write_text("{not json")
    assert m.problems(tmp_path) == ["its identity.json is damaged"]
    (tmp_path / IDENTITY_FILE).write_text('["a list"]')
    assert m.problems(tmp_path) == ["its identity.json is damaged"]


def test_the_digest_follows_the_identity():
    a, b = Manifest("x", {"k": 1}), Manifest("y", {"k": 1})
    assert a.digest == b.digest and a.digest != Manifest("x", {"k": 2}).digest and len(a.digest) == 16


def test_the_number_of_data_workers_is_not_part_of_an_identity():
    """Workers change how fast batches are made, never which: a cached teacher or a finished stage
    made with another data.num_workers is still the same."""
    from lsd_edge.identity import settings
    from lsd_edge.recipe.data import DataConfig

    assert settings(DataConfig(num_workers=3)) == settings(DataConfig()) == {}
    assert settings(DataConfig(max_length=64, num_workers=0)) == {"max_length": 64}
