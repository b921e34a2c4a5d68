"""The demo: both answers through a launched server (gradio_client and a real browser), streaming,
errors kept to their column, limits, 20 requests at once, path resolution, examples, memory, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from lsd_edge.data.shapes import QUESTION_TYPES
from lsd_edge.demo.answering import fit_image, stream_answers
from lsd_edge.demo.examples import shapes_examples
from lsd_edge.demo.models import ModelPaths, load_models, resolve_paths
from lsd_edge.demo.page import DemoError, Limits, build_app, launch
from lsd_edge.errors import ModelError
from lsd_edge.evaluate.score import normalize_answer
from lsd_edge.models.info import config_params as model_params
from lsd_edge.runtime.memory import MiB
from lsd_edge.runtime.onnx.runner import OnnxRunner
from lsd_edge.runtime.textgen import Generation
from lsd_edge.runtime.torch_runner import TorchRunner

from ..browser import ask_in_browser, find_browser
from ..helpers import lively_student, one_red_line, red_line_after_progress, run

LIMITS = Limits(
    max_pixels=32 * 32, max_question_chars=80, max_new_tokens=8, default_new_tokens=6, queue_size=32
)
N = 6  # new tokens per test request


class Scripted:
    """A runner that streams fixed pieces, pausing before each, and may raise after some of them."""

    backend = "torch"

    def __init__(self, name: str, pieces: list[str], delay: float = 0.0, fail_after: int | None = None):
        self.name, self.pieces, self.delay, self.fail_after = name, pieces, delay, fail_after
        self.sent = 0
        self.ended = threading.Event()

    def generate(self, image, question, max_new_tokens=64, *, sampling=None, ignore_eos=False, on_text=None):
        t0 = time.perf_counter()
        pieces = self.pieces[:max_new_tokens]
        try:
            for i, piece in enumerate(pieces):
                if i == self.fail_after:
                    raise RuntimeError("boom: the model fell over\nsecond line")
                time.sleep(self.delay)
                if on_text:
                    on_text(piece)
                self.sent += 1
        finally:
            self.ended.set()
        text = "".join(pieces)
        return Generation(text, list(range(len(pieces))), 3, 0.001, time.perf_counter() - t0, "length")

    def info(self) -> dict:
        return {
            "name": self.name,
            "backend": "torch",
            "path": f"/fake/{self.name}",
            "params": 10,
            "size_mb": 0.1,
        }


class Paced:
    """A real runner whose pieces arrive `delay` apart, so streamed updates are there to be seen."""

    def __init__(self, runner, delay: float):
        self.runner, self.delay = runner, delay
        self.name, self.backend = runner.name, runner.backend

    def generate(self, image, question, max_new_tokens=64, *, on_text=None, **kw):
        def slow(piece):
            time.sleep(self.delay)
            on_text(piece)

        return self.runner.generate(image, question, max_new_tokens, on_text=slow if on_text else None, **kw)

    def info(self) -> dict:
        return self.runner.info()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_pairs(shapes_dir: Path, n: int) -> list[tuple[Path, str]]:
    recs = json.loads((shapes_dir / "eval.json").read_text())[:n]
    return [
        (shapes_dir / "images" / r["image"], r["conversations"][0]["value"].replace("<image>", "").strip())
        for r in recs
    ]


# ----------------------------------------------------------------------------------- without a server


def test_stream_answers_streams_both_and_keeps_an_error_to_its_model():
    runners = {
        "teacher": Scripted("t", ["a", "b", "c"], delay=0.01),
        "student": Scripted("s", ["x", "y", "z"], fail_after=2),
    }
    seen = [
        {k: (a.text, a.done) for k, a in answers.items()} for answers in stream_answers(runners, None, "q", 8)
    ]
    last = seen[-1]
    assert last["teacher"] == ("abc", True) and last["student"] == ("xy", True)
    assert len(seen) >= 3  # updates arrive as the teacher's pieces do, not only at the end
    answers = list(stream_answers(runners, None, "q", 8))[-1]
    assert answers["teacher"].generation.text == "abc" and answers["teacher"].error is None
    assert answers["student"].error == "RuntimeError: boom: the model fell over"


def test_closing_the_stream_stops_the_models():
    slow = Scripted("t", ["w"] * 200, delay=0.01)
    stream = stream_answers({"teacher": slow}, None, "q", 200)
    next(stream)
    stream.close()  # what Gradio does when the browser goes away
    assert slow.ended.wait(30) and slow.sent < 200


def test_fit_image_downscales_keeping_aspect():
    big = Image.new("RGBA", (400, 100))
    small, shrunk = fit_image(big, 32 * 32)
    assert shrunk and small.mode == "RGB" and small.width * small.height <= 32 * 32
    assert abs(small.width / small.height - 4) < 0.3
    same, shrunk = fit_image(Image.new("RGB", (16, 16)), 32 * 32)
    assert not shrunk and same.size == (16, 16)


# ------------------------------------------------------------------------------------- with a server


@pytest.fixture(scope="module")
def runners(tmp_path_factory, lively_dir, lively_onnx_dir):
    """Lively models (conftest), whose answers differ from question to question: an answer that
    equals the runner's own then shows the page asked that model that question about that image."""
    teacher = lively_student(tmp_path_factory.mktemp("demo") / "teacher", seed=5)
    return {
        "teacher": TorchRunner(teacher),
        "PyTorch": TorchRunner(lively_dir),
        "ONNX int8": OnnxRunner(lively_onnx_dir, variant="int8"),
    }


