"""lsd-edge bench: the JSON schema, one process per row, a tiny bench end to end, one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from lsd_edge.bench.machine import memory_bandwidth
from lsd_edge.bench.plan import BenchSettings, bench_defaults, eval_questions, plan
from lsd_edge.bench.report import MACHINE_FIELDS, RESULT_FIELDS, check_schema
from lsd_edge.bench.runner import bench, efficiency_ratios, roofline
from lsd_edge.bench.torch_rows import torch_decode_bytes
from lsd_edge.bench.worker import split_p50
from lsd_edge.cli.main import main
from lsd_edge.errors import BenchError
from lsd_edge.evaluate.score import exact_match
from lsd_edge.models.archs import Arch
from lsd_edge.runtime.onnx.runner import OnnxRunner

from ..helpers import one_red_line, run


def _cli(*args: str) -> tuple[int, str, str]:
    """`lsd-edge ARGS` in this process (module fixtures cannot use capsys/monkeypatch)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["lsd-edge", *args])
        mp.delenv("LSD_EDGE_DEBUG", raising=False)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def _small(shapes_dir: Path, data: Path | None = None) -> list[str]:
    data = data or shapes_dir / "eval.json"
    return [
        "--prompts", "2", "--max-new-tokens", "4", "--repeats", "1", "--warmup", "1",
        "--eval-samples", "3", "--data", str(data), "--images", str(shapes_dir / "images"),
        "--threads", "1", "--copy-mb", "8",
    ]  # fmt: skip


EVAL_NEW_TOKENS = 8  # the bench's accuracy answers, without a recipe


def _teacher_graded(shapes_dir: Path, teacher_dir: Path, out: Path) -> Path:
    """The eval data with the teacher's own answers as references to the first and third question and a
    wrong one to the second: the teacher's accuracy on those three is 2/3, whatever its weights."""
    from lsd_edge.runtime.torch_runner import TorchRunner

    recs = json.loads((shapes_dir / "eval.json").read_text())
    items = eval_questions(shapes_dir / "eval.json", shapes_dir / "images", 3)
    teacher = TorchRunner(teacher_dir)
    for i, (rec, it) in enumerate(zip(recs, items, strict=False)):
        own = teacher.generate(it["image"], it["question"], EVAL_NEW_TOKENS).text
        assert own.strip(), "the teacher answers something"
        rec["conversations"][1]["value"] = "no such answer" if i == 1 else own
    out.write_text(json.dumps(recs))
    return out


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, lively_dir, onnx_dir, shapes_dir):
    """The command on a tiny teacher and the int8 ONNX student: (exit code, stdout, JSON, chart, data).
    The teacher is the lively model (tests/helpers.py): an untrained one at the initializer's scale
    may answer nothing but whitespace, which no reference can be made of."""
    tmp = tmp_path_factory.mktemp("bench")
    data = _teacher_graded(shapes_dir, lively_dir, tmp / "eval.json")
    args = ["bench", "--teacher", str(lively_dir), "--onnx", str(onnx_dir), "--variant", "int8"]
    code, out, err = _cli(
        *args, *_small(shapes_dir, data), "--json", str(tmp / "b.json"), "--plot", str(tmp / "b.png")
    )
    assert code == 0, err
    return out, json.loads((tmp / "b.json").read_text()), tmp / "b.png", data


