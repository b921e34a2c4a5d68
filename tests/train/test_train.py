"""The engine: loss steps, freezing, accumulation, NaN guard, resume after SIGKILL, the whole chain."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lsd_edge.data.dataset import BatchLoader, LlavaDataset
from lsd_edge.data.sampling import IndexStream
from lsd_edge.distill.objective import Counts, LatentProjector, loss_terms
from lsd_edge.distill.teacher import OnlineTeacher
from lsd_edge.errors import LsdEdgeError, ModelError, TrainingError
from lsd_edge.identity import Manifest
from lsd_edge.models.load import resolve_device
from lsd_edge.recipe.load import parse_recipe
from lsd_edge.recipe.schema import StageConfig
from lsd_edge.train import loop
from lsd_edge.train.pipeline import DistillOptions, distill
from lsd_edge.train.setup import lr_lambda, param_groups, total_steps
from lsd_edge.train.teacher import teacher_manifest

from ..helpers import REPO, scored_here


def _batches(processor, shapes_dir, n=8, per=8):
    ds = LlavaDataset(shapes_dir / "instruct.json", shapes_dir / "images", processor)
    loader = BatchLoader(ds, processor.tokenizer.pad_token_id)
    return [loader.batch(list(range(i, i + per))) for i in range(0, n, per)]


def _stage(**kw) -> StageConfig:
    base = dict(name="x", kind="dft", lr=1e-2, max_steps=1, batch_size=8)
    base.update(kw)
    return StageConfig.model_validate(base)


@pytest.mark.parametrize("term", ["ce", "response_kl", "visual_kl", "relation", "latent", "vision"])
def test_one_step_lowers_each_loss(term, processor, shapes_dir, tiny_teacher, tiny_student):
    student = copy.deepcopy(tiny_student).train()
    weights = {t: 0.0 for t in ("response_kl", "visual_kl", "relation", "latent", "vision")}
    if term != "ce":
        weights[term] = 1.0
    trainable = ["vision", "projector", "llm"]
    stage = _stage(
        loss={"ce": 1.0 if term == "ce" else 0.0, **weights, "latent_kind": "mse"}, trainable=trainable
    )
    (batch,) = _batches(processor, shapes_dir)
    counts = Counts.of([batch], 4)
    latent = None
    if term in ("latent", "vision"):
        pairs = stage.loss.latent_pairs if term == "latent" else []
        latent = LatentProjector(pairs, 16, 32, (32, 32) if term == "vision" else None)
    params = [p for p in student.parameters()] + (list(latent.parameters()) if latent else [])
    opt = torch.optim.SGD(params, lr=0.05)
    vocab = len(processor.tokenizer)
    before = loss_terms(student, OnlineTeacher(tiny_teacher), batch, stage, counts, vocab, latent)[term]
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_terms(student, OnlineTeacher(tiny_teacher), batch, stage, counts, vocab, latent)[term]
    assert after.item() < before.item()


def test_the_tower_term_against_a_plain_reference(processor, shapes_dir, tiny_teacher, tiny_student):
    """L_tower = sum over visual positions of (1 - cos(W v_s, v_t)) / visual positions, v the towers'
    feature layers (the hidden state the projector reads)."""
    stage = _stage(loss={"vision": 1.0, "latent_kind": "cosine"}, trainable=["vision", "projector"])
    (batch,) = _batches(processor, shapes_dir)
    counts = Counts.of([batch], 4)
    latent = LatentProjector([], 16, 32, (32, 32))
    got = loss_terms(
        tiny_student, OnlineTeacher(tiny_teacher), batch, stage, counts, len(processor.tokenizer), latent
    )
    with torch.no_grad():
        vs = tiny_student.model.vision_tower(batch.pixel_values, output_hidden_states=True).hidden_states[-1]
        vt = tiny_teacher.model.vision_tower(batch.pixel_values, output_hidden_states=True).hidden_states[-1]
        ref = (
            1 - F.cosine_similarity(latent.tower(vs.flatten(0, 1)), vt.flatten(0, 1), dim=-1)
        ).sum() / counts.visual
    torch.testing.assert_close(got["vision"].detach(), ref)
    with pytest.raises(ValueError, match="loss.vision: the vision-tower term trains the student's tower"):
        _stage(loss={"vision": 1.0})


def test_no_teacher_terms_without_distillation(processor, shapes_dir, tiny_student):
    (batch,) = _batches(processor, shapes_dir)
    terms = loss_terms(
        tiny_student, None, batch, _stage(kind="sft"), Counts.of([batch], 4), len(processor.tokenizer), None
    )
    assert set(terms) == {"ce"}


def test_accumulation_normalises_by_whole_batch(processor, shapes_dir, tiny_teacher, tiny_student):
    """Two micro-batches of 4 give the gradient of one batch of 8: every term divides by the
    count of the accumulated batch, not of each micro-batch."""
    stage = _stage()
    vocab = len(processor.tokenizer)
    ds = LlavaDataset(shapes_dir / "instruct.json", shapes_dir / "images", processor)
    loader = BatchLoader(ds, processor.tokenizer.pad_token_id)
    whole = loader.batch(list(range(8)))
    halves = [loader.batch(list(range(0, 4))), loader.batch(list(range(4, 8)))]

    def grads(batches):
        m = copy.deepcopy(tiny_student)
        counts = Counts.of(batches, 4)
        for b in batches:
            t = loss_terms(m, OnlineTeacher(tiny_teacher), b, stage, counts, vocab, None)
            sum(t.values()).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    assert torch.allclose(grads([whole]), grads(halves), rtol=1e-4, atol=1e-6)


def test_lr_schedule_and_steps():
    st = _stage(lr=1.0, warmup_steps=2, max_steps=10, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(st, 10)
    assert f(0) == 0.5 and f(1) == 1.0 and abs(f(2) - 1.0) < 1e-9 and abs(f(10) - 0.1) < 1e-9
    assert total_steps(_stage(max_steps=None, epochs=2, batch_size=4, grad_accum=2), 20) == 5


def test_index_stream_is_a_pure_function_of_position():
    a, b = IndexStream(10, 3), IndexStream(10, 3)
    first = a.take(0, 25)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert b.take(7, 18) == first[7:25]
    assert IndexStream(10, 4).take(0, 10) != first[:10]


# ------------------------------------------------------------------------------------------ whole runs


def _recipe(recipe_dict, **over):
    return parse_recipe(recipe_dict, overrides=[f"{k}={v}" for k, v in over.items()])


def test_distill_end_to_end(recipe_dict):
    recipe_dict["run"]["report_to"] = ["tensorboard"]
    r = _recipe(recipe_dict)
    report = distill(r)
    root = Path(r.run.output_dir)
    for key in ("teacher", "student"):
        assert set(report[key]) >= {"accuracy", "params", "size_mb"}
        assert report[key]["accuracy"] == scored_here(r, root / key), key
    assert report["student"]["params"] < report["teacher"]["params"]
    assert [s["name"] for s in report["stages"]] == ["dpt", "sft", "dft"]
    for name in ("teacher", "dpt", "sft", "dft", "student"):
        folder = root / name
        assert (folder / "model.safetensors").is_file() and (folder / "recipe.toml").is_file()
        assert (folder / "metrics.json").is_file() and (folder / "tokenizer.json").is_file()
    assert json.loads((root / "report.json").read_text()) == report
    assert (root / "loss_curve.png").stat().st_size > 1000
    log = [json.loads(line) for line in (root / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"teacher/pt", "teacher/sft", "dpt", "sft", "dft"}
    dft = [r for r in log if r["stage"] == "dft"]
    assert len(dft) == 4 and {"ce", "response_kl", "visual_kl", "relation"} <= set(dft[0])
    assert not (root / "state").exists() and not (root / "teacher-stages").exists()
    metrics = json.loads((root / "dft" / "metrics.json").read_text())
    assert "eval" in metrics and metrics["steps"] == 4
    check_tensorboard_events(root / "trackers" / r.run.name, dft)
    # the recipe copy in a checkpoint is the resolved recipe, loadable as it is
    assert parse_recipe(__import__("tomllib").loads((root / "student" / "recipe.toml").read_text())) == r


def check_tensorboard_events(folder: Path, dft: list[dict]) -> None:
    """run.report_to = ["tensorboard"]: every step's figures and each stage's eval accuracy."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(folder.glob("events.out.tfevents.*")), "no event file written"
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"dft/{k}" for k in ("loss", "ce", "response_kl", "lambda", "lr", "tokens_per_s")} <= tags
    assert {"teacher/pt/loss", "eval/teacher/accuracy", "eval/dft/accuracy"} <= tags
    losses = [(e.step, e.value) for e in events.Scalars("dft/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in dft]


def test_frozen_parameters_stay_bitwise(recipe_dict):
    recipe_dict["stages"] = [dict(recipe_dict["stages"][0], trainable=["projector"])]
    r = _recipe(recipe_dict)
    distill(r)
    root = Path(r.run.output_dir)
    from lsd_edge.models.build import build_tiny_model
    from lsd_edge.models.load import load_llava
    from lsd_edge.recipe.schema import TinyConfig

    t_model, proc = load_llava(str(root / "teacher"))
    s_model, _ = load_llava(str(root / "student"))
    teacher, student = t_model.state_dict(), s_model.state_dict()
    vision = [k for k in student if "vision_tower" in k]
    assert vision and all(torch.equal(student[k], teacher[k]) for k in vision)
    init = build_tiny_model(
        TinyConfig(**recipe_dict["student"]["tiny"]), proc, vision_from=t_model, seed=r.run.seed + 1
    )
    init_sd = init.state_dict()
    llm = [k for k in student if "language_model" in k or "lm_head" in k]
    assert llm and all(torch.equal(student[k], init_sd[k]) for k in llm)
    proj = [k for k in student if "multi_modal_projector" in k]
    assert any(not torch.equal(student[k], init_sd[k]) for k in proj)


def test_lr_scale_gives_a_group_its_own_rate(tiny_teacher):
    from lsd_edge.models.groups import group_modules, set_trainable

    model = copy.deepcopy(tiny_teacher)
    set_trainable(model, ["vision", "llm"])
    plain = param_groups(model, None, StageConfig(name="s", kind="pt", lr=1e-3, max_steps=1))
    assert len(plain) == 1 and "lr" not in plain[0]
    latent = LatentProjector([(0, 0)], 8, 8)
    groups = param_groups(
        model, latent, StageConfig(name="s", kind="pt", lr=1e-3, max_steps=1, lr_scale={"vision": 4})
    )
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    mods = group_modules(model)
    assert all(by_id[id(p)] == pytest.approx(4e-3) for p in mods["vision"].parameters())
    assert all(by_id[id(p)] == pytest.approx(1e-3) for p in mods["llm"].parameters())
    assert all(by_id[id(p)] == pytest.approx(1e-3) for p in latent.parameters())
    assert not any(id(p) in by_id for p in mods["projector"].parameters())  # frozen: in no group
    assert sum(len(g["params"]) for g in groups) == len(by_id)


def test_teacher_is_cached_and_reused(recipe_dict):
    r = _recipe(recipe_dict)
    distill(r)
    root = Path(r.run.output_dir)
    stamp = (root / "teacher" / "model.safetensors").stat().st_mtime_ns
    from lsd_edge.progress import QuietReporter

    rep = QuietReporter()
    distill(r, DistillOptions(restart=True), rep)
    assert (root / "teacher" / "model.safetensors").stat().st_mtime_ns == stamp
    assert any("reusing the cached teacher" in m for m in rep.messages)
    # a teacher made with other settings is never silently replaced
    changed = _recipe(recipe_dict, **{"teacher.stages[1].lr": 1e-3})
    with pytest.raises(
        LsdEdgeError,
        match=r"cached teacher in .* is stale: teacher.stages\[1\].lr changed \(0.003 -> 0.001\); delete it",
    ):
        distill(changed, DistillOptions(restart=True))


def test_settings_identity_leaves_out_defaults():
    # A cached teacher or finished stage is identified by the options that differ from the
    # defaults, so a release adding an option (with its default) does not invalidate earlier runs.
    from lsd_edge.identity import settings
    from lsd_edge.recipe.schema import StageConfig

    stage = StageConfig(name="sft", kind="sft", max_steps=10, lr=1e-3)
    ident = settings(stage)
    assert ident["lr"] == 1e-3 and ident["max_steps"] == 10
    assert not {"teacher_cache", "regenerate", "weight_decay", "schedule"} & set(ident)
    assert "chunk_size" not in ident.get("loss", {})
    assert settings(stage.model_copy(update={"lr": 1e-4})) != ident


def test_data_root_made_with_other_settings_is_refused(recipe_dict):
    from lsd_edge.data.prepare import prepare_data
    from lsd_edge.progress import QuietReporter

    r = _recipe(recipe_dict)
    prepare_data(r, QuietReporter())
    marker = Path(r.data.root) / "shapes.json"
    summary = json.loads(marker.read_text())
    assert summary["jitter"] == r.data.shapes.jitter and summary["out_dir"] == r.data.root
    before = marker.stat().st_mtime_ns
    prepare_data(r, QuietReporter())  # the same settings: kept as they are
    assert marker.stat().st_mtime_ns == before
    with pytest.raises(
        LsdEdgeError, match=r"ShapesVQA data in .* is stale: data.shapes.jitter changed \(1 -> 3\); delete it"
    ):
        prepare_data(_recipe(recipe_dict, **{"data.shapes.jitter": 3}), QuietReporter())
    # data an older generator made (no format in its identity) is not taken for today's
    identity = Path(r.data.root) / "identity.json"
    record = json.loads(identity.read_text())
    del record["tied_to"]["shapes format"]
    identity.write_text(json.dumps(record))
    with pytest.raises(LsdEdgeError, match=r"shapes format changed \(default -> 2\)"):
        prepare_data(r, QuietReporter())
    # and data an earlier lsd-edge made (no identity at all) is not taken either
    identity.unlink()
    with pytest.raises(
        LsdEdgeError, match=r"is stale: it has no identity.json \(made by an earlier lsd-edge"
    ):
        prepare_data(r, QuietReporter())


def test_data_root_with_other_files_is_refused(recipe_dict):
    from lsd_edge.data.prepare import prepare_data
    from lsd_edge.progress import QuietReporter

    root = Path(recipe_dict["data"]["root"])
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    with pytest.raises(LsdEdgeError, match="holds files not made by ShapesVQA"):
        prepare_data(_recipe(recipe_dict), QuietReporter())
    assert (root / "notes.txt").read_text() == "mine"


def test_existing_run_needs_resume_or_restart(recipe_dict):
    r = _recipe(recipe_dict)
    distill(r)
    with pytest.raises(LsdEdgeError, match="--resume .* --restart"):
        distill(r)
    # resuming a finished run redoes nothing and gives the same report
    before = json.loads((Path(r.run.output_dir) / "report.json").read_text())
    again = distill(r, DistillOptions(resume=True))
    assert again["student"] == before["student"] and again["stages"] == before["stages"]
    other = _recipe(recipe_dict, **{"stages[1].lr": 1e-4})
    with pytest.raises(
        LsdEdgeError,
        match=r"stage 'sft' in .* is stale: stages\[1\].lr changed \(0.003 -> default\); pass --restart",
    ):
        distill(other, DistillOptions(resume=True))


def test_nan_loss_stops_with_stage_step_and_term(recipe_dict, monkeypatch):
    from lsd_edge.distill import losses

    r = _recipe(recipe_dict, **{"stages[2].max_steps": 6})
    real = losses.relation_sum
    calls = {"n": 0}

    def poisoned(s, t):
        calls["n"] += 1
        return (
            real(s, t) * float("nan") if calls["n"] > 9 else real(s, t)
        )  # dpt makes 3 calls, dft 2 a step: NaN at dft step 4

    monkeypatch.setattr(losses, "relation_sum", poisoned)
    with pytest.raises(TrainingError, match=r"dft step \d+: loss term 'relation' is nan"):
        distill(r)
    root = Path(r.run.output_dir)
    assert (root / "sft" / "metrics.json").is_file(), "finished stages are kept"
    assert list((root / "state" / "dft").glob("step-*")), "the last good step state is kept"


# --------------------------------------------------------------------------------------------- resume


def _cli(args, cwd, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", LSD_EDGE_DEBUG="0")
    return subprocess.Popen(
        [sys.executable, "-m", "lsd_edge", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kw,
    )


def _write_recipe(recipe_dict, path: Path) -> Path:
    from lsd_edge.recipe.toml import dumps_toml

    path.write_text(dumps_toml(recipe_dict))
    return path


def _kill_when(proc, log: Path, stage: str, step: int, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if log.is_file():
            for line in log.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec["stage"] == stage and rec["step"] >= step:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return True
        time.sleep(0.005)
    raise AssertionError("the run never reached the kill point")


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, recipe_dict):
    recipe_dict["stages"][1]["max_steps"] = 12
    recipe_dict["stages"][2]["max_steps"] = 12
    recipe_dict["data"]["root"] = str(tmp_path / "data")
    ref = copy.deepcopy(recipe_dict)
    ref["run"]["output_dir"] = str(tmp_path / "ref")
    cut = copy.deepcopy(recipe_dict)
    cut["run"]["output_dir"] = str(tmp_path / "cut")
    p = _cli(["distill", str(_write_recipe(ref, tmp_path / "ref.toml"))], REPO)
    assert p.wait(timeout=300) == 0, p.stdout.read().decode()

    recipe = _write_recipe(cut, tmp_path / "cut.toml")
    # kill once in the middle of SFT, once in the middle of DFT, resuming each time
    mid_stage = []
    for stage, step in (("sft", 5), ("dft", 7)):
        p = _cli(["distill", str(recipe)] + (["--resume"] if stage == "dft" else []), REPO)
        _kill_when(p, tmp_path / "cut" / "log.jsonl", stage, step)
        mid_stage.append(not (tmp_path / "cut" / stage / "metrics.json").exists())
    assert any(mid_stage), "no kill landed inside a stage"
    p = _cli(["distill", str(recipe), "--resume"], REPO)
    assert p.wait(timeout=300) == 0, p.stdout.read().decode()

    a = json.loads((tmp_path / "ref" / "report.json").read_text())
    b = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert a["student"]["accuracy"] == b["student"]["accuracy"]
    assert [s["last_losses"] for s in a["stages"]] == [s["last_losses"] for s in b["stages"]]
    wa = load_file(tmp_path / "ref" / "student" / "model.safetensors")
    wb = load_file(tmp_path / "cut" / "student" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [json.loads(x) for x in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    strip = lambda rows: [(r["stage"], r["step"], r["loss"]) for r in rows]  # noqa: E731
    assert strip(la) == strip(lb)


class _Cut(Exception):
    pass


def test_an_on_policy_run_cut_and_resumed_matches_an_uncut_one(tmp_path, recipe_dict, monkeypatch):
    """The student's answers are drawn from (seed, stage, step, micro-batch), so a DFT with on_policy
    cut after its checkpoint at step 2 and resumed writes the same answers: the same log, the same
    weights as a run never cut."""
    recipe_dict["stages"][2]["on_policy"] = {"lmbda": 0.5, "temperature": 1.0, "max_new_tokens": 4}
    recipe_dict["stages"][2]["max_steps"] = 6
    ref = copy.deepcopy(recipe_dict)
    ref["run"]["output_dir"] = str(tmp_path / "ref")
    distill(_recipe(ref))
    cut = copy.deepcopy(recipe_dict)
    cut["run"]["output_dir"] = str(tmp_path / "cut")
    real = loop.check_finite

    def cut_at_step_4(job, sums, step):
        if job.key == "dft" and step == 3:
            raise _Cut
        real(job, sums, step)

    monkeypatch.setattr(loop, "check_finite", cut_at_step_4)
    with pytest.raises(_Cut):
        distill(_recipe(cut))
    monkeypatch.setattr(loop, "check_finite", real)
    distill(_recipe(cut), DistillOptions(resume=True))

    rows = {}
    for run in ("ref", "cut"):
        log = [json.loads(x) for x in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        dft = [r for r in log if r["stage"] == "dft"]
        rows[run] = [(r["step"], r["loss"], r["ce"], r["own_answers"]) for r in dft]
    assert rows["ref"] == rows["cut"] and len(rows["ref"]) == 6
    own = [row[-1] for row in rows["ref"]]
    assert any(own) and not all(own), "some steps train on the student's answers, some on the data's alone"
    wa = load_file(tmp_path / "ref" / "student" / "model.safetensors")
    wb = load_file(tmp_path / "cut" / "student" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_teacher_stage_made_with_other_settings_is_refused(recipe_dict):
    """The teacher's finished stages are reused when a teacher training is resumed, never when the
    teacher's settings changed since."""
    r = _recipe(recipe_dict)
    folder = Path(r.run.output_dir) / "teacher-stages" / "pt"
    folder.mkdir(parents=True)
    other = _recipe(recipe_dict, **{"teacher.stages[0].lr": 1e-3})
    Manifest("teacher stage 'pt' in", {**teacher_manifest(other).tied_to, "stage": 0}).write(folder)
    (folder / "metrics.json").write_text("{}")
    with pytest.raises(
        LsdEdgeError,
        match=r"teacher stage 'pt' in .* is stale: teacher.stages\[0\].lr changed \(0.001 -> 0.003\); delete it",
    ):
        distill(r)


def test_cuda_where_there_is_none_is_refused():
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    with pytest.raises(
        ModelError, match=r"run.device = 'cuda' but CUDA is not available here; use 'auto' or 'cpu'"
    ):
        resolve_device("cuda")
    with pytest.raises(ModelError, match=r"--device gpu: choose auto, cpu or cuda"):
        resolve_device("gpu", "--device")


def test_the_embedded_default_prints_no_warning(tmp_path):
    """A new user's first run prints progress and the results, nothing else: `lsd-edge distill
    recipes/tiny.toml` cut to a few steps per stage (a resume state written in each, where the
    one-process checkpoint warning came from), in a fresh process (where DeepSpeed, imported by
    Accelerate's unwrapping, used to announce its accelerator), with Python's default warning filters."""
    sets = [
        f"run.output_dir={tmp_path / 'run'}",
        f"data.root={tmp_path / 'data'}",
        "data.shapes.n_train=40",
        "data.shapes.n_eval=4",
        "run.checkpoint_every=1",
    ]
    for stages, n in (("teacher.stages", 2), ("stages", 3)):
        sets += [f"{stages}[{i}].max_steps=2" for i in range(n)]
        sets += [f"{stages}[{i}].batch_size=4" for i in range(n)]
    args = [arg for s in sets for arg in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "LSD_EDGE_DEBUG")}
    proc = subprocess.run(
        [sys.executable, "-m", "lsd_edge", "distill", str(REPO / "recipes" / "tiny.toml"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "student after dft" in output.lower() or "dft" in output, output
    warned = [line for line in output.splitlines() if "warn" in line.lower()]
    assert not warned, "\n".join(warned)
