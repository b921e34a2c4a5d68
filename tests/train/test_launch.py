"""The launch config as lsd-edge reads it: FSDP2 settings taken as written, the ones it cannot use
refused in one line naming the key and what to do; trackers that are not installed; threads."""

from __future__ import annotations

import importlib.util

import pytest

from lsd_edge.errors import LsdEdgeError
from lsd_edge.train.distributed import threads_per_process
from lsd_edge.train.launch import check_deepspeed, check_trackers, check_wrap_classes, fsdp_plugin

from ..helpers import one_red_line, run


@pytest.fixture
def fsdp(monkeypatch):
    """The environment `accelerate launch --config_file recipes/accelerate/fsdp.yaml` makes."""
    for key, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    return monkeypatch


def test_no_fsdp_launch_has_no_plugin(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_plugin() is None


@pytest.mark.parametrize(
    ("value", "reshard"), [("true", True), ("FULL_SHARD", True), ("false", False), ("SHARD_GRAD_OP", False)]
)
def test_fsdp2_reads_the_sharding_as_written(fsdp, value, reshard):
    fsdp.setenv("FSDP_RESHARD_AFTER_FORWARD", value.lower())  # as `accelerate launch` passes it
    fsdp.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    fsdp.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Qwen2DecoderLayer")
    plugin = fsdp_plugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is reshard
    assert plugin.transformer_cls_names_to_wrap == ["Qwen2DecoderLayer"]


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("FSDP_VERSION", "1", "fsdp_version is 1; lsd-edge shards with FSDP2: set fsdp_version: 2"),
        ("FSDP_RESHARD_AFTER_FORWARD", "hybrid_shard", "fsdp_reshard_after_forward is 'hybrid_shard'"),
        ("FSDP_ACTIVATION_CHECKPOINTING", "true", "use student.gradient_checkpointing"),
        ("ACCELERATE_MIXED_PRECISION", "bf16", "choose run.precision in the recipe"),
    ],
)
def test_unsupported_fsdp_settings_are_refused_in_one_line(fsdp, key, value, says):
    fsdp.setenv(key, value)
    with pytest.raises(LsdEdgeError) as e:
        fsdp_plugin()
    assert str(e.value).startswith("launch config: ") and says in str(e.value) and "\n" not in str(e.value)


def test_layer_classes_to_wrap_must_be_the_students(fsdp, tiny_student):
    fsdp.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    fsdp.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Qwen2DecoderLayer")
    check_wrap_classes(fsdp_plugin(), tiny_student)  # the tiny student is a Qwen2 LLM
    fsdp.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
    with pytest.raises(LsdEdgeError) as e:
        check_wrap_classes(fsdp_plugin(), tiny_student)
    msg = str(e.value)
    assert msg.startswith(
        "launch config: fsdp_config.fsdp_transformer_layer_cls_to_wrap names LlamaDecoderLayer"
    )
    assert "Qwen2DecoderLayer" in msg and "\n" not in msg


def test_a_deepspeed_launch_is_refused_with_what_to_launch_instead(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    check_deepspeed()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(
        LsdEdgeError, match=r"DEEPSPEED is not supported; launch with recipes/accelerate/fsdp.yaml"
    ):
        check_deepspeed()


def test_a_tracker_that_is_not_installed_is_one_red_line(recipe_dict, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(LsdEdgeError, match=r"run.report_to: 'wandb' needs the wandb package"):
        check_trackers(["wandb"])
    from lsd_edge.recipe.toml import dumps_toml

    path = tmp_path / "r.toml"
    recipe_dict["run"]["report_to"] = ["wandb"]
    path.write_text(dumps_toml(recipe_dict))
    code, _, err = run(monkeypatch, capsys, "distill", str(path))
    assert code == 1 and "pip install 'lsd-edge[track]'" in one_red_line(err)


def test_processes_on_one_machine_share_its_threads(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert (
        threads_per_process(0, 1) == 8 and threads_per_process(0, 2) == 4 and threads_per_process(0, 16) == 1
    )
    assert threads_per_process(6, 2) == 3 and threads_per_process(2, 1) == 2
