"""More than one process: how a step is shared, and runs launched with Accelerate on 2 CPU processes.

The launched runs use the shipped configs (recipes/accelerate/ddp.yaml and fsdp.yaml) with
`--num_processes 2`; without CUDA Accelerate starts them on gloo.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lsd_edge.errors import DataError
from lsd_edge.recipe.load import load_recipe, parse_recipe
from lsd_edge.recipe.toml import dumps_toml
from lsd_edge.train.distributed import SINGLE, Dist
from lsd_edge.train.pipeline import DistillOptions, distill
from lsd_edge.train.state import SafeReader

from ..helpers import REPO, require_dev


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
    SINGLE.barrier()
    SINGLE.raise_together(None)
    with pytest.raises(DataError, match="bad"):
        SINGLE.raise_together(DataError("bad"))


# ------------------------------------------------------------------------------------ launched runs

# Loaded by every Python process of a launch (through PYTHONPATH): after the resume state of
# LSD_EDGE_TEST_PAUSE ("stage:step") is written, each process marks it and waits to be killed.
PAUSE_HOOK = """
import os
if os.environ.get("LSD_EDGE_TEST_PAUSE"):
    import pathlib, time
    from lsd_edge.train import state
    stage, step = os.environ["LSD_EDGE_TEST_PAUSE"].split(":")
    real = state.TrainingProgress.save
    def save(self, state_dir, *args, **kwargs):
        out = real(self, state_dir, *args, **kwargs)
        if pathlib.Path(state_dir).name == stage and self.step == int(step):
            pathlib.Path(os.environ["LSD_EDGE_TEST_MARK"] + os.environ.get("RANK", "0")).touch()
            time.sleep(600)
        return out
    state.TrainingProgress.save = save