@pytest.fixture(scope="module")
def server(runners, shapes_dir):
    from gradio_client import Client

    students = {
        "PyTorch": runners["PyTorch"],
        "ONNX int8": runners["ONNX int8"],
        "Broken": Scripted("broken", ["one", " two", " three"], fail_after=1),
    }
    examples = shapes_examples([], n=3, image_size=16)
    app = build_app(Paced(runners["teacher"], 0.02), students, examples, LIMITS)
    url = launch(app, port=_free_port())[0]
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    yield url, client
    client.close()
    app.close()


def _ask(client, image: Path, question: str, backend: str = "PyTorch", n: int = N):
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)), question, backend, n, api_name="/ask")


def test_api_returns_both_answers_as_the_runners_give_them(server, runners, shapes_dir):
    _, client = server
    seen = set()
    for (image, q), backend in zip(_eval_pairs(shapes_dir, 2), ("PyTorch", "ONNX int8"), strict=True):
        t_text, t_figures, s_text, s_figures, agreement, result = _ask(client, image, q, backend)
        im = Image.open(image).convert("RGB")
        assert t_text == runners["teacher"].generate(im, q, N).text
        assert s_text == runners[backend].generate(im, q, N).text
        assert "first token" in t_figures and "parameters" in t_figures
        assert "first token" in s_figures and ("ONNX Runtime, int8" in s_figures) == (backend != "PyTorch")
        same = normalize_answer(t_text) == normalize_answer(s_text)
        assert result["agree"] is same and ("agree" if same else "differ") in agreement
        assert result["student_backend"] == backend and result["question"] == q
        assert result["teacher"]["answer"] == t_text and result["student"]["answer"] == s_text
        assert result["teacher"]["ttft_s"] > 0 and result["teacher"]["new_tokens"] >= 1
        seen.add((t_text, s_text))
    assert len(seen) == 2, "both questions got the same answers: the comparison above proves nothing"


def test_streamed_chunks_arrive(server, shapes_dir):
    from gradio_client import handle_file

    _, client = server
    image, q = _eval_pairs(shapes_dir, 1)[0]
    job = client.submit(handle_file(str(image)), q, "PyTorch", N, api_name="/ask")
    final = job.result(timeout=120)
    teacher_texts = [out[0] for out in job.outputs()]
    assert len(teacher_texts) >= 3, teacher_texts
    assert all(b.startswith(a) for a, b in zip(teacher_texts, teacher_texts[1:], strict=False))
    assert teacher_texts[-1] == final[0] and final[0]


