"""Real data never crashes a run: every stage kind over random batch compositions of messy LLaVA data
(tests/messy.py), with the online teacher and with a teacher cache, in one process and in two.

Batches are drawn at random (seeded) with small batch sizes and accumulation, so steps meet
micro-batches without images, without a valid sample, with several images per sample and with
truncated samples; every run must finish its steps with finite losses and report what it skipped.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch

from lsd_edge.data.dataset import LlavaDataset
from lsd_edge.distill.cache_build import build_cache
from lsd_edge.distill.teacher import OnlineTeacher, online_targets
from lsd_edge.distill.teacher_cache import TeacherCache, needed_parts
from lsd_edge.errors import DataError
from lsd_edge.identity import Manifest
from lsd_edge.progress import QuietReporter
from lsd_edge.recipe.load import load_recipe
from lsd_edge.recipe.schema import RunConfig, StageConfig
from lsd_edge.recipe.toml import dumps_toml
from lsd_edge.train.backends.base import Backend
from lsd_edge.train.loop import StageJob, run_stage
from lsd_edge.train.pipeline import distill
from lsd_edge.workspace import Workspace

from ..helpers import REPO, run
from ..messy import KINDS, expected_skips, messy_data
from .test_recipes import REAL, real_overrides

MAX_LENGTH = 64
KINDS_OF_STAGE = ("pt", "dpt", "sft", "dft")
ONLINE_PAIRS = [["projector", "projector"], [-1, -1]]


def stage_config(kind: str, r: random.Random, cached: bool) -> StageConfig:
    """A stage of `kind` with every loss term of its kind on, at a random micro-batch size and accumulation."""
    loss: dict = {}
    if kind in ("dpt", "dft"):
        loss = {"latent": 0.5, "latent_pairs": [["projector", "projector"]] if cached else ONLINE_PAIRS}
        loss["chunk_size"] = r.choice([0, 0, 7])
    return StageConfig.model_validate(
        {
            "name": kind,
            "kind": kind,
            "trainable": ["projector", "llm"] if kind != "dpt" else ["projector"],
            "lr": 1e-3,
            "max_steps": 4,
            "batch_size": r.randint(1, 3),
            "grad_accum": r.randint(1, 4),
            "loss": loss,
        }
    )


def make_cache(
    folder: Path, dataset: LlavaDataset, teacher, stage: StageConfig, vocab_rows: int
) -> TeacherCache:
    build_cache(
        folder,
        dataset,
        lambda batch: online_targets(teacher, batch, False),
        stage=stage.name,
        identity=Manifest("the teacher cache in", {"test": 1}),
        parts=needed_parts(stage),
        top_k=8,
        temperature=stage.loss.temperature,
        vocab_rows=vocab_rows,
        teacher_hidden=teacher.config.text_config.hidden_size,
        batch_size=3,
    )
    return TeacherCache(folder)


def train_every_kind(
    data: Path, processor, teacher, student, out: Path, seed: int, mode: str, backend: Backend | None = None
):
    """Each stage kind trained for a few steps at a random batch shape, distilling from the teacher
    (`mode` online), its decoder layers sharded over the processes (sharded) or a cache of it (cache);
    the results, by kind."""
    cached = mode == "cache"
    backend = backend or Backend()
    dist = backend.dist
    r = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    dataset = LlavaDataset(data, data.parent / "images", processor, max_length=MAX_LENGTH)
    results = {}
    for index, kind in enumerate(KINDS_OF_STAGE):
        stage = stage_config(kind, r, cached)
        teacher_side = None
        if stage.distills:
            teacher_side = OnlineTeacher(teacher)
            if cached:
                # every process builds the same cache (no collectives in it), in its own folder
                teacher_side = make_cache(
                    out / f"cache-{kind}-{dist.rank}", dataset, teacher, stage, len(processor.tokenizer)
                )
        job = StageJob(
            key=f"{kind}-{seed}",
            stage=stage,
            index=index,
            model=copy.deepcopy(student),
            processor=processor,
            teacher=teacher_side,
            dataset=dataset,
            run=RunConfig(seed=seed, checkpoint_every=0, log_every=1),
            bad_samples="skip",
            workspace=Workspace(out),
            device=torch.device("cpu"),
            backend=backend,
        )
        res = run_stage(job, QuietReporter())
        results[kind] = (res.steps, res.last_terms, res.bad_samples, stage.batch_size, stage.grad_accum)
    return results


def check_results(results, kinds: list[str]) -> None:
    expected = expected_skips(kinds)
    for kind, (steps, terms, bad, *_shape) in results.items():
        assert steps == 4, kind
        assert terms and all(math.isfinite(v) for v in terms.values()), (kind, terms)
        if kind in ("dpt", "dft"):
            assert {"response_kl", "visual_kl", "relation", "latent"} <= set(terms), kind
        # only reasons the data holds, never more often than it holds them
        assert set(bad["by_reason"]) <= set(expected), (kind, bad)
        assert all(n <= expected[k] for k, n in bad["by_reason"].items()), (kind, bad, expected)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    out = tmp_path_factory.mktemp("messy")
    return messy_data(out, seed=0, n=60, image_size=16)


@pytest.mark.parametrize("mode", ["online", "cache"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_stage_kind_trains_on_messy_data(
    messy, processor, tiny_teacher, tiny_student, tmp_path, seed, mode, capsys
):
    data, kinds = messy
    results = train_every_kind(data, processor, tiny_teacher, tiny_student, tmp_path, seed, mode)
    check_results(results, kinds)
    skipped = Counter()
    for _steps, _terms, bad, *_ in results.values():
        skipped.update(bad["by_reason"])
    with capsys.disabled():
        shapes = {k: f"{v[3]}x{v[4]}" for k, v in results.items()}
        print(f"\n  messy seed {seed} {mode} {shapes}: skipped {dict(skipped)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_worker(rank, port, data, teacher_dir, student_dir, out, seed, mode, queue):
    from lsd_edge.models.load import load_llava
    from lsd_edge.train.backends.select import setup

    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(env, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    if mode == "sharded":  # what `accelerate launch` with recipes/accelerate/fsdp.yaml sets
        os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    torch.set_num_threads(1)
    teacher, processor = load_llava(str(teacher_dir))
    student, _ = load_llava(str(student_dir))
    backend, _ = setup(RunConfig(device="cpu"), out / "trackers")
    try:
        layers = len(teacher.model.language_model.layers)
        assert backend.shard_teacher(teacher) == (layers if mode == "sharded" else 0)
        results = train_every_kind(data, processor, teacher, student, out, seed, mode, backend)
        queue.put((rank, results))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode", ["online", "sharded", "cache"])
def test_two_processes_train_every_stage_kind_on_messy_data(messy, teacher_dir, student_dir, tmp_path, mode):
    """Two processes over the same messy stream: each takes its share of every step, so one may hold
    images and the other none, or a slot with no valid sample; both finish with the same figures."""
    import torch.multiprocessing as mp

    data, kinds = messy
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    args = (port, data, teacher_dir, student_dir, tmp_path, 3, mode, queue)
    procs = [ctx.Process(target=_two_process_worker, args=(rank, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = dict(queue.get(timeout=5) for _ in range(2))
    check_results(got[0], kinds)
    # losses and bad-sample counts are summed over processes: every process reports the same, and
    # the figures of one process running the whole steps
    assert got[0] == got[1]
    from lsd_edge.models.load import load_llava

    teacher, processor = load_llava(str(teacher_dir))
    student, _ = load_llava(str(student_dir))
    one = train_every_kind(
        data, processor, teacher, student, tmp_path / "one", 3, "cache" if mode == "cache" else "online"
    )
    for kind, (steps, terms, bad, *shape) in one.items():
        steps2, terms2, bad2, *shape2 = got[0][kind]
        # the same samples skipped (which ids a process shows as examples differs)
        assert (steps, shape, bad["by_reason"], bad["kept"]) == (
            steps2,
            shape2,
            bad2["by_reason"],
            bad2["kept"],
        )
        assert terms.keys() == terms2.keys() and all(
            terms[t] == pytest.approx(terms2[t], rel=1e-4, abs=1e-6) for t in terms
        ), (kind, terms, terms2)


def test_error_policy_stops_at_the_first_bad_sample_with_its_id(messy, processor, tiny_student, tmp_path):
    data, kinds = messy
    dataset = LlavaDataset(data, data.parent / "images", processor, max_length=MAX_LENGTH)
    stage = StageConfig.model_validate(
        {"name": "sft", "kind": "sft", "lr": 1e-3, "max_steps": 20, "batch_size": 4}
    )
    job = StageJob(
        key="sft",
        stage=stage,
        index=0,
        model=copy.deepcopy(tiny_student),
        processor=processor,
        teacher=None,
        dataset=dataset,
        run=RunConfig(checkpoint_every=0),
        bad_samples="error",
        workspace=Workspace(tmp_path),
        device=torch.device("cpu"),
    )
    with pytest.raises(DataError) as e:
        run_stage(job, QuietReporter())
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("sample ") and "data.bad_samples = 'skip'" in msg
    reasons = {r for _, r in KINDS.values() if r}
    assert any(f": {r}" in msg for r in reasons), msg


# ------------------------------------------------------------------------------- whole recipes


def messy_recipe(recipe_dict: dict, messy_root: Path, policy: str = "skip") -> dict:
    """The tiny recipe with every data set (pre-training, instructions, eval) the messy file."""
    r = copy.deepcopy(recipe_dict)
    r["data"] = {
        "root": str(messy_root),
        "max_length": MAX_LENGTH,
        "bad_samples": policy,
        **{name: {"path": "messy.json", "images": "images"} for name in ("pretrain", "instruct", "eval")},
    }
    for st in r["stages"]:
        st.update(batch_size=3, grad_accum=2)
    r["stages"][0]["teacher_cache"] = "auto"  # dpt from a cache, dft from the online teacher
    return r


def test_distill_command_over_messy_data_reports_every_skip_reason(
    recipe_dict, tmp_path, monkeypatch, capsys
):
    data, kinds = messy_data(tmp_path / "messy", seed=5, n=48)
    path = tmp_path / "messy.toml"
    path.write_text(dumps_toml(messy_recipe(recipe_dict, data.parent)))
    code, out, err = run(monkeypatch, capsys, "distill", str(path))
    assert code == 0, err[-3000:]
    report = json.loads((Path(recipe_dict["run"]["output_dir"]) / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["dpt", "sft", "dft"]
    expected = expected_skips(kinds)
    for stage in report["stages"]:
        by_reason = stage["bad_samples"]["by_reason"]
        assert by_reason and all(n <= expected[r] for r, n in by_reason.items()), stage["bad_samples"]
    text = " ".join((out + err).split())
    # each stage's closing line names every reason it met, with a count
    for stage in report["stages"]:
        bad = stage["bad_samples"]
        assert f"{stage['name']}: skipped {bad['total']} bad sample(s)" in text
        for reason, n in bad["by_reason"].items():
            assert f"{n} {reason} (e.g." in text, (reason, text[-2000:])


def test_distill_command_over_messy_data_stops_on_a_bad_sample_under_error(
    recipe_dict, tmp_path, monkeypatch, capsys
):
    data, _ = messy_data(tmp_path / "messy", seed=5, n=48)
    path = tmp_path / "messy.toml"
    path.write_text(dumps_toml(messy_recipe(recipe_dict, data.parent, "error")))
    code, _, err = run(monkeypatch, capsys, "distill", str(path))
    assert code == 1 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]  # below the progress bar
    assert re.search(r"sample \S+ in \S+messy\.json: [a-z ]+", line), line
    assert "data.bad_samples = 'skip'" in line


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_recipe_trains_on_messy_data_on_standins(name, standins, tmp_path):
    """The shipped recipe, its own max_length (2048) and bad_samples, over messy data with
    conversations longer than 2048 tokens, on the real-shaped stand-ins."""
    data, kinds = messy_data(
        standins["data"] / f"messy-{name}", seed=7, n=len(KINDS), image_size=30, long=2100
    )
    sub = data.parent.name
    sets = real_overrides(standins, name, tmp_path / "run")
    for ds in ("pretrain", "instruct", "eval"):
        sets += [f"data.{ds}.path={sub}/messy.json", f"data.{ds}.images={sub}/images"]
    for i in range(3):  # each stage reads every record once (4 steps of 8 samples)
        sets += [f"stages[{i}].max_steps=4", f"stages[{i}].batch_size=4"]
    recipe = load_recipe(REPO / "recipes" / f"{name}.toml", sets)
    assert recipe.data.max_length == 2048 and recipe.data.bad_samples == "skip"
    report = distill(recipe)
    assert [s["name"] for s in report["stages"]] == ["dpt", "sft", "dft"]
    expected = expected_skips(kinds)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log)
    for stage in report["stages"]:
        # every record was read: every skip reason is met, as often as the data holds it
        assert stage["bad_samples"]["by_reason"] == expected, stage["bad_samples"]
        assert stage["bad_samples"]["kept"] == {
            "truncated": kinds.count("long-answer") + kinds.count("long-multi-image")
        }


def test_eval_command_over_messy_data_names_what_it_skipped(teacher_dir, tmp_path, monkeypatch, capsys):
    data, kinds = messy_data(tmp_path / "messy", seed=1, n=40)
    code, out, err = run(
        monkeypatch, capsys, "eval", str(teacher_dir), "--data", str(data), "--max-new-tokens", "2"
    )
    assert code == 0, err
    text = " ".join(err.split())
    skipped = {r: n for r, n in expected_skips(kinds).items() if r != "truncated"}  # eval does not cut
    assert f"skipped {sum(skipped.values())} bad sample(s): " in text
    for reason, n in skipped.items():
        assert f"{n} {reason} (e.g." in text, reason