"""


def _command(config: str, recipe: Path, *extra: str, hook: Path | None = None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LSD_EDGE_DEBUG="0")
    paths = [str(hook)] if hook is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
    cmd += ["--config_file", str(REPO / "recipes" / "accelerate" / config), "--num_processes", "2"]
    cmd += ["-m", "lsd_edge", "distill", str(recipe), *extra]
    return cmd, env


def _launch(config: str, recipe: Path, *extra: str) -> None:
    cmd, env = _command(config, recipe, *extra)
    p = subprocess.run(cmd, env=env, cwd=recipe.parent, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _launch_and_kill(config: str, recipe: Path, stage: str, step: int, tmp_path: Path) -> None:
    """A 2-process launch killed with SIGKILL (every process) once both wrote `stage`'s state at `step`."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK)
    cmd, env = _command(config, recipe, hook=hook)
    mark = tmp_path / f"paused-{recipe.stem}-"
    env.update(LSD_EDGE_TEST_PAUSE=f"{stage}:{step}", LSD_EDGE_TEST_MARK=str(mark))
    p = subprocess.Popen(cmd, env=env, cwd=recipe.parent, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not all(Path(f"{mark}{r}").exists() for r in range(2)):
        assert p.poll() is None and time.time() < deadline, "the run ended before the kill point"
        time.sleep(0.2)
    # the launcher's workers may sit in sessions of their own (torchrun's agent): kill the whole tree,
    # or they would wait on a dead rendezvous for the rest of the test session
    tree = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    os.killpg(p.pid, signal.SIGKILL)
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    p.wait()
    psutil.wait_procs(tree, timeout=60)


def _losses(run: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows if not r["stage"].startswith("teacher/")]


def _same_run(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    # the same arithmetic, summed in another order: equal to float rounding
    assert all(abs(x[2] - y[2]) <= 1e-4 * abs(x[2]) for x, y in zip(la, lb, strict=True)), (la, lb)
    wa, wb = load_file(a / "student" / "model.safetensors"), load_file(b / "student" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)
    ra, rb = (json.loads((r / "report.json").read_text()) for r in (a, b))
    assert abs(ra["student"]["accuracy"] - rb["student"]["accuracy"]) <= 0.01


def _reference(tmp_path: Path, recipe_dict: dict):
    """The tiny recipe with a global batch of 8 (4 x 2 micro-batches; DFT 4 x 3, so one of 2
    processes has a slot with nothing to run), trained by one process in `ref`; returns a function
    that writes the same recipe for another output folder (with `ref`'s teacher copied in)."""
    for st in recipe_dict["stages"]:
        st.update(batch_size=4, grad_accum=2)
    recipe_dict["stages"][2].update(grad_accum=3, max_steps=6)
    recipe_dict["data"]["root"] = str(tmp_path / "data")

    def recipe(name: str, teacher_from: str | None = "ref") -> Path:
        d = copy.deepcopy(recipe_dict)
        d["run"]["output_dir"] = str(tmp_path / name)
        path = tmp_path / f"{name}.toml"
        path.write_text(dumps_toml(d))
        if teacher_from is not None:  # the teacher is the same; train it once
            shutil.copytree(tmp_path / teacher_from / "teacher", tmp_path / name / "teacher")
        return path

    distill(parse_recipe(copy.deepcopy(recipe_dict), overrides=[f"run.output_dir={tmp_path / 'ref'}"]))
    return recipe


def _resumes_on_two_and_one(config: str, recipe, tmp_path: Path) -> Path:
    """A 2-process run under `config` killed with SIGKILL in DFT after its step-4 state, resumed on 2
    processes and (a copy) on 1 without a launcher: both end where the uninterrupted run ends.
    Returns the state folder the kill left."""
    _launch_and_kill(config, recipe("cut"), "dft", 4, tmp_path)
    state = tmp_path / "cut" / "state" / "dft" / "step-0000004"
    assert (state / "step.json").is_file() and not (tmp_path / "cut" / "dft").exists()
    kept = tmp_path / "kept"
    shutil.copytree(state, kept)
    shutil.copytree(tmp_path / "cut", tmp_path / "one")
    _launch(config, recipe("cut", teacher_from=None), "--resume")
    _same_run(tmp_path / "ref", tmp_path / "cut")
    one = recipe("one", teacher_from=None)
    distill(load_recipe(one), DistillOptions(resume=True))
    _same_run(tmp_path / "ref", tmp_path / "one")
    return kept


def _chunks(state: Path) -> dict[str, int]:
    meta = SafeReader(state / "weights").read_metadata()
    return {k: len(v.chunks) for k, v in meta.state_dict_metadata.items() if hasattr(v, "chunks")}


@pytest.mark.slow
def test_one_and_two_processes_train_alike_and_a_killed_run_resumes_on_one_or_two(tmp_path, recipe_dict):
    """2 processes under DDP, and under FSDP2 (student and teacher sharded), train what 1 does; the
    FSDP2 run, killed mid-DFT, resumes on 2 processes and on 1."""
    recipe = _reference(tmp_path, recipe_dict)
    _launch("ddp.yaml", recipe("ddp"))
    _same_run(tmp_path / "ref", tmp_path / "ddp")

    state = _resumes_on_two_and_one("fsdp.yaml", recipe, tmp_path)
    # FSDP2 sharded the student: the optimizer state of a decoder layer weight is in two halves, one
    # written by each process (nothing was gathered to save it)
    chunks = _chunks(state)
    layer = [k for k in chunks if "layers.0.mlp.up_proj.weight.exp_avg" in k and k.startswith("optim.state")]
    assert layer and all(chunks[k] == 2 for k in layer), chunks


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_train_alike_and_a_killed_zero3_run_resumes_anywhere(tmp_path, recipe_dict):
    """The shipped DeepSpeed configs: 2 processes under ZeRO-2, killed mid-DFT and resumed, train what
    1 does; under ZeRO-3 (the student partitioned, the teacher's layers sharded) too, resumed on 2
    processes and on 1 (a plain run reads the ZeRO state: the layout is DDP's)."""
    require_dev("deepspeed")
    # latent alignment in DFT: its projector pair runs on a blank image in the pad slot
    recipe_dict["stages"][2]["loss"] = {"latent": 1.0}
    recipe = _reference(tmp_path, recipe_dict)
    _launch_and_kill("zero2.yaml", recipe("zero2"), "dft", 4, tmp_path)
    _launch("zero2.yaml", recipe("zero2", teacher_from=None), "--resume")
    _same_run(tmp_path / "ref", tmp_path / "zero2")

    state = _resumes_on_two_and_one("zero3.yaml", recipe, tmp_path)
    # each tensor was kept whole by one of the two processes, and both wrote their share
    files = sorted(f.name for f in (state / "weights").glob("*.distcp") if f.stat().st_size > 0)
    assert len(files) == 2, files
    assert set(_chunks(state).values()) == {1}


@pytest.mark.slow
def test_on_policy_dft_on_two_ddp_processes_trains_what_one_does(tmp_path, recipe_dict):
    """Each process writes the student's answers for its own micro-batches, drawn from the micro-
    batch's place in the step, so 2 DDP processes write what 1 writes and train alike; FSDP2, which
    shards the student, is refused in one line before the stage trains."""
    recipe_dict["stages"][2]["on_policy"] = {"lmbda": 0.5, "temperature": 1.0, "max_new_tokens": 4}
    recipe = _reference(tmp_path, recipe_dict)
    _launch("ddp.yaml", recipe("ddp"))
    _same_run(tmp_path / "ref", tmp_path / "ddp")
    own = [
        json.loads(x).get("own_answers") for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    ]
    assert any(own), "no step trained on the student's answers"

    cmd, env = _command("fsdp.yaml", recipe("fsdp"))
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    assert "on_policy: FSDP2 shards the student, so a process cannot write its own answers alone" in p.stderr


def test_an_engine_that_shards_the_student_refuses_on_policy_in_one_line(tiny_student):
    """A process writes its answers alone only where it holds the whole student: one process, DDP and
    ZeRO-2 hand it over; FSDP2 (sharded) and ZeRO-3 refuse, naming the engine and what to do."""
    from lsd_edge.errors import TrainingError
    from lsd_edge.train.backends.base import Backend, Prepared, StudentStep
    from lsd_edge.train.backends.ddp import Ddp
    from lsd_edge.train.backends.fsdp import Fsdp2
    from lsd_edge.train.backends.zero import Zero

    step = StudentStep(tiny_student, None)
    p = Prepared(step, None, None, step)
    for backend in (Backend(), Ddp(SINGLE, None), Zero(SINGLE, None, 2)):
        assert backend.generating_student(p) is tiny_student
    step.sharded = False
    assert Fsdp2(SINGLE, None).generating_student(p) is tiny_student
    step.sharded = True
    for backend, engine in ((Fsdp2(SINGLE, None), "FSDP2"), (Zero(SINGLE, None, 3), "DeepSpeed ZeRO-3")):
        with pytest.raises(
            TrainingError, match=rf"^on_policy: {engine} shards the student, .*remove on_policy$"
        ):
            backend.generating_student(p)