@pytest.mark.slow  # two worker processes, each importing torch or onnxruntime
def test_tiny_bench_json_schema_table_and_chart(tiny_bench, onnx_dir, shapes_dir):
    out, data, png, eval_data = tiny_bench
    assert check_schema(data) == []
    teacher, onnx = data["results"]
    assert (teacher["name"], teacher["backend"], teacher["precision"]) == ("teacher", "torch", "fp32")
    assert (onnx["name"], onnx["backend"], onnx["precision"]) == ("student", "onnx", "int8")
    for r in data["results"]:
        assert r["runs"] == 2 and r["new_tokens"] == 4 and r["accuracy_samples"] == 3
        assert r["decode_tokens_per_s"] > 0 and r["ttft_ms_p90"] >= r["ttft_ms_p50"] > 0
        assert r["params"] > 0 and r["size_mb"] > 0
        assert r["roofline_fraction"] > 0 and r["weight_mb_per_token"] > 0
    # accuracy: a known value for the teacher, the scorer's on the runner's answers for the student
    assert data["settings"]["eval_max_new_tokens"] == EVAL_NEW_TOKENS
    assert teacher["accuracy"] == pytest.approx(2 / 3)
    items = eval_questions(eval_data, shapes_dir / "images", 3)
    student = OnnxRunner(onnx_dir, variant="int8")
    answers = [student.generate(it["image"], it["question"], EVAL_NEW_TOKENS).text for it in items]
    hits = [exact_match(a, it["answer"]) for a, it in zip(answers, items, strict=True)]
    assert onnx["accuracy"] == sum(hits) / len(hits)
    assert data["machine"]["bandwidth_gb_s"] > 0 and data["settings"]["threads"] == 1
    (ratio,) = data["ratios"]
    assert ratio["vs"] == "teacher (torch fp32)" and ratio["name"] == "student (onnx int8)"
    assert ratio["decode_speedup"] == pytest.approx(
        onnx["decode_tokens_per_s"] / teacher["decode_tokens_per_s"]
    )
    assert "lsd-edge bench" in out and "student (onnx int8) vs teacher (torch fp32): decode" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # two worker processes, each importing torch or onnxruntime
def test_every_row_splits_its_time_to_first_token(tiny_bench, teacher_dir, onnx_dir):
    """vision + prefill + first token: per generation they make up its TTFT (to the 3 decimals the
    JSON keeps), as medians they sit beside the TTFT's; visual tokens per image from the config."""
    out, data, _, _ = tiny_bench
    for r in data["results"]:
        parts = [r["vision_ms_p50"], r["prefill_ms_p50"], r["first_token_ms_p50"]]
        assert all(v >= 0 for v in parts) and r["vision_ms_p50"] > 0 and r["prefill_ms_p50"] > 0
        assert sum(parts) <= 1.5 * r["ttft_ms_p90"]
        for g in r["samples"]:
            split = g["vision_ms"] + g["prefill_ms"] + g["first_token_ms"]
            assert split == pytest.approx(g["ttft_ms"], abs=2e-3)
            assert min(g["vision_ms"], g["prefill_ms"], g["first_token_ms"]) >= 0
    teacher, onnx = data["results"]
    # 16 px images, patch 8: 2 x 2 patches, as the ONNX runner's vision encoder returns them
    assert teacher["visual_tokens"] == onnx["visual_tokens"] == OnnxRunner(onnx_dir).n_image_tokens == 4
    assert onnx["params_by_group"]["total"] == onnx["params"] and onnx["params_by_group"]["vision"] > 0
    assert "TTFT split ms" in out and "vis/pre/1st" in out


def _slowed(fn, seconds: float):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slow


class _SlowSession:
    """An ONNX Runtime session whose run takes `seconds` longer."""

    def __init__(self, session, seconds: float):
        self.session, self.run = session, _slowed(session.run, seconds)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_runners_time_the_vision_encoder_where_it_runs(teacher_dir, onnx_dir, shapes_dir):
    """A vision encoder made 0.1 s slower shows in the vision part, not in the prefill; a question
    without an image has no vision part."""
    from lsd_edge.runtime.torch_runner import TorchRunner

    (it,) = eval_questions(shapes_dir / "eval.json", shapes_dir / "images", 1)
    torch_runner, onnx_runner = TorchRunner(teacher_dir), OnnxRunner(onnx_dir, variant="int8")
    tower = torch_runner.model.model.vision_tower
    tower.forward = _slowed(tower.forward, 0.1)
    onnx_runner.sessions["vision_encoder"] = _SlowSession(onnx_runner.sessions["vision_encoder"], 0.1)
    for runner in (torch_runner, onnx_runner):
        g = runner.generate(it["image"], it["question"], 3, ignore_eos=True)
        assert g.vision_s >= 0.1 and 0 <= g.prefill_s < 0.1 and g.first_token_s >= 0
        assert g.vision_s + g.prefill_s + g.first_token_s == pytest.approx(g.ttft_s, abs=1e-9)
        plain = runner.generate(None, it["question"], 3, ignore_eos=True)
        assert plain.vision_s is None and 0 <= plain.prefill_s < 0.1 and plain.first_token_s >= 0
    # the hooks that time the tower are gone after the generation
    assert not tower._forward_pre_hooks and not torch_runner.model.model.multi_modal_projector._forward_hooks


