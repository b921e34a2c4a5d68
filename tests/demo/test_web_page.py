"""The in-browser student page (`lsd-edge demo --web`): what the server hands out and with which
types, what it refuses, its one-line errors, the CLI, and the page answering in headless Chromium
exactly as lsd-edge's own ONNX runner does."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from lsd_edge.demo import web_page
from lsd_edge.demo.web_page import (
    INSTALL,
    WebDemoError,
    WebSettings,
    find_assets,
    find_export,
    make_server,
    route,
    web_settings,
)
from lsd_edge.runtime.onnx.layout import GRAPHS
from lsd_edge.runtime.onnx.runner import OnnxRunner

from ..browser import ask_web_page, chromium, find_browser, open_web_page
from ..helpers import one_red_line, run

N = 8  # new tokens per question in the browser test


def fake_export(folder: Path, variants=("fp32", "int8"), dtype: str | None = "int8") -> Path:
    """An export folder in the current layout whose graphs are a few bytes each."""
    suffix = {"fp32": "", "int8": "_int8", "int4": "_q4"}
    (folder / "onnx").mkdir(parents=True)
    for v in variants:
        for g in GRAPHS:
            (folder / "onnx" / f"{g}{suffix[v]}.onnx").write_bytes(f"{g}{suffix[v]}".encode())
    config = {"model_type": "llava"}
    if dtype is not None:
        config["transformers.js_config"] = {"dtype": dtype}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def fake_assets(folder: Path) -> Path:
    """A node_modules folder holding the few files of the pinned packages the page asks for."""
    dist = folder / "@huggingface" / "transformers" / "dist"
    ort = folder / "onnxruntime-web" / "dist"
    for d in (dist, ort, folder / "onnxruntime-node" / "bin"):
        d.mkdir(parents=True)
    (dist / "transformers.min.js").write_text("export const env = {};")
    (dist.parent / "package.json").write_text(json.dumps({"version": "4.3.2"}))
    (ort / "ort-wasm-simd-threaded.asyncify.wasm").write_bytes(b"\0asm\1\0\0\0")
    (ort / "ort-wasm-simd-threaded.asyncify.mjs").write_text("export default 1;")
    (folder / "onnxruntime-node" / "bin" / "secret.node").write_bytes(b"not for the browser")
    return folder


@pytest.fixture
def settings(tmp_path) -> WebSettings:
    return web_settings(fake_export(tmp_path / "export"), assets=fake_assets(tmp_path / "node_modules"))


@pytest.fixture
def server(settings):
    srv = make_server(settings, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def fetch(server, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    """A raw request: http.client sends `path` as written, '..' and all."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ serving


