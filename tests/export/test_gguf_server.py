"""The GGUF pair `lsd-edge export --gguf` writes, served by llama.cpp's OpenAI-compatible server and
asked an image question with the file's own chat template; and its Ollama Modelfile, parsed as
Ollama's documentation (docs/modelfile.md) defines the format.

The server is llama-cpp-python's (`python -m llama_cpp.server`, the `gguf` extra's `server` part),
over the same llama.cpp library the parity gate loads, with `--chat_format mtmd`: it renders the
GGUF's `tokenizer.chat_template` with Jinja, as `llama-server --jinja` does, and hands the image to
mtmd with the mmproj file. Building `llama-server` itself from the vendored llama.cpp would add 6+
minutes on 2 cores to every CI run. Skipped when the server does not import, failed instead under
LSD_EDGE_REQUIRE_LLAMA_CPP=1 (CI).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gguf
import numpy as np
import pytest

from lsd_edge.export.gguf.parity import LlamaCppRunner, llama_cpp_missing, tower_images
from lsd_edge.export.gguf.pipeline import export_gguf, modelfile, processor_image_size_wh
from lsd_edge.runtime.torch_runner import TorchRunner
from lsd_edge.verify.plan import eval_questions

from ..helpers import bpe_llava

TOKENS = 8
# top-two logit gap below which llama.cpp's float noise between two call paths may flip the greedy
# token (their log-probabilities differ by up to 7.6e-3 here)
TIE = 0.03
# Ollama's documented instructions and parameters (github.com/ollama/ollama, docs/modelfile.md)
INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
PARAMETERS = {
    "num_ctx": int,
    "repeat_last_n": int,
    "repeat_penalty": float,
    "temperature": float,
    "seed": int,
    "stop": str,
    "num_predict": int,
    "top_k": int,
    "top_p": float,
    "min_p": float,
}
TEMPLATE_FIELDS = {".Messages", ".Role", ".Content", ".System", ".Prompt", ".Response", ".Tools"}


def server_missing() -> str | None:
    missing = llama_cpp_missing()
    if missing is not None:
        return missing
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python's server does not import ({e}); pip install -e '.[gguf]'"
    return None


def needs_server():
    missing = server_missing()
    if missing is not None:
        if os.environ.get("LSD_EDGE_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail(f"LSD_EDGE_REQUIRE_LLAMA_CPP=1 but {missing}")
        pytest.skip(missing)


@pytest.fixture(scope="module")
def gguf_export(standins, tmp_path_factory) -> tuple[Path, Path]:
    """The GGUF tests' lively BPE student exported with `lsd-edge export --gguf` (f16), and the folder."""
    needs_server()
    tmp = tmp_path_factory.mktemp("gguf-server")
    student = bpe_llava(standins["teacher"], tmp / "bpe-student")
    data = standins["data"]
    settings = {"quant": "f16", "samples": 2, "data": data / "eval/gqa_testdev_balanced.json", "images": data}
    return student, export_gguf(student, tmp / "gguf", settings).output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, mmproj: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--clip_model_path", str(mmproj)]
    cmd += ["--chat_format", "mtmd", "--n_ctx", "1024", "--n_threads", "1", "--host", "127.0.0.1"]
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    url, t0 = f"http://127.0.0.1:{port}", time.monotonic()
    while True:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() - t0 > 120:
                proc.kill()
                pytest.fail(f"llama-cpp-python's server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def ask(url: str, image, question: str) -> dict:
    """One image question through /v1/chat/completions, greedy, with each token's log-probability."""
    png = io.BytesIO()
    image.save(png, format="PNG")
    picture = {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}
    content = [{"type": "image_url", "image_url": picture}, {"type": "text", "text": question}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": TOKENS, "temperature": 0}
    body.update(top_k=1, repeat_penalty=1.0, logprobs=True, top_logprobs=1)
    req = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["choices"][0]


def bindings_answers(folder: Path, torch_runner: TorchRunner, items) -> list[tuple]:
    """The GGUF parity path's greedy answers (PyTorch's prompt ids, mtmd's image embeddings): per
    item the image at the tower's size, each token's text piece and log-probability, how many steps
    lead before the first near tie (top two logits within TIE), where float noise may flip it, and
    the answer's text."""
    t, size = torch_runner, processor_image_size_wh(torch_runner.processor)
    bindings = LlamaCppRunner(folder / "bpe-student.gguf", folder / "mmproj-bpe-student.gguf")
    out = []
    try:
        for it in items:
            image = tower_images(it.images, t.processor, size)[0]
            # over every row of the output, as the server samples: the parity path leaves out the
            # rows past the tokenizer's (the vocabulary padded to a multiple of 64), the server does not
            tokens, steps = bindings.greedy(
                it.prompt_ids, t.encoder.image_id, [image], TOKENS, t.stop_ids, bindings.n_vocab
            )
            raw = [bindings.llm.detokenize([tok]) for tok in tokens]
            pieces = [b.decode("utf-8", errors="ignore") for b in raw]
            logprobs = [
                float(s[k] - s.max() - np.log(np.exp(s - s.max()).sum()))
                for s, k in zip(steps, tokens, strict=False)
            ]
            margins = [float(np.diff(np.sort(s)[-2:])[0]) for s in steps[: len(tokens)]]
            clear = next((i for i, m in enumerate(margins) if m < TIE), len(tokens))
            text = b"".join(raw).decode("utf-8", errors="ignore")
            out.append((image, pieces, logprobs, clear, text))
    finally:
        bindings.close()
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_llama_cpp_server_answers_as_the_bindings_do(gguf_export, standins, tmp_path):
    """The server's greedy tokens and their log-probabilities equal the GGUF parity path's, up to the
    first near tie. The lively stand-in writes bytes that are not whole UTF-8 characters, which the
    server's text drops, so tokens are compared piece by piece, and a whole answer's text as a prefix
    of the server's (which decodes on past max_tokens until a character is whole)."""
    student, folder = gguf_export
    torch_runner = TorchRunner(student)
    data = standins["data"]
    questions, items = eval_questions(
        data / "eval/gqa_testdev_balanced.json", data, 6, torch_runner.processor
    )
    want = bindings_answers(folder, torch_runner, items)
    proc, url = start_server(
        folder / "bpe-student.gguf", folder / "mmproj-bpe-student.gguf", tmp_path / "server.log"
    )
    try:
        compared, whole, seen = 0, 0, set()
        for q, (image, pieces, logprobs, clear, text) in zip(questions, want, strict=True):
            got = ask(url, image, q.question)
            steps = got["logprobs"]["content"]
            assert [s["token"] for s in steps[:clear]] == pieces[:clear], (q.question, steps, pieces)
            # measured: within 7.6e-3 of the bindings' (the server evaluates the prompt in other
            # batches); a wrong image or prompt moves them by tenths, and the tokens with them
            assert [s["logprob"] for s in steps[:clear]] == pytest.approx(logprobs[:clear], abs=3e-2)
            if clear == len(pieces):  # the whole answer; the server goes on to finish a UTF-8 character
                assert got["message"]["content"].startswith(text), (got["message"], text)
            compared, whole = compared + clear, whole + (clear == len(pieces))
            seen.add(tuple(pieces))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert compared >= 2 * TOKENS and whole >= 1, (compared, whole)  # not a comparison of nothing
    assert len(seen) > 1  # the answers depend on the question and the image
    log = (tmp_path / "server.log").read_text()
    assert "<|im_start|>assistant" in log  # the prompt the file's chat template rendered


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) pairs as Ollama reads a Modelfile: `#` comments, one instruction a
    line, an argument in triple quotes may span lines."""
    out, lines = [], iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, arg = line.strip().partition(" ")
        assert word.upper() in INSTRUCTIONS, f"not a Modelfile instruction: {line}"
        if arg.startswith('"""'):
            arg = arg[3:]
            while not arg.endswith('"""'):
                arg += "\n" + next(lines)
            arg = arg[:-3]
        out.append((word.upper(), arg))
    return out


def check_modelfile(text: str, folder: Path | None) -> dict:
    """Every instruction as Ollama documents it; the FROM files in `folder` when given."""
    parsed = parse_modelfile(text)
    froms = [a for w, a in parsed if w == "FROM"]
    assert len(froms) == 2 and froms[1].startswith("./mmproj-"), froms  # the model, then its projector
    if folder is not None:
        assert all((folder / f).is_file() for f in froms), froms
    params = {}
    for w, a in parsed:
        if w == "PARAMETER":
            name, _, value = a.partition(" ")
            params.setdefault(name, []).append(
                PARAMETERS[name](json.loads(value) if value.startswith('"') else value)
            )
    (template,) = [a for w, a in parsed if w == "TEMPLATE"]
    actions = re.findall(r"{{-?\s*(.*?)\s*-?}}", template)
    assert sum(a.startswith(("range", "if")) for a in actions) == sum(a == "end" for a in actions)
    assert {f for a in actions for f in re.findall(r"\.\w+", a)} <= TEMPLATE_FIELDS, actions
    return {"froms": froms, "params": params, "template": template}


def test_modelfile_follows_ollama_s_format():
    m = check_modelfile(modelfile("s", "a note"), None)
    assert m["froms"] == ["./s.gguf", "./mmproj-s.gguf"]
    assert m["params"] == {"stop": ["<|im_end|>"], "temperature": [0.0]}
    body = re.sub(r"{{-?\s*range \.Messages\s*-?}}(.*?){{-?\s*end\s*-?}}", r"\1", m["template"], flags=re.S)
    turn = body.split("<|im_start|>assistant")[0]  # one message's turn, then the reply's start
    assert (
        turn.replace("{{ .Role }}", "user").replace("{{ .Content }}", "hi")
        == "<|im_start|>user\nhi<|im_end|>\n"
    )
    with pytest.raises(AssertionError):
        check_modelfile("FROM ./s.gguf\nPARAMETERS stop x\n", None)


@pytest.mark.slow
def test_exported_modelfile_names_the_files_and_the_file_s_stop_token(gguf_export):
    """The Modelfile beside the GGUF pair: its FROM files exist, its stop string is the GGUF's
    end-of-turn token and the template's turn markers are tokens of its vocabulary."""
    _, folder = gguf_export
    m = check_modelfile((folder / "Modelfile").read_text(), folder)
    reader = gguf.GGUFReader(str(folder / m["froms"][0]))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    eos = reader.fields["tokenizer.ggml.eos_token_id"]
    assert m["params"]["stop"] == [vocab[int(eos.parts[eos.data[0]][0])]]
    assert {"<|im_start|>", "<|im_end|>"} <= set(vocab) and "<|im_start|>" in m["template"]