@pytest.mark.slow  # two worker processes, each importing torch or onnxruntime
def test_each_row_runs_in_its_own_process(tiny_bench):
    _, data, _, _ = tiny_bench
    teacher, onnx = data["results"]
    assert len({teacher["pid"], onnx["pid"], os.getpid()}) == 3
    # The ONNX row never imported torch, so its memory is ONNX Runtime's alone.
    assert teacher["torch_imported"] and not onnx["torch_imported"]
    assert onnx["peak_mem_mb"] < teacher["peak_mem_mb"]


def test_schema_problems_are_named():
    assert check_schema({"schema_version": 2, "machine": {}, "results": []}) == [
        "schema_version 2 is not 1",
        "machine.label: missing",
        "machine.cores: missing",
        "machine.memory_gib: missing",
        "machine.gpu: missing",
        "machine.bandwidth_gb_s: missing",
        "results: not a non-empty list",
    ]
    row = {"name": "x", "decode_tokens_per_s": "fast"}
    problems = check_schema({"schema_version": 1, "machine": {"label": ""}, "results": [row]})
    assert (
        "results[0].decode_tokens_per_s: str, not float" in problems
        and "results[0].params: missing" in problems
    )


def test_the_split_is_checked_where_a_row_has_it():
    """Added within schema version 1: an older JSON without the split conforms, a wrong type does not."""
    row = {k: types[0](1) for k, types in RESULT_FIELDS.items()}
    doc = {"schema_version": 1, "machine": dict.fromkeys(MACHINE_FIELDS, ""), "results": [row]}
    assert check_schema(doc) == []
    row.update(vision_ms_p50=None, prefill_ms_p50=2.5, first_token_ms_p50=0.5, visual_tokens=196)
    assert check_schema(doc) == []
    row.update(prefill_ms_p50="fast", visual_tokens=19.6)
    assert check_schema(doc) == [
        "results[0].prefill_ms_p50: str, not float",
        "results[0].visual_tokens: float, not int",
    ]


def test_split_medians_leave_out_a_part_no_generation_had():
    from lsd_edge.runtime.textgen import Generation

    gens = [
        Generation("", [1], 9, ttft_s=t, total_s=1.0, vision_s=v, prefill_s=p)
        for t, v, p in ((0.010, 0.004, 0.005), (0.012, 0.006, 0.005), (0.020, 0.005, 0.013))
    ]
    split = split_p50(gens)
    assert split["vision_ms_p50"] == pytest.approx(5.0) and split["prefill_ms_p50"] == pytest.approx(5.0)
    assert split["first_token_ms_p50"] == pytest.approx(1.0)
    plain = [Generation("", [1], 9, ttft_s=0.01, total_s=1.0, prefill_s=0.008)]
    assert split_p50(plain) == {
        "vision_ms_p50": None,
        "prefill_ms_p50": pytest.approx(8.0),
        "first_token_ms_p50": pytest.approx(2.0),
    }


def test_edge_archs_are_bench_rows():
    targets, source, _ = plan(None, None, [], ["qwen0.5b", "qwen0.5b-edge-b16"], BenchSettings())
    assert [(t.name, t.backend, t.variant) for t in targets] == [
        ("qwen0.5b", "torch", None),
        ("qwen0.5b", "onnx", "int8"),
        ("qwen0.5b-edge-b16", "torch", None),
        ("qwen0.5b-edge-b16", "onnx", "int8"),
    ]
    assert "qwen0.5b-edge-b16" in source


def test_bench_help_names_every_arch(monkeypatch, capsys):
    from lsd_edge.models.archs import ARCHS

    code, out, _ = run(monkeypatch, capsys, "bench", "--help")
    flat = " ".join(out.replace("│", " ").split())
    assert code == 0 and all(name in flat for name in ARCHS)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in ARCHS)


