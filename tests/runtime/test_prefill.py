"""The int8 GEMM prefill: MatMulNBits weights requantized per column, the rewritten graph against the
block-format node it replaces, and the runner's prompt path beside its decode path."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from lsd_edge.errors import RuntimeModelError
from lsd_edge.runtime.onnx.kv import SharedCache
from lsd_edge.runtime.onnx.prefill import WEIGHT_MAX, int8_weights, nbits_in, write_prefill
from lsd_edge.runtime.onnx.runner import OnnxRunner


def _matmul(k: int, n: int, bias: bool = False, seed: int = 0, last: bool = False) -> onnx.ModelProto:
    """A one-MatMul graph y = x @ W (+ b), x (1, T, K), in fp32; `last`: the MatMul makes y itself."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 0.2, (k, 1))).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y" if last else "y0"], name="mm")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", ["y0", "b"], ["y"]))
    elif not last:
        nodes.append(helper.make_node("Relu", ["y0"], ["y"]))
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", n])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _nbits(model: onnx.ModelProto, bits: int, symmetric: bool = True) -> onnx.ModelProto:
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=symmetric, accuracy_level=4)
    q.process()
    return q.model.model


def _dequantized(node, inits) -> np.ndarray:
    """The plain reference: W[k, n] from MatMulNBits's packed codes, element by element."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    packed = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1)
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1)
    zps = numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1) if len(node.input) > 3 else None
    w = np.zeros((k, n), dtype=np.float64)
    for col in range(n):
        for row in range(k):
            b = row // block
            if bits == 8:
                code = int(packed[col, row])
            else:
                byte = int(packed[col, row // 2])
                code = byte & 0xF if row % 2 == 0 else byte >> 4
            if zps is None:
                z = 2 ** (bits - 1)
            elif bits == 8:
                z = int(zps[col, b])
            else:
                zb = int(zps[col, b // 2])
                z = zb & 0xF if b % 2 == 0 else zb >> 4
            w[row, col] = (code - z) * float(scales[col, b])
    return w


@pytest.mark.parametrize(("bits", "symmetric", "k"), [(4, True, 80), (8, True, 64), (4, False, 96)])
def test_int8_weights_match_the_plain_dequantization(bits, symmetric, k):
    """wq * s is the block-dequantized weight within half a step of s, per column (K not a multiple
    of the block: the padding dropped; asymmetric: the node's own zero points)."""
    model = _nbits(_matmul(k, 24), bits, symmetric)
    node = next(x for x in model.graph.node if x.op_type == "MatMulNBits")
    inits = {t.name: t for t in model.graph.initializer}
    ref = _dequantized(node, inits)
    zp = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 else None
    wq, s = int8_weights(
        numpy_helper.to_array(inits[node.input[1]]),
        numpy_helper.to_array(inits[node.input[2]]),
        k,
        24,
        bits,
        32,
        zp,
    )
    assert wq.shape == (k, 24) and wq.dtype == np.int8 and s.shape == (24,)
    assert np.abs(wq).max() <= WEIGHT_MAX
    np.testing.assert_allclose(s, np.abs(ref).max(0) / WEIGHT_MAX, rtol=1e-6)
    err = np.abs(wq.astype(np.float64) * s - ref)
    assert (err <= s / 2 * (1 + 1e-5)).all()


def _run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize(("bits", "bias"), [(4, False), (8, True)])
def test_the_rewritten_graph_computes_what_matmulnbits_does(tmp_path, bits, bias):
    model = _nbits(_matmul(96, 40, bias=bias), bits)
    src = tmp_path / "nbits.onnx"
    onnx.save(model, str(src))
    dst = tmp_path / "prefill.onnx"
    assert write_prefill(src, dst) == 1
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert "MatMulInteger" in ops and "MatMulNBits" not in ops
    x = np.random.default_rng(3).standard_normal((1, 50, 96)).astype(np.float32)
    want, got = _run(src, x), _run(dst, x)
    # per-token 8-bit activations and 7-bit weights against 32-wide int8 blocks: a percent or so
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02


def test_a_graph_output_and_a_graph_without_matmulnbits_are_left_alone(tmp_path):
    """The node making a graph output (the pruned lm_head: one row) keeps its block format."""
    model = _nbits(_matmul(64, 16, last=True), 4)
    node = next(x for x in model.graph.node if x.op_type == "MatMulNBits")
    assert node.output[0] == "y"
    src = tmp_path / "nbits.onnx"
    onnx.save(model, str(src))
    assert write_prefill(src, tmp_path / "p.onnx") == 0
    plain = tmp_path / "plain.onnx"
    onnx.save(_matmul(64, 16), str(plain))
    assert nbits_in(src) == {4} and nbits_in(plain) == set()


@pytest.fixture(scope="module")
def gemm(onnx_dir):
    return OnnxRunner(onnx_dir, variant="int8", prefill="gemm")


@pytest.fixture(scope="module")
def plain(onnx_dir):
    return OnnxRunner(onnx_dir, variant="int8", prefill="exported")


def test_auto_picks_the_gemm_for_4_bits_on_the_cpu_only(onnx_dir, gemm, plain):
    assert gemm.prefill == "gemm" and gemm.prefill_session is not None and gemm.info()["prefill"] == "gemm"
    assert plain.prefill_session is None
    assert OnnxRunner(onnx_dir, variant="int8").prefill == "exported"  # auto: 8 bits keep the decoder
    assert OnnxRunner(onnx_dir, variant="fp32").prefill == "exported"


def test_prompt_through_the_gemm_then_tokens_through_the_decoder(gemm, plain):
    """The prompt goes through the prefill session into the same KV buffers the decoder then extends:
    the logits of every step stay close to the decoder-only run's, the greedy answers agree."""
    ids = np.random.default_rng(0).integers(5, gemm.vocab_rows, 40).tolist()
    embeds = gemm.embed(ids)
    runs = []
    for r in (gemm, plain):
        cache = r.new_cache(48)
        assert isinstance(cache, SharedCache)
        before = {n: v.data_ptr() for n, v in cache.buffers.items()}
        out = []
        logits, cache = r.decode(embeds[:, :32], cache)
        out.append(logits[0, -1].copy())
        for i in range(32, 40):
            logits, cache = r.decode(embeds[:, i : i + 1], cache)
            out.append(logits[0, -1].copy())
        assert {n: v.data_ptr() for n, v in cache.buffers.items()} == before
        runs.append(np.stack(out))
    got, want = runs
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_the_growing_cache_uses_the_gemm_for_prompts_too(gemm, plain, monkeypatch):
    calls = []
    real = gemm.prefill_session.run
    monkeypatch.setattr(
        gemm, "prefill_session", type("S", (), {"run": lambda s, *a: calls.append(1) or real(*a)})()
    )
    embeds = gemm.embed([5, 6, 7, 8])
    gemm.kv_cache = "concat"
    try:
        cache = gemm.new_cache()
        logits, cache = gemm.decode(embeds, cache)
        gemm.decode(embeds[:, :1], cache)
    finally:
        gemm.kv_cache = "shared"
    assert calls == [1]  # the prompt, not the one-token step
    want, _ = plain.decode(embeds, plain.new_cache(8))
    assert np.abs(logits[0, -1] - want[0, -1]).max() < 0.05 * np.abs(want).max()


def test_a_temporary_folder_that_cannot_take_the_graphs_is_one_error(onnx_dir, monkeypatch):
    from lsd_edge.runtime.onnx import prefill

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prefill, "write_prefill", full)
    with pytest.raises(RuntimeModelError, match="No space left on device.*TMPDIR.*prefill='exported'"):
        OnnxRunner(onnx_dir, variant="int8", prefill="gemm")
    assert OnnxRunner(onnx_dir, variant="int8", prefill="exported").prefill_session is None


