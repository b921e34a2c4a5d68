"""What goes to the trackers: the FLOPs count behind MFU, and the recipe as scalars."""

from __future__ import annotations

import torch

from lsd_edge.distill.teacher import OnlineTeacher
from lsd_edge.recipe.load import parse_recipe
from lsd_edge.train.track import flat_config, flops_per_token, mfu


def test_flops_count_the_student_trained_and_the_online_teacher_run_forward(tiny_student, tiny_teacher):
    s = sum(p.numel() for p in tiny_student.parameters())
    t = sum(p.numel() for p in tiny_teacher.parameters())
    assert flops_per_token(tiny_student, None) == 6 * s
    assert flops_per_token(tiny_student, OnlineTeacher(tiny_teacher)) == 6 * s + 2 * t


def test_mfu_only_where_the_peak_is_known():
    assert mfu(1e9, 1000.0, torch.device("cpu"), 1) is None


def test_the_recipe_goes_to_the_trackers_as_scalars(recipe_dict):
    recipe_dict["run"]["report_to"] = ["tensorboard"]
    flat = flat_config(parse_recipe(recipe_dict))
    assert flat["run.seed"] == 0 and flat["run.report_to"] == "['tensorboard']"
    assert flat["student.tiny.hidden_size"] == 16 and flat["data.max_length"] == 64
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