def test_roofline_and_ratios():
    top, frac = roofline(decode_tps=20.0, weight_bytes=1e9, bandwidth=40e9)
    assert top == 40.0 and frac == 0.5

    class Row:
        def __init__(self, name, role, tps, mem, size, params, acc):
            self.label, self.role, self.decode_tokens_per_s, self.peak_mem_mb = name, role, tps, mem
            self.size_mb, self.params, self.accuracy = size, params, acc

    rows = [Row("s", "student", 50, 100, 1, 10, 0.8), Row("t", "teacher", 10, 400, 8, 80, 0.9)]
    (q,) = efficiency_ratios(rows)
    assert q["vs"] == "t" and q["decode_speedup"] == 5 and q["memory_ratio"] == 0.25
    assert q["size_ratio"] == 0.125 and q["accuracy_delta"] == pytest.approx(-0.1)
    assert efficiency_ratios(rows[:1]) == []


def test_memory_bandwidth_is_positive():
    assert memory_bandwidth(mb=4, threads=2, repeats=2) > 0


def test_decode_bytes_count_tied_tables_once(tiny_teacher, tiny_student):
    """Per decode step: decoder layers, final norm, lm_head; an untied input table adds one row."""
    for model in (tiny_teacher, tiny_student):
        lm = model.model.language_model
        table = lm.embed_tokens.weight
        layers = sum(p.numel() for n, p in lm.named_parameters() if not n.startswith("embed_tokens"))
        tied = model.lm_head.weight is table
        want = 4 * (layers + model.lm_head.weight.numel() + (0 if tied else table.shape[1]))
        assert torch_decode_bytes(model) == want


def _fake_run(root: Path, teacher_dir: Path, student_dir: Path, onnx_dir: Path) -> Path:
    run = root / "tiny"
    run.mkdir(parents=True)
    shutil.copytree(teacher_dir, run / "teacher")
    shutil.copytree(student_dir, run / "student")
    (run / "onnx").symlink_to(onnx_dir)
    (run / "onnx.failed").mkdir()  # a failed export is not measured
    (run / "report.json").write_text("{}")
    return run


def test_latest_run_and_its_exports(tmp_path, teacher_dir, student_dir, onnx_dir):
    run = _fake_run(tmp_path / "runs", teacher_dir, student_dir, onnx_dir)
    targets, source, found = plan(None, None, [], [], BenchSettings(), tmp_path / "runs")
    assert found == run and str(run) in source
    assert [(t.name, t.backend, t.variant) for t in targets] == [
        ("teacher", "torch", None),
        ("student", "torch", None),
        ("student", "onnx", "fp32"),
        ("student", "onnx", "int8"),
    ]
    targets, _, _ = plan(None, None, [], [], BenchSettings(variants=["int8"]), tmp_path / "runs")
    assert [(t.backend, t.variant) for t in targets] == [("torch", None), ("torch", None), ("onnx", "int8")]
    # a finished run whose teacher is not a local folder (a hub teacher, say): asked for, not guessed
    shutil.rmtree(run / "teacher")
    with pytest.raises(
        BenchError, match=r"the latest run .* has no teacher folder here .*; give --teacher DIR"
    ):
        plan(None, None, [], [], BenchSettings(), tmp_path / "runs")


def test_flags_override_the_recipes_bench_table(tmp_path, student_dir, recipe_dict):
    from lsd_edge.bench.plan import Target
    from lsd_edge.recipe.toml import dumps_toml

    folder = tmp_path / "student"
    shutil.copytree(student_dir, folder)
    recipe_dict["bench"] = {"repeats": 5}
    (folder / "recipe.toml").write_text(dumps_toml(recipe_dict))
    targets = [Target("student", "student", "torch", folder)]
    got = bench_defaults(targets, BenchSettings(prompts=2))
    assert got == {"prompts": 2, "max_new_tokens": 128, "repeats": 5, "warmup": 1}