def test_an_error_in_one_model_shows_in_its_column_only(server, shapes_dir):
    _, client = server
    image, q = _eval_pairs(shapes_dir, 1)[0]
    t_text, t_figures, s_text, s_figures, agreement, result = _ask(client, image, q, "Broken")
    assert t_text and "first token" in t_figures and result["teacher"]["error"] is None
    assert s_text == "one" and "error" in s_figures and "boom" in s_figures
    assert result["student"]["error"].startswith("RuntimeError: boom") and result["agree"] is None
    assert agreement == ""


def test_limits_refuse_or_shrink(server, shapes_dir, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, client = server
    image, q = _eval_pairs(shapes_dir, 1)[0]
    with pytest.raises(AppError, match="limit is 80"):
        _ask(client, image, "why " * 30)
    with pytest.raises(AppError, match="Type a question"):
        _ask(client, image, "   ")
    n = LIMITS.max_new_tokens
    with pytest.raises(AppError, match=f"Value {n + 1} is greater than maximum value {n}"):
        _ask(client, image, q, n=n + 1)
    with pytest.raises(
        AppError, match=r"'TPU'.*not in the list of choices: \['PyTorch', 'ONNX int8', 'Broken'\]"
    ):
        _ask(client, image, q, "TPU")
    big = tmp_path / "big.png"
    Image.open(image).convert("RGB").resize((200, 100)).save(big)
    result = client.predict(handle_file(str(big)), q, "PyTorch", 2, api_name="/ask")[5]
    w, h = result["image"]["size"]
    assert w * h <= LIMITS.max_pixels and result["image"]["downscaled_from"] == [200, 100]


def test_the_handler_refuses_what_the_inputs_should_not_let_through():
    """The API's radio and slider refuse an unlisted backend and too many tokens (above); the handler
    does not rely on them."""
    import gradio as gr

    from lsd_edge.demo.page import _check_request

    with pytest.raises(gr.Error, match="Unknown student backend 'TPU'; choose one of PyTorch, ONNX int8"):
        _check_request("q", "TPU", 4, ["PyTorch", "ONNX int8"], LIMITS)
    with pytest.raises(gr.Error, match=f"max_new_tokens must be between 1 and {LIMITS.max_new_tokens}"):
        _check_request("q", "PyTorch", LIMITS.max_new_tokens + 1, ["PyTorch"], LIMITS)


def test_uploads_over_10_mb_are_refused(server):
    import httpx

    url, _ = server
    limit = 10 * 2**20  # Limits.max_file_size "10mb", as Gradio counts it
    with httpx.Client(timeout=60) as http:
        ok = http.post(f"{url}gradio_api/upload", files={"files": ("ok.png", b"\0" * (limit - 4096))})
        assert ok.status_code == 200, ok.text
        big = http.post(f"{url}gradio_api/upload", files={"files": ("big.png", b"\0" * (limit + 1))})
    assert big.status_code == 413 and f"maximum allowed size of {limit} bytes" in big.text


def test_requests_beyond_the_queue_are_refused():
    """One answered at a time, one waiting: of four sent at once, the ones beyond are told the queue is full."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    limits = Limits(max_pixels=32 * 32, max_new_tokens=50, queue_size=1, concurrency=1)
    slow = {"PyTorch": Scripted("s", ["w"] * 50, delay=0.02)}
    app = build_app(Scripted("t", ["w"] * 50, delay=0.02), slow, (), limits)
    url = launch(app, port=_free_port())[0]
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    try:
        jobs = [client.submit(None, "q", "PyTorch", 50, api_name="/ask") for _ in range(4)]
        done, refused = 0, []
        for job in jobs:
            try:
                done += bool(job.result(timeout=120)[0])
            except (QueueError, AppError) as e:
                refused.append(str(e))
        assert done >= 1 and refused, (done, refused)
        assert all("Queue is full" in why for why in refused), refused
    finally:
        client.close()
        app.close()


def test_twenty_simultaneous_requests_all_complete(server, shapes_dir):
    from gradio_client import handle_file

    _, client = server
    pairs = _eval_pairs(shapes_dir, 4)
    jobs = [
        client.submit(
            handle_file(str(pairs[i % 4][0])),
            pairs[i % 4][1],
            ("PyTorch", "ONNX int8")[i % 2],
            3,
            api_name="/ask",
        )
        for i in range(20)
    ]
    results = [job.result(timeout=300) for job in jobs]
    assert all(
        r[0] and r[2] and r[5]["teacher"]["error"] is None and r[5]["student"]["error"] is None
        for r in results
    )
    # Same question, same answer: requests running at once do not leak into each other.
    by_question = {}
    for i, r in enumerate(results):
        by_question.setdefault((i % 4, i % 2), set()).add((r[0], r[2]))
    assert all(len(v) == 1 for v in by_question.values())
    assert len({r[0] for r in results}) > 1, "every question answered alike: a leak would not show"


def test_in_a_real_browser(server, runners, shapes_dir, tmp_path):
    if find_browser() is None:
        if os.environ.get("LSD_EDGE_REQUIRE_BROWSER") == "1":
            pytest.fail(
                "LSD_EDGE_REQUIRE_BROWSER=1 but no chromium + chromedriver: apt-get install -y chromium chromium-driver"
            )
        pytest.skip("no chromium + chromedriver (apt-get install -y chromium chromium-driver)")
    url, _ = server
    image, q = _eval_pairs(shapes_dir, 1)[0]
    shot = tmp_path / "demo.png"
    page = ask_in_browser(url, image, q, shot, backend="ONNX int8")
    im = Image.open(image).convert("RGB")
    assert page.teacher == runners["teacher"].generate(im, q, LIMITS.default_new_tokens).text.strip()
    assert page.student == runners["ONNX int8"].generate(im, q, LIMITS.default_new_tokens).text.strip()
    assert "first token" in page.teacher_figures and "ONNX Runtime, int8" in page.student_figures
    assert "answers agree" in page.agreement or "answers differ" in page.agreement
    with Image.open(shot) as png:
        assert png.width >= 1000 and png.height >= 600


def test_taken_port_is_one_clear_error():
    app = build_app(Scripted("t", ["a"]), {"PyTorch": Scripted("s", ["a"])}, (), LIMITS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(DemoError, match="pass another --port"):
            launch(app, port=s.getsockname()[1])
    app.close()


def test_cli_on_a_taken_port_is_a_red_line(monkeypatch, capsys, teacher_dir, student_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = str(s.getsockname()[1])
        code, _, err = run(
            monkeypatch, capsys, "demo", "--teacher", str(teacher_dir), "--student", str(student_dir),
            "--device", "cpu", "--port", port,
        )  # fmt: skip
    assert code == 1
    # after the "loading ..." notes, one red line
    line = red_line_after_progress(err)
    assert f"cannot serve on 127.0.0.1:{port}: the port is taken" in line and "pass another --port" in line


# ------------------------------------------------------------------------------------ paths and models


def _fake_run(root: Path, name: str, with_onnx: bool = False) -> Path:
    run = root / "runs" / name
    for sub in ("teacher", "student") + (("onnx",) if with_onnx else ()):
        (run / sub).mkdir(parents=True)
        (run / sub / "config.json").write_text("{}")
    if with_onnx:
        (run / "onnx" / "onnx").mkdir()
        (run / "onnx" / "onnx" / "decoder_model_merged.onnx").write_bytes(b"")
        (run / "onnx" / "export_report.json").write_text(json.dumps({"model_dir": str(run / "student")}))
    (run / "report.json").write_text("{}")
    return run


def test_resolve_paths_from_the_latest_run(tmp_path):
    with pytest.raises(ModelError, match="lsd-edge distill"):
        resolve_paths(runs_root=tmp_path / "runs")
    old = _fake_run(tmp_path, "old", with_onnx=True)
    new = _fake_run(tmp_path, "new")
    os.utime(old / "report.json", (1, 1))
    p = resolve_paths(runs_root=tmp_path / "runs")
    assert (p.teacher, p.student, p.onnx, p.run) == (new / "teacher", new / "student", None, new)
    assert any("lsd-edge export" in n for n in p.notes)
    p = resolve_paths(teacher=old / "teacher", student=old / "student", runs_root=tmp_path / "nowhere")
    assert p.onnx == old / "onnx" and not p.notes
    # An export folder as the student: the PyTorch student it came from is found through its report.
    p = resolve_paths(teacher=old / "teacher", student=old / "onnx", runs_root=tmp_path / "nowhere")
    assert (p.student, p.onnx) == (old / "student", old / "onnx")
    (old / "onnx" / "export_report.json").write_text("{not json")
    p = resolve_paths(teacher=old / "teacher", student=old / "onnx", runs_root=tmp_path / "nowhere")
    assert (p.student, p.onnx) == (None, old / "onnx") and "PyTorch student" in p.notes[0]
    with pytest.raises(ModelError, match="no such model folder"):
        resolve_paths(teacher=tmp_path / "missing", student=old / "student")
    with pytest.raises(ModelError, match="no \\*.onnx files"):
        resolve_paths(teacher=old / "teacher", student=old / "student", onnx=old / "teacher")


def test_examples_from_eval_data_or_rendered(tmp_path, shapes_dir):
    rendered = shapes_examples([tmp_path], n=5, image_size=16)
    assert len(rendered) == 5 and all(e.image.is_file() and e.question for e in rendered)
    assert {e.kind for e in rendered} == set(QUESTION_TYPES)  # one of each type first
    from lsd_edge.recipe.toml import dumps_toml

    from ..helpers import tiny_recipe_dict

    (tmp_path / "recipe.toml").write_text(
        dumps_toml(tiny_recipe_dict(str(shapes_dir), str(tmp_path / "run")))
    )
    from_data = shapes_examples([None, tmp_path], n=3)
    assert len(from_data) == 3 and all(e.image.parent == shapes_dir / "images" for e in from_data)


def test_load_models_measures_each_model(teacher_dir, onnx_student_dir, onnx_dir, shapes_dir):
    examples = shapes_examples([], n=1, image_size=16)
    teacher, students = load_models(ModelPaths(teacher_dir, onnx_student_dir, onnx_dir), "cpu", examples)
    assert list(students) == ["PyTorch", "ONNX int8"]
    t, s, o = teacher.info(), students["PyTorch"].info(), students["ONNX int8"].info()
    # the weights' bytes: what the safetensors file holds past its length-prefixed JSON header
    for info, folder in ((t, teacher_dir), (s, onnx_student_dir)):
        raw = (folder / "model.safetensors").read_bytes()
        tensors_mib = (len(raw) - 8 - int.from_bytes(raw[:8], "little")) / MiB
        assert info["memory"]["weights_mib"] == pytest.approx(tensors_mib, rel=1e-3), info["memory"]
    # memory added while one tiny model loads and answers: far below a ceiling this process's own
    # resident set (torch, onnxruntime, gradio) is far above, so a figure of the whole process fails
    ceiling = 256
    assert psutil.Process().memory_info().rss / MiB > 2 * ceiling
    assert all(0 <= i["memory"]["peak_rss_mib"] < ceiling for i in (t, s, o)), (t, s, o)
    assert o["backend"] == "onnx" and o["variant"] == "int8" and "weights_mib" not in o["memory"]
    assert o["params"] == s["params"] == model_params(onnx_student_dir)


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_without_a_run_isone_red_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(monkeypatch, capsys, "demo")
    assert code == 1 and "lsd-edge distill" in one_red_line(err)
    code, _, err = run(monkeypatch, capsys, "demo", "--teacher", "nope", "--student", "nope2")
    assert code == 1 and "no such model folder" in one_red_line(err)


def test_cli_with_an_unknown_device_is_one_red_line(monkeypatch, capsys, teacher_dir, student_dir):
    code, _, err = run(
        monkeypatch,
        capsys,
        "demo",
        "--teacher",
        str(teacher_dir),
        "--student",
        str(student_dir),
        "--device",
        "gpu",
    )
    assert code == 1 and "--device gpu: choose auto, cpu or cuda" in one_red_line(err)


def test_cli_serves_the_latest_run(tmp_path, monkeypatch, capsys, teacher_dir, onnx_student_dir, onnx_dir):
    import gradio as gr

    from lsd_edge.demo import page

    run_dir = tmp_path / "runs" / "tiny"
    shutil.copytree(teacher_dir, run_dir / "teacher")
    shutil.copytree(onnx_student_dir, run_dir / "student")
    shutil.copytree(onnx_dir, run_dir / "onnx")
    (run_dir / "report.json").write_text("{}")
    served = {}

    def fake_launch(app, host, port, share):
        served.update(app=app, host=host, port=port, share=share)
        return [f"http://{host}:{port}/"]

    monkeypatch.setattr(page, "launch", fake_launch)
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(monkeypatch, capsys, "demo", "--port", "7999", "--max-new-tokens", "5")
    assert code == 0, err
    assert served["host"] == "127.0.0.1" and served["port"] == 7999 and served["share"] is False
    assert (
        "ONNX int8" in out
        and "runs/tiny/teacher" in out
        and "serving the demo on http://127.0.0.1:7999/" in out
    )
    assert served["app"].demo_limits.max_new_tokens == 5
    served["app"].close()


# ------------------------------------------------------------------------------ the Spaces launcher


def test_the_spaces_launcher_builds_the_page_of_the_latest_run(
    tmp_path, monkeypatch, teacher_dir, onnx_student_dir, onnx_dir
):
    """`python demo/app.py` / `gradio demo/app.py`: the module builds `demo` over the latest run."""
    import runpy

    import gradio as gr

    from ..helpers import REPO

    for name in ("LSD_EDGE_TEACHER", "LSD_EDGE_STUDENT", "LSD_EDGE_ONNX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LSD_EDGE_DEVICE", "cpu")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="error: no --teacher/--student given and no finished run"):
        runpy.run_path(str(REPO / "demo" / "app.py"), run_name="spaces")
    run_dir = tmp_path / "runs" / "tiny"
    shutil.copytree(teacher_dir, run_dir / "teacher")
    shutil.copytree(onnx_student_dir, run_dir / "student")
    shutil.copytree(onnx_dir, run_dir / "onnx")
    (run_dir / "report.json").write_text("{}")
    page = runpy.run_path(str(REPO / "demo" / "app.py"), run_name="spaces")["demo"]
    assert isinstance(page, gr.Blocks) and page.demo_limits.max_new_tokens == 64
    page.close()
    # the environment names other folders: an export as the student, as `lsd-edge demo --student` takes it
    monkeypatch.setenv("LSD_EDGE_TEACHER", str(teacher_dir))
    monkeypatch.setenv("LSD_EDGE_STUDENT", str(onnx_dir))
    shutil.rmtree(tmp_path / "runs")
    page = runpy.run_path(str(REPO / "demo" / "app.py"), run_name="spaces")["demo"]
    assert isinstance(page, gr.Blocks)
    page.close()
