"""Why a 4-bit export's prompt goes through the int8 GEMM (docs/BENCHMARKS.md, "4 bits through the
int8 GEMM"): ONNX Runtime's CPU kernels on one prefill-sized product, and where a decoder's prefill
spends its time.

    python scripts/prefill_kernels.py --threads 2
    python scripts/prefill_kernels.py --threads 2 --profile runs/bench-arch/qwen0.5b-*/onnx/decoder_model_merged_q4.onnx

1. One (M x K) x (K x N) product (default 746 x 896 x 4864: a Qwen1.5-0.5B MLP projection over a
   740-token prompt) as fp32 `MatMul`, as `MatMulNBits` (4 and 8 bits, blocks of 32 to 256,
   accuracy_level 4: int8 compute), as ONNX Runtime's dynamic int8 (`MatMulInteger`, what
   `quantize_dynamic` writes), and as the int8 GEMM prefill's rewrite of the 4-bit node
   (`lsd_edge.runtime.onnx.prefill`): the best of 10 runs, in ms and GOPS.
2. With --profile DECODER: ONNX Runtime's profiler over one prefill of --tokens positions through
   that decoder graph (random embeddings, an empty cache), time per op type, as exported and
   rewritten by `write_prefill`.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from lsd_edge.runtime.onnx.prefill import write_prefill


def matmul(k: int, n: int) -> onnx.ModelProto:
    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.02).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y0"]), helper.make_node("Relu", ["y0"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def nbits(model: onnx.ModelProto, bits: int, block: int) -> onnx.ModelProto:
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True, accuracy_level=4)
    q.process()
    return q.model.model


def session(path: Path, threads: int, profile: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def best_ms(s: ort.InferenceSession, feeds: dict, runs: int) -> float:
    for _ in range(2):
        s.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def kernels(m: int, k: int, n: int, threads: int, tmp: Path) -> None:
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    fp32 = tmp / "fp32.onnx"
    onnx.save(matmul(k, n), str(fp32))
    graphs = {"fp32 MatMul": fp32}
    quantize_dynamic(str(fp32), str(tmp / "dyn.onnx"), weight_type=QuantType.QInt8, per_channel=True)
    graphs["dynamic int8 (MatMulInteger)"] = tmp / "dyn.onnx"
    for bits, block in ((8, 32), (4, 32), (4, 64), (4, 128), (4, 256)):
        path = tmp / f"nbits{bits}-{block}.onnx"
        onnx.save(nbits(matmul(k, n), bits, block), str(path))
        graphs[f"MatMulNBits {bits} bits, block {block}"] = path
    write_prefill(tmp / "nbits4-32.onnx", tmp / "gemm.onnx")
    graphs["int8 GEMM prefill of the 4-bit node"] = tmp / "gemm.onnx"
    print(f"({m} x {k}) x ({k} x {n}), {threads} thread(s), best of 10:")
    for name, path in graphs.items():
        ms = best_ms(session(path, threads), {"x": x}, 10)
        print(f"  {name:38s} {ms:8.2f} ms {2 * m * k * n / ms / 1e6:8.0f} GOPS", flush=True)


def profile(decoder: Path, tokens: int, threads: int, tmp: Path) -> None:
    rewritten = tmp / "prefill" / decoder.name
    rewritten.parent.mkdir()
    write_prefill(decoder, rewritten)
    for label, path in (("as exported", decoder), ("int8 GEMM prefill", rewritten)):
        s = session(path, threads, str(tmp / "profile"))
        feeds = {}
        for i in s.get_inputs():
            if i.name == "inputs_embeds":
                feeds[i.name] = (
                    np.random.default_rng(0).standard_normal((1, tokens, i.shape[2])).astype(np.float32)
                )
            elif i.name == "attention_mask":
                feeds[i.name] = np.ones((1, tokens), np.int64)
            elif i.name == "position_ids":
                feeds[i.name] = np.arange(tokens, dtype=np.int64)[None]
            else:  # past keys and values: empty
                feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        ms = best_ms(s, feeds, 3)
        events = json.loads(Path(s.end_profiling()).read_text())
        last = [e for e in events if e.get("name") == "model_run"][-1]
        per_op = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last["ts"]:
                per_op[e["args"]["op_name"]] += e["dur"] / 1000
        total = sum(per_op.values())
        print(
            f"{decoder.name} {label}: prefill of {tokens} tokens {ms:,.0f} ms ({tokens / ms * 1000:,.0f} tokens/s)"
        )
        for op, t in per_op.most_common(6):
            print(f"  {op:34s} {t:8.1f} ms {100 * t / total:5.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=3, default=[746, 896, 4864], metavar=("M", "K", "N"))
    ap.add_argument("--profile", type=Path, default=None, help="a decoder graph with MatMulNBits weights")
    ap.add_argument("--tokens", type=int, default=746)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="prefill-kernels-") as tmp:
        kernels(*a.shape, a.threads, Path(tmp))
        if a.profile is not None:
            profile(a.profile, a.tokens, a.threads, Path(tmp))


if __name__ == "__main__":
    main()