def test_eval_questions_are_single_image_first_turns(shapes_dir):
    items = eval_questions(shapes_dir / "eval.json", shapes_dir / "images", 3)
    recs = json.loads((shapes_dir / "eval.json").read_text())
    assert len(items) == 3
    assert items[0]["answer"] == recs[0]["conversations"][1]["value"]
    assert "<image>" not in items[0]["question"] and Path(items[0]["image"]).is_file()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--teacher", "no/such/dir"], "no such folder"),
        (["--student", "ONNX"], "an ONNX export folder; pass it with --onnx"),
        (["--onnx", "EMPTY"], "no complete set of ONNX graphs"),
        (["--onnx", "ONNX", "--variant", "int4"], "none of --variant int4"),
        (["--onnx", "ONNX", "--variant", "int3"], "--variant int3: choose one of"),
        (["--teacher", "TEACHER", "--device", "tpu"], "--device tpu: choose cpu or cuda"),
        (["--teacher", "TEACHER", "--prompts", "0"], "--prompts 0: must be at least 1"),
        (["--teacher", "TEACHER", "--dtype", "int8"], "--dtype int8: choose one of"),
        (["--onnx", "ONNX", "--prefill", "fast"], "--prefill fast: choose one of auto, gemm, exported"),
        (["--arch", "gpt5"], "--arch gpt5: unknown; choose from qwen0.5b"),
        (["--teacher", "TEACHER", "--data", "nope.json"], "--data nope.json: no such file"),
        ([], "no finished run under runs/"),
    ],
)
def test_bad_input_isone_red_line(tmp_path, monkeypatch, capsys, teacher_dir, onnx_dir, args, needle):
    (tmp_path / "empty").mkdir()
    subs = {"ONNX": str(onnx_dir), "EMPTY": str(tmp_path / "empty"), "TEACHER": str(teacher_dir)}
    monkeypatch.chdir(tmp_path)
    code, _, err = run(monkeypatch, capsys, "bench", *[subs.get(a, a) for a in args])
    assert code == 1
    assert needle in one_red_line(err)


def test_a_prefill_the_variant_cannot_run_is_one_line(monkeypatch, capsys, onnx_dir, shapes_dir):
    code, _, err = run(
        monkeypatch, capsys, "bench", "--onnx", str(onnx_dir), "--variant", "fp32", "--prefill", "gemm",
        *_small(shapes_dir),
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]  # after the progress lines
    assert "the fp32 decoder has no MatMulNBits weights" in line and "use 'exported'" in line


def test_a_failing_worker_is_one_line(tmp_path, monkeypatch, capsys, onnx_dir, shapes_dir):
    broken = tmp_path / "onnx"
    shutil.copytree(onnx_dir, broken)
    (broken / "onnx" / "decoder_model_merged_int8.onnx").write_bytes(b"not a graph")
    code, _, err = run(
        monkeypatch, capsys, "bench", "--onnx", str(broken), "--variant", "int8", *_small(shapes_dir)
    )
    assert code == 1 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]  # after the progress lines
    assert "student (onnx int8): the bench worker failed" in line and "cannot load" in line


TINY_ARCH = Arch(
    "tiny-test",
    "a tiny real-shaped LLaVA for the --arch smoke test",
    "student",
    vision=dict(hidden=32, intermediate=64, layers=1, heads=2, image_size=28),
    text=dict(vocab=512, hidden=32, layers=1, heads=2, kv=2, tied=True, intermediate=64),
    dtype="float32",
    onnx=True,
)


@pytest.mark.slow
def test_arch_rows_with_random_weights(tmp_path, monkeypatch):
    """--arch: a random-weight model built from a config, and its ONNX int8 export made once and cached."""
    monkeypatch.setattr("lsd_edge.models.archs.ARCHS", {"tiny-test": TINY_ARCH})
    settings = BenchSettings(
        prompts=1, max_new_tokens=3, repeats=1, warmup=0, threads=1, copy_mb=4, cache=tmp_path
    )
    result = bench(archs=["tiny-test"], settings=settings)
    torch_row, onnx_row = result.results
    assert (torch_row.backend, onnx_row.backend, onnx_row.precision) == ("torch", "onnx", "int8")
    assert torch_row.accuracy is None and onnx_row.accuracy is None and torch_row.path is None
    assert torch_row.prompt_tokens == onnx_row.prompt_tokens > 4  # 4 visual tokens (28 px, patch 14)
    assert torch_row.params == onnx_row.params and not onnx_row.torch_imported
    (export,) = [p for p in tmp_path.iterdir() if p.name.startswith("tiny-test-")]
    assert json.loads((export / "export_report.json").read_text())["random_weights"]
    with pytest.raises(BenchError, match="--arch nope: unknown"):
        bench(archs=["nope"], settings=settings)