def test_serves_page_export_and_assets_with_their_types(server):
    expect = {
        "/": "text/html",
        "/app.js": "text/javascript",
        "/worker.js": "text/javascript",
        "/style.css": "text/css",
        "/settings.json": "application/json",
        "/models/student/config.json": "application/json",
        "/models/student/onnx/decoder_model_merged_int8.onnx": "application/octet-stream",
        "/assets/@huggingface/transformers/dist/transformers.min.js": "text/javascript",
        "/assets/onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.mjs": "text/javascript",
        "/assets/onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.wasm": "application/wasm",
    }
    for path, mime in expect.items():
        status, headers, body = fetch(server, path)
        assert status == 200, path
        assert headers["Content-Type"].split(";")[0] == mime, path
        assert int(headers["Content-Length"]) == len(body) > 0, path
        # Cross-origin isolated, so onnxruntime-web may use threads.
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert fetch(server, "/models/student/onnx/embed_tokens_int8.onnx")[2] == b"embed_tokens_int8"
    page = json.loads(fetch(server, "/settings.json")[2])
    assert (page["variant"], page["dtype"], page["transformers_version"]) == ("int8", "int8", "4.3.2")
    assert page["variants"] == {"fp32": "fp32", "int8": "int8"}
    status, headers, body = fetch(server, "/models/student/config.json", "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert fetch(server, "/models/student/config.json", "POST")[0] == 501  # read-only
    assert "/models/student/onnx/embed_tokens_int8.onnx" in server.served


def test_refuses_paths_outside_the_served_folders(server, settings, tmp_path):
    (tmp_path / "secret.txt").write_text("no")
    (settings.export / ".hidden").write_text("no")
    (settings.export / "out").symlink_to(tmp_path / "secret.txt")
    refused = [
        "/models/student/../secret.txt",
        "/models/student/%2e%2e/secret.txt",
        "/models/student/onnx/..%2f..%2fsecret.txt",
        "/models/student//etc/passwd",
        "/models/student/.hidden",
        "/models/student/out",  # a link out of the export
        "/models/student/onnx",  # a folder, not a file
        "/assets/onnxruntime-node/bin/secret.node",  # node_modules beyond the two packages
        "/assets/@huggingface/transformers/package.json",
        "/assets/onnxruntime-web/dist/../../onnxruntime-node/bin/secret.node",
        "/../../../etc/passwd",
        "/web_page.py",
        "/nothing.js",
    ]
    for path in refused:
        assert route(settings, path) is None, path
        assert fetch(server, path)[0] == 404, path


def test_the_export_folder_default_and_its_problems(tmp_path):
    assets = fake_assets(tmp_path / "node_modules")
    with pytest.raises(WebDemoError, match="no ONNX export there") as e:
        web_settings(tmp_path / "missing", assets=assets)
    assert "\n" not in str(e.value)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / "decoder_model_merged.onnx").write_bytes(b"")
    with pytest.raises(WebDemoError, match="no ONNX export there"):  # graphs must be under onnx/
        web_settings(old, assets=assets)
    with pytest.raises(WebDemoError, match="no transformers.js_config"):
        web_settings(fake_export(tmp_path / "before", dtype=None), assets=assets)
    q4 = fake_export(tmp_path / "q4", variants=("fp32", "int4"), dtype="q4")
    assert web_settings(q4, assets=assets).dtype == "q4"
    assert web_settings(q4, "fp32", assets=assets).dtype == "fp32"
    with pytest.raises(WebDemoError, match="has fp32, int4; pick one"):
        web_settings(q4, "int8", assets=assets)
    with pytest.raises(WebDemoError, match="choose one of"):
        web_settings(q4, "q4", assets=assets)
    # No folder given: the latest finished run's export.
    with pytest.raises(WebDemoError, match="lsd-edge distill"):
        find_export(None, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "tiny"
    fake_export(run_dir / "onnx")
    (run_dir / "student").mkdir()
    (run_dir / "student" / "config.json").write_text("{}")
    (run_dir / "report.json").write_text("{}")
    assert find_export(None, tmp_path / "runs") == run_dir / "onnx"


def test_missing_assets_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(web_page.ASSETS_ENV, raising=False)
    monkeypatch.setattr(web_page, "REPO_ASSETS", tmp_path / "checkout" / "web" / "node_modules")
    for given in (None, tmp_path / "empty"):
        with pytest.raises(WebDemoError) as e:
            find_assets(given)
        assert INSTALL in str(e.value) and "--web-assets" in str(e.value) and "\n" not in str(e.value)
    assets = fake_assets(tmp_path / "web" / "node_modules")
    assert find_assets(tmp_path / "web") == assets  # the folder holding node_modules will do
    monkeypatch.setenv(web_page.ASSETS_ENV, str(assets))
    assert find_assets() == assets
    monkeypatch.setenv(web_page.ASSETS_ENV, str(tmp_path / "empty"))
    with pytest.raises(WebDemoError, match=r"\$LSD_EDGE_WEB_ASSETS"):
        find_assets()


def test_taken_port_is_one_clear_error(settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(WebDemoError, match="pass another --port"):
            make_server(settings, port=s.getsockname()[1])


# ---------------------------------------------------------------------------------------- the CLI


def test_cli_serves_the_page(tmp_path, monkeypatch, capsys):
    export_dir = fake_export(tmp_path / "export", variants=("fp32", "int4"), dtype="q4")
    seen = {}

    def serve_once(srv):  # instead of serving until Ctrl+C
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        with urllib.request.urlopen(srv.url + "settings.json", timeout=10) as resp:
            seen.update(json.loads(resp.read()))
        srv.shutdown()
        srv.server_close()

    monkeypatch.setattr("lsd_edge.cli.deploy_commands.serve", serve_once)
    assets = fake_assets(tmp_path / "node_modules")
    code, out, err = run(
        monkeypatch,
        capsys,
        "demo",
        "--web",
        str(export_dir),
        "--web-assets",
        str(assets),
        "--port",
        str(free_port()),
    )
    assert code == 0, err
    assert "serving the in-browser student on http://127.0.0.1:" in out and "variant int4" in out
    assert seen["dtype"] == "q4" and seen["name"] == "export"


def test_cli_errors_are_one_red_line(tmp_path, monkeypatch, capsys):
    export_dir = fake_export(tmp_path / "export")
    cases = [
        (["demo", "--web", str(export_dir), "--web-assets", str(tmp_path / "none")], INSTALL),
        (["demo", "--web", str(tmp_path / "missing")], "no ONNX export there"),
        (["demo", str(export_dir)], "are for `lsd-edge demo --web`"),
        (["demo", "--web", str(export_dir), "--teacher", str(tmp_path)], "with --web give the export"),
    ]
    for args, message in cases:
        code, _, err = run(monkeypatch, capsys, *args)
        assert code == 1 and message in one_red_line(err), err


# ------------------------------------------------------------------------------------ in a browser


def require(env: str, missing: str) -> None:
    """Skip when something the browser test needs is not here, or fail when `env`=1 asks for it."""
    if os.environ.get(env) == "1":
        pytest.fail(f"{env}=1 but {missing}")
    pytest.skip(missing)


@pytest.fixture(scope="module")
def lively_int8_export(lively_onnx_dir) -> Path:
    """A lively tiny student (its answers differ per question) exported as fp32 + int8 (conftest's)."""
    return lively_onnx_dir


def eval_pairs(shapes_dir: Path, n: int) -> list[tuple[Path, str]]:
    """The first `n` eval questions on distinct images."""
    pairs, images = [], set()
    for r in json.loads((shapes_dir / "eval.json").read_text()):
        if r["image"] not in images:
            images.add(r["image"])
            q = r["conversations"][0]["value"].replace("<image>", "").strip()
            pairs.append((shapes_dir / "images" / r["image"], q))
    return pairs[:n]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_page_answers_in_the_browser_as_the_runner_does(request, shapes_dir):
    if find_browser() is None:
        require(
            "LSD_EDGE_REQUIRE_BROWSER",
            "no chromium + chromedriver: apt-get install -y chromium chromium-driver",
        )
    try:
        find_assets()  # $LSD_EDGE_WEB_ASSETS, else the checkout's web/node_modules
    except WebDemoError as e:
        require("LSD_EDGE_REQUIRE_NODE", str(e))
    export_dir = request.getfixturevalue("lively_int8_export")
    answers = {}
    # fp32: the page answers as the runner does. int8: the page loads and answers; its tokens may
    # differ, because the WASM build computes MatMulNBits in float where the native CPU runtime
    # (the runner, and transformers.js in Node, tests/export/test_transformers_js.py) computes in int8
    for variant in ("fp32", "int8"):
        srv = make_server(web_settings(export_dir, variant), port=0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        runner = OnnxRunner(export_dir, variant=variant)
        try:
            with chromium() as driver:
                model = open_web_page(driver, srv.url)
                assert f"variant {variant}" in model and "WASM" in model
                for image, question in eval_pairs(shapes_dir, 3 if variant == "fp32" else 1):
                    page = ask_web_page(driver, image, question, N)
                    assert page.state == "done", page.figures
                    assert "tokens/s" in page.figures and "first token" in page.figures
                    if variant == "fp32":
                        assert page.text == runner.generate(image, question, N).text.strip(), question
                    answers.setdefault(variant, []).append(page.text)
        finally:
            srv.shutdown()
            srv.server_close()
    assert len(set(answers["fp32"])) > 1  # a lively student: a page that ignored the image or question shows
    assert answers["int8"][0].strip()
    served = set(srv.served)
    for name in (
        "config.json",
        "tokenizer.json",
        "preprocessor_config.json",
        "onnx/decoder_model_merged_int8.onnx",
    ):
        assert f"/models/student/{name}" in served
    assert any(p.endswith(".wasm") for p in served)
