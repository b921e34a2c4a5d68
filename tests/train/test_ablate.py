"""Ablation schemes: stage templates taken from the recipe or its twin kind."""

from __future__ import annotations

import pytest

from lsd_edge.errors import LsdEdgeError
from lsd_edge.recipe.load import parse_recipe
from lsd_edge.train.ablate import scheme_stages


def test_scheme_stages_from_twins(recipe_dict):
    r = parse_recipe(recipe_dict)
    stages = scheme_stages(r, "pt-sft-dft-dft")
    assert [s.name for s in stages] == ["pt", "sft", "dft", "dft2"]
    pt = stages[0]
    dpt = r.stages[0]
    assert pt.kind == "pt" and not pt.distills and pt.lr == dpt.lr and pt.max_steps == dpt.max_steps
    assert stages[2].distills and stages[3].loss == stages[2].loss


def test_bad_schemes(recipe_dict):
    r = parse_recipe(recipe_dict)
    with pytest.raises(LsdEdgeError, match="scheme 'foo'"):
        scheme_stages(r, "foo")
    recipe_dict["stages"] = [recipe_dict["stages"][1]]
    with pytest.raises(LsdEdgeError, match="no pt or dpt stage"):
        scheme_stages(parse_recipe(recipe_dict), "pt-sft")