def test_prefill_choices_that_cannot_run_are_refused(onnx_dir):
    with pytest.raises(RuntimeModelError, match="prefill 'fast': choose one of auto, gemm, exported"):
        OnnxRunner(onnx_dir, variant="int8", prefill="fast")
    with pytest.raises(RuntimeModelError, match="fp32 decoder has no MatMulNBits weights"):
        OnnxRunner(onnx_dir, variant="fp32", prefill="gemm")


def test_the_kernel_script_measures_every_kernel_and_profiles_a_decoder(onnx_dir):
    """scripts/prefill_kernels.py (docs/BENCHMARKS.md's kernel figures) on a small product and the
    tiny export's int8 decoder: a row per kernel, the profile as exported and rewritten."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    decoder = onnx_dir / "onnx" / "decoder_model_merged_int8.onnx"
    cmd = [sys.executable, str(root / "scripts" / "prefill_kernels.py"), "--threads", "1"]
    cmd += ["--shape", "32", "64", "64", "--profile", str(decoder), "--tokens", "8"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [line for line in p.stdout.splitlines() if line.rstrip().endswith("GOPS")]
    assert len(rows) == 8 and any("int8 GEMM prefill" in r for r in rows)
    assert "as exported: prefill of 8 tokens" in p.stdout and "int8 GEMM prefill: prefill of 8" in p.stdout
    assert "MatMulInteger" in p.stdout.split("int8 GEMM prefill: prefill of 8")[1]
