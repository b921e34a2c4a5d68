"""Ablation schemes: stage templates taken from the recipe or its twin kind."""

from __future__ import annotations

import pytest

from lsd_edge.errors import LsdEdgeError
from lsd_edge.recipe.distill import OnPolicyConfig
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


def test_a_switch_turns_a_term_off_in_every_stage(recipe_dict):
    r = parse_recipe(recipe_dict)
    on = scheme_stages(r, "dpt-sft-dft")
    off = scheme_stages(r, "dpt-sft-dft:no-visual_kl:no-relation")
    for a, b in zip(on, off, strict=True):
        assert b.loss.weight("visual_kl") == 0 and b.loss.weight("relation") == 0
        assert b.loss.weight("response_kl") == a.loss.weight("response_kl") and b.kind == a.kind
    assert on[0].loss.weight("visual_kl") > 0 and off[0].distills
    everything = ":".join(f"no-{t}" for t in ("response_kl", "visual_kl", "relation", "latent", "vision"))
    assert not scheme_stages(r, f"dpt-dft:{everything}")[1].distills
    for bad in ("dpt-sft:visual_kl", "dpt-sft:no-vis", "dpt-sft:"):
        with pytest.raises(LsdEdgeError, match=r"is not a switch; turn a term off with :no-TERM"):
            scheme_stages(r, bad)


def test_the_on_policy_switch_makes_dft_on_policy(recipe_dict):
    """`:on-policy` changes DFT stages alone: the recipe's on_policy settings, or the defaults with
    answers as long as eval's; the rest of the chain is the plain scheme's."""
    r = parse_recipe(recipe_dict)
    plain, on = scheme_stages(r, "dpt-sft-dft"), scheme_stages(r, "dpt-sft-dft:on-policy")
    assert plain[:2] == on[:2] and plain[2].on_policy is None
    assert on[2].on_policy == OnPolicyConfig(max_new_tokens=r.eval.max_new_tokens)
    assert on[2].model_copy(update={"on_policy": None}) == plain[2]
    recipe_dict["stages"][2]["on_policy"] = {"lmbda": 1.0, "temperature": 0.0, "max_new_tokens": 3}
    given = scheme_stages(parse_recipe(recipe_dict), "dft:on-policy")[0].on_policy
    assert given == OnPolicyConfig(lmbda=1.0, temperature=0.0, max_new_tokens=3)
    with pytest.raises(LsdEdgeError, match=r"^scheme 'dpt-sft:on-policy': :on-policy changes DFT stages"):
        scheme_stages(r, "dpt-sft:on-policy")
    with pytest.raises(
        LsdEdgeError, match=r"^scheme 'dft:no-response_kl:on-policy', stage 'dft': on_policy: loss"
    ):
        scheme_stages(r, "dft:no-response_kl:on-policy")
    recipe_dict["stages"][2].pop("on_policy")
    recipe_dict["stages"][2]["teacher_cache"] = "auto"
    with pytest.raises(LsdEdgeError, match="on_policy: a teacher cache cannot hold targets"):
        scheme_stages(parse_recipe(recipe_dict), "dft:on-policy")


def test_cross_tokenizer_switches_pick_the_loss_and_ce_turns_every_term_off(recipe_dict):
    recipe_dict["stages"][2]["loss"] = {"latent": 1.0}  # default pairs: the projector and layer -1
    r = parse_recipe(recipe_dict)
    gold = scheme_stages(r, "dpt-sft-dft:gold")
    assert [s.loss.cross_tokenizer for s in gold] == ["gold"] * 3
    # text positions of two tokenizers do not pair: only the projector pair is kept
    assert gold[2].loss.latent_pairs == [("projector", "projector")] and gold[2].loss.weight("latent") == 1.0
    assert scheme_stages(r, "dpt-sft-dft:gold:uld")[0].loss.cross_tokenizer == "uld"
    assert scheme_stages(r, "dpt-sft-dft")[2].loss.latent_pairs == r.stages[2].loss.latent_pairs
    ce = scheme_stages(r, "dpt-sft-dft:ce")
    assert [s.kind for s in ce] == ["dpt", "sft", "dft"] and not any(s.distills for s in ce)
    assert [s.max_steps for s in ce] == [s.max_steps for s in r.stages]
    with pytest.raises(LsdEdgeError, match=r"or pick the cross-tokenizer loss with :uld or :gold"):
        scheme_stages(r, "dpt-sft-dft:ulD2")


def test_a_layer_only_latent_term_is_dropped_by_a_cross_tokenizer_switch(recipe_dict):
    recipe_dict["stages"][2]["loss"] = {"latent": 1.0, "latent_pairs": [[-1, -1]]}
    stages = scheme_stages(parse_recipe(recipe_dict), "dpt-sft-dft:uld")
    assert stages[2].loss.latent_pairs == [] and stages[2].loss.weight("latent") == 0.0
