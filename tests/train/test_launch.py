"""The launch config as lsd-edge reads it: FSDP2 and DeepSpeed ZeRO settings taken as written, the
ones it cannot use refused in one line naming the key and what to do; what each stage writes into
the DeepSpeed config; trackers that are not installed; threads."""

from __future__ import annotations

import importlib.util

import pytest

from lsd_edge.errors import LsdEdgeError
from lsd_edge.recipe.schema import StageConfig
from lsd_edge.train.backends import zero
from lsd_edge.train.distributed import threads_per_process
from lsd_edge.train.launch import (
    check_trackers,
    check_wrap_classes,
    check_zero_config,
    deepspeed_plugin,
    fsdp_plugin,
    make_accelerator,
)

from ..helpers import one_red_line, require_dev, run


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


@pytest.fixture
def zero_launch(monkeypatch):
    """The environment `accelerate launch --config_file recipes/accelerate/zero3.yaml` makes."""
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in (
        "ACCELERATE_MIXED_PRECISION",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE",
        "ACCELERATE_GRADIENT_CLIPPING",
    ):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_no_deepspeed_launch_has_no_plugin(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert deepspeed_plugin() is None


def test_the_shipped_zero_configs_are_read_as_written(zero_launch):
    require_dev("deepspeed")
    assert deepspeed_plugin().zero_stage == 3
    zero_launch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert deepspeed_plugin().deepspeed_config["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1", "zero_stage is 1; lsd-edge trains with ZeRO stage 2 or 3"),
        ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", "gradient_accumulation_steps is 4; set it to 1"),
        ("ACCELERATE_GRADIENT_CLIPPING", "1.0", "gradient_clipping is 1.0; leave it out or 'auto'"),
        ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu", "offload_optimizer_device is 'cpu'"),
        ("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true", "zero3_init_flag is True; set it to false"),
        ("ACCELERATE_MIXED_PRECISION", "bf16", "choose run.precision in the recipe"),
    ],
)
def test_unsupported_zero_settings_are_refused_in_one_line(zero_launch, key, value, says):
    require_dev("deepspeed")
    zero_launch.setenv(key, value)
    with pytest.raises(LsdEdgeError) as e:
        deepspeed_plugin()
    assert str(e.value).startswith("launch config: ") and says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"optimizer": {"type": "AdamW"}}, "optimizer is 'AdamW'; remove it"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler is 'WarmupLR'; remove it"),
        ({"bf16": {"enabled": True}}, "bf16.enabled is True; leave it 'auto'"),
        ({"train_micro_batch_size_per_gpu": 4}, "leave it 'auto': a stage's batch_size"),
        ({"activation_checkpointing": {"partition_activations": True}}, "use student.gradient_checkpointing"),
    ],
)
def test_a_deepspeed_json_may_not_set_what_the_recipe_owns(config, says):
    ok = {"zero_optimization": {"stage": 3}, "train_batch_size": "auto", "bf16": {"enabled": "auto"}}
    check_zero_config(ok)
    with pytest.raises(LsdEdgeError) as e:
        check_zero_config({**ok, **config})
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_deepspeed_launch_without_deepspeed_says_what_to_install(
    zero_launch, monkeypatch, recipe_dict, tmp_path, capsys
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    with pytest.raises(
        LsdEdgeError, match=r"DEEPSPEED needs the deepspeed package; pip install 'lsd-edge\[deepspeed\]'"
    ):
        deepspeed_plugin()
    from lsd_edge.recipe.toml import dumps_toml

    path = tmp_path / "r.toml"
    path.write_text(dumps_toml(recipe_dict))
    code, _, err = run(monkeypatch, capsys, "distill", str(path))
    assert code == 1 and "pip install 'lsd-edge[deepspeed]'" in one_red_line(err)


def test_cpu_processes_under_deepspeed_on_a_cuda_machine_are_refused(zero_launch, monkeypatch, tmp_path):
    require_dev("deepspeed")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(
        LsdEdgeError, match=r"run.device is 'cpu' under a DeepSpeed launch on a machine with CUDA"
    ):
        make_accelerator(True, 2, [], tmp_path)


def test_each_stage_writes_its_batch_clipping_and_zero_sizes_into_the_deepspeed_config():
    config = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "overlap_comm": True}}
    stage = StageConfig(name="dft", kind="dft", max_steps=6, batch_size=4, grad_accum=3, max_grad_norm=0.5)
    zero.configure(config, stage, world=2, hidden_size=64, bf16=True)
    # the run's bf16 autocast stays on inside DeepSpeed's forward, gradients still reduced in fp32
    assert config["torch_autocast"] == {
        "enabled": True,
        "dtype": "bfloat16",
        "lower_precision_safe_modules": [],
    }
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["train_batch_size"] == 8
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert config["zero_optimization"]["overlap_comm"] is True  # ZeRO's own settings stay as written
    assert (
        "stage3_prefetch_bucket_size" not in config["zero_optimization"]
    )  # not asked for: DeepSpeed's default


def test_each_resume_tensor_is_kept_by_the_least_loaded_process():
    owners = zero.owners([100, 10, 60, 50, 5], world=2)
    load = [sum(n for n, r in zip([100, 10, 60, 50, 5], owners, strict=True) if r == k) for k in range(2)]
    assert sorted(load) == [110, 115] and owners[0] != owners[2]
    assert zero.owners([7, 7], world=1) == [0, 0]


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


def test_deepspeed_internals_that_moved_stop_a_stage_in_one_line():
    """The ZeRO backend reads DeepSpeed's engine and ZeRO optimizer (the fp32 partitions, the
    parameter groups, the torch optimizer inside) for its resume states; a release without them is
    refused by name, with the versions tested, before a state is written wrong."""
    from types import SimpleNamespace

    from lsd_edge.errors import TrainingError

    require_dev("deepspeed")
    zero2 = SimpleNamespace(optimizer=object(), single_partition_of_fp32_groups=[], bit16_groups=[[1]])
    zero3 = SimpleNamespace(
        optimizer=object(), fp32_partitioned_groups_flat=[], fp16_groups=[], sub_group_to_group_id={}
    )
    for ok in (zero2, zero3):
        zero.check_internals(SimpleNamespace(optimizer=ok))  # as ZeRO-2 and ZeRO-3 have them
    moved = SimpleNamespace(optimizer=object(), bit16_groups=[[1]])  # the fp32 partitions renamed
    with pytest.raises(
        TrainingError, match=r"no longer has the fp32 partitions .*install deepspeed>=0\.16,<0\.20"
    ):
        zero.check_internals(SimpleNamespace(optimizer=moved))
    with pytest.raises(TrainingError, match=r"no longer has the engine's optimizer \(ZeRO\)"):
        zero.check_internals(SimpleNamespace())
