"""More than one process: how a step is shared, and runs launched with Accelerate on 2 CPU processes.

The launched runs use the shipped configs (recipes/accelerate/ddp.yaml and fsdp.yaml) with
`--num_processes 2`; without CUDA Accelerate starts them on gloo.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lsd_edge.errors import DataError
from lsd_edge.recipe.load import parse_recipe
from lsd_edge.recipe.toml import dumps_toml
from lsd_edge.train.distributed import SINGLE, Dist
from lsd_edge.train.pipeline import distill

from ..helpers import REPO


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_micro_batches_cover_each_step_once(world):
    for grad_accum in range(1, 10):
        slots = [Dist(rank=r, world=world).micro_batches(grad_accum) for r in range(world)]
        assert len({len(s) for s in slots}) == 1, "every process runs the same number of slots"
        taken = sorted(k for s in slots for k in s if k is not None)
        assert taken == list(range(grad_accum))
    assert SINGLE.micro_batches(4) == [0, 1, 2, 3]


def test_one_process_needs_no_process_group():
    assert not torch.distributed.is_initialized()
    assert SINGLE.sum_floats([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    assert SINGLE.gather({"a": 1}) == [{"a": 1}]
    p = torch.nn.Parameter(torch.ones(2))
    SINGLE.sum_gradients([p])
    assert p.grad is None, "no gradient is made up"
    SINGLE.barrier()
    SINGLE.raise_together(None)
    with pytest.raises(DataError, match="bad"):
        SINGLE.raise_together(DataError("bad"))


# ------------------------------------------------------------------------------------ launched runs


def _launch(config: str, recipe: Path, *extra: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LSD_EDGE_DEBUG="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
    cmd += ["--config_file", str(REPO / "recipes" / "accelerate" / config), "--num_processes", "2"]
    cmd += ["-m", "lsd_edge", "distill", str(recipe), *extra]
    p = subprocess.run(cmd, env=env, cwd=recipe.parent, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _losses(run: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows if not r["stage"].startswith("teacher/")]


def _same_run(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    # the same arithmetic, summed in another order: equal to float rounding
    assert all(abs(x[2] - y[2]) <= 1e-4 * abs(x[2]) for x, y in zip(la, lb, strict=True)), (la, lb)
    wa, wb = load_file(a / "student" / "model.safetensors"), load_file(b / "student" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    ra, rb = (json.loads((r / "report.json").read_text()) for r in (a, b))
    assert abs(ra["student"]["accuracy"] - rb["student"]["accuracy"]) <= 0.02
    assert [s["accuracy"] for s in ra["stages"]] == [s["accuracy"] for s in rb["stages"]]


@pytest.mark.slow
def test_two_processes_match_one_and_resume_across_process_counts(tmp_path, recipe_dict, monkeypatch):
    """The tiny recipe with a global batch of 8 (4 x 2 micro-batches): 2 processes (DDP) train what 1
    does; a run cut in DFT on 1 process resumes on 2 (teacher sharded, FSDP) and ends the same."""
    for st in recipe_dict["stages"]:
        st.update(batch_size=4, grad_accum=2)
    recipe_dict["stages"][2]["max_steps"] = 6
    recipe_dict["data"]["root"] = str(tmp_path / "data")

    def recipe(name: str) -> Path:
        d = copy.deepcopy(recipe_dict)
        d["run"]["output_dir"] = str(tmp_path / name)
        path = tmp_path / f"{name}.toml"
        path.write_text(dumps_toml(d))
        if name != "ref":  # the teacher is the same; train it once
            shutil.copytree(tmp_path / "ref" / "teacher", tmp_path / name / "teacher")
        return path

    distill(parse_recipe(copy.deepcopy(recipe_dict), overrides=[f"run.output_dir={tmp_path / 'ref'}"]))

    _launch("ddp.yaml", recipe("two"))
    _same_run(tmp_path / "ref", tmp_path / "two")

    from lsd_edge.train import state

    real_save = state.save_step_state

    def save_then_stop(state_dir, step, payload, keep=1):
        real_save(state_dir, step, payload, keep)
        if Path(state_dir).name == "dft" and step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(state, "save_step_state", save_then_stop)
    cut = recipe("cut")
    with pytest.raises(KeyboardInterrupt):
        distill(parse_recipe(copy.deepcopy(recipe_dict), overrides=[f"run.output_dir={tmp_path / 'cut'}"]))
    assert (tmp_path / "cut" / "state" / "dft" / "step-0000004").is_dir()
    _launch("fsdp.yaml", cut, "--resume")
    _same_run(tmp_path / "ref", tmp_path / "cut")
