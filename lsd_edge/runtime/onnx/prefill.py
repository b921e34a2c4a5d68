"""The int8 GEMM prefill: graphs whose weights are `MatMulNBits` (the int8 and int4 exports) read
the prompt and its image through ONNX Runtime's int8 GEMM instead. torch-free.

On the CPU, `MatMulNBits` (blocks of 32, int8 activations: accuracy_level 4) multiplies a prompt of
hundreds of tokens at about a third of the speed of ONNX Runtime's int8 GEMM (MLAS's QGEMM, VNNI where
the CPU has it): 491 against 1,468 GOPS for a (746 x 896) x (896 x 4864) product on 2 cores of the
machine in docs/BENCHMARKS.md (`scripts/prefill_kernels.py`). A decode step (one row, memory-bound) is where the block format pays;
the prefill is compute-bound and, at 4 bits, was no faster than llama.cpp's Q4_0 there; the vision
encoder (hundreds of patches, once per image) is all prefill, and its 4-bit graph was 2.5x slower
than its int8 one.

`write_prefill` rewrites a graph: every `MatMulNBits` with constant weights (in the decoder, except
the one whose output is a graph output: the pruned lm_head, one row) becomes

    y[t, n] = a[t] * s[n] * sum_k (xq[t, k] - 128) * wq[k, n]       (MatMulInteger, a_zero_point 128)

- activations per token: a[t] = max_k |x[t, k]| / 127, xq = round(x / a) + 128 (uint8, 1..255);
- weights per output column, once when the runner loads: the block-dequantized weight the decode
  graph computes with, W[k, n] = (q[n, k] - z) * scale[n, k // block] (z = 2^(bits-1) when the
  node has no zero points), requantized to s[n] = max_k |W[k, n]| / 63 and wq = round(W / s)
  (`int8_weights`). 7 bits, not 8: on AVX2 CPUs without VNNI, MLAS's u8 x s8 kernel sums pairs of
  products in 16 bits (VPMADDUBSW), where 255 x 63 x 2 fits and 255 x 127 x 2 saturates. The
  requantization adds at most s[n] / 2 = max |W| / 126 per weight: at 4 bits that is a sixteenth of
  the largest block's step.

The rewritten decoder is the same graph otherwise (attention, norms, KV cache inputs and outputs), so
the runner binds one KV cache to both: the prompt through this one, each new token through the
decoder as exported (`lsd_edge.runtime.onnx.kv`). Its int8 weights live in memory beside the
decoder's own (for Qwen1.5-0.5B about 300 MB beside 285 MB at int4). The vision encoder has no
decode step: the rewritten one replaces it (its weights in memory at 8 bits instead of 4).
`OnnxRunner(prefill="exported")` runs the graphs as exported. Nothing is written to the export
folder: the export and what other runtimes load (transformers.js, the browser page) stay as they are.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lsd_edge.errors import RuntimeModelError
from lsd_edge.runtime.onnx.layout import first_line

PREFILL_MODES = ("auto", "gemm", "exported")
WEIGHT_MAX = 63  # 7-bit weights: no 16-bit saturation in MLAS's AVX2 u8 x s8 kernel
ACT_MAX = 127


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def unpack_nbits(packed: np.ndarray, bits: int, n: int, blocks: int, block: int) -> np.ndarray:
    """`MatMulNBits`'s packed weight (N, blocks, block * bits / 8) uint8 -> (N, blocks, block) uint8
    codes; at 4 bits the first of each pair is in the low nibble."""
    if bits == 8:
        return packed.reshape(n, blocks, block)
    if bits != 4:
        raise ValueError(f"{bits}-bit MatMulNBits")
    codes = np.empty((n, blocks, block), dtype=np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return codes


def zero_points(zp: np.ndarray | None, bits: int, n: int, blocks: int, dtype) -> np.ndarray:
    """(N, blocks, 1) zero points: the node's (uint8, packed like the weights; or float) or the
    symmetric default 2^(bits-1)."""
    if zp is None:
        return np.full((n, blocks, 1), 2 ** (bits - 1), dtype=dtype)
    if zp.dtype == np.uint8 and bits == 4:  # two blocks' zero points a byte, the first in the low nibble
        rows = zp.reshape(n, -1)
        out = np.empty((n, rows.shape[1] * 2), dtype=np.uint8)
        out[:, 0::2], out[:, 1::2] = rows & 0x0F, rows >> 4
        zp = out[:, :blocks]
    return zp.reshape(n, blocks, 1).astype(dtype)


def int8_weights(
    packed: np.ndarray,
    scales: np.ndarray,
    k: int,
    n: int,
    bits: int,
    block: int,
    zp: np.ndarray | None = None,
    qmax: int = WEIGHT_MAX,
) -> tuple[np.ndarray, np.ndarray]:
    """A `MatMulNBits` weight as (wq (K, N) int8, s (N,) float32) with wq * s ~ W, per output column:

        W[k, n] = (q[n, k] - z[n, k // block]) * scale[n, k // block]
        s[n] = max_k |W[k, n]| / qmax,  wq[k, n] = round(W[k, n] / s[n])

    (a column of zeros gets s = 1e-30 and wq = 0)."""
    blocks = -(-k // block)
    codes = unpack_nbits(packed, bits, n, blocks, block).astype(np.float32)
    w = (codes - zero_points(zp, bits, n, blocks, np.float32)) * scales.reshape(n, blocks, 1).astype(
        np.float32
    )
    w = w.reshape(n, blocks * block)[:, :k]
    s = np.maximum(np.abs(w).max(axis=1) / qmax, np.float32(1e-30)).astype(np.float32)
    wq = np.clip(np.rint(w / s[:, None]), -qmax, qmax).astype(np.int8)
    return np.ascontiguousarray(wq.T), s


class DataFile:
    """The external data file of a graph being written: each tensor appended at a page boundary (ONNX
    Runtime maps the file, and releases what a kernel has packed into its own buffers)."""

    ALIGN = 4096

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close())

    def add(self, name: str, data: bytes | memoryview, dims, data_type: int) -> TensorProto:
        pad = -self.file.tell() % self.ALIGN
        self.file.write(b"\0" * pad)
        offset = self.file.tell()
        self.file.write(data)
        t = TensorProto(name=name, data_type=data_type, dims=list(dims))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(len(data)))):
            t.external_data.add(key=k, value=v)
        return t

    def array(self, name: str, value: np.ndarray) -> TensorProto:
        value = np.ascontiguousarray(value)
        return self.add(name, value.tobytes(), value.shape, helper.np_dtype_to_tensor_dtype(value.dtype))

    def close(self) -> None:
        self.file.close()


def external_bytes(t: TensorProto, base: Path) -> bytes:
    """The bytes of a tensor whose data is in an external file beside its graph."""
    info = {e.key: e.value for e in t.external_data}
    with open(base / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"])) if "length" in info else f.read()


def load_array(t: TensorProto, base: Path) -> np.ndarray:
    return numpy_helper.to_array(t, base_dir=str(base))


class _Rewriter:
    """Builds the nodes of one rewritten graph, its new weights written to `data` as they are made
    and its shared constants added once."""

    def __init__(self, data: DataFile, opset: int):
        self.data = data
        self.opset = opset
        self.added: dict[str, TensorProto] = {}

    def const(self, name: str, value) -> str:
        if name not in self.added:
            self.added[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    def weight(self, name: str, value: np.ndarray) -> str:
        self.added[name] = self.data.array(name, value)
        return name

    def max_last(self, x: str, out: str):
        """max over the last axis, kept: ReduceMax takes its axes as an input from opset 18 on."""
        if self.opset >= 18:
            axis = self.const("prefill/axis_last", np.array([-1], dtype=np.int64))
            return helper.make_node("ReduceMax", [x, axis], [out], keepdims=1)
        return helper.make_node("ReduceMax", [x], [out], axes=[-1], keepdims=1)

    def gemm(self, node, wq: np.ndarray, s: np.ndarray, bias: str | None) -> list:
        """The nodes computing `node`'s output with per-token uint8 activations and int8 weights."""
        p = f"{node.name or node.output[0]}/prefill"
        x = node.input[0]
        w = self.weight(f"{p}/wq", wq)
        sc = self.const(f"{p}/s", s)
        amax = self.const("prefill/act_max", np.array(ACT_MAX, dtype=np.float32))
        tiny = self.const("prefill/tiny", np.array(1e-30, dtype=np.float32))
        shift = self.const("prefill/shift", np.array(128, dtype=np.float32))
        zp = self.const("prefill/zero_point", np.array(128, dtype=np.uint8))
        out = node.output[0]
        nodes = [
            helper.make_node("Abs", [x], [f"{p}/abs"]),
            self.max_last(f"{p}/abs", f"{p}/max"),
            helper.make_node("Div", [f"{p}/max", amax], [f"{p}/a0"]),
            helper.make_node("Max", [f"{p}/a0", tiny], [f"{p}/a"]),
            helper.make_node("Div", [x, f"{p}/a"], [f"{p}/xa"]),
            helper.make_node("Round", [f"{p}/xa"], [f"{p}/xr"]),
            helper.make_node("Add", [f"{p}/xr", shift], [f"{p}/xs"]),
            helper.make_node("Cast", [f"{p}/xs"], [f"{p}/xq"], to=TensorProto.UINT8),
            helper.make_node("MatMulInteger", [f"{p}/xq", w, zp], [f"{p}/yi"]),
            helper.make_node("Cast", [f"{p}/yi"], [f"{p}/yf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}/yf", f"{p}/a"], [f"{p}/ya"]),
        ]
        if bias:
            nodes += [
                helper.make_node("Mul", [f"{p}/ya", sc], [f"{p}/ys"]),
                helper.make_node("Add", [f"{p}/ys", bias], [out]),
            ]
        else:
            nodes.append(helper.make_node("Mul", [f"{p}/ya", sc], [out]))
        for i, nd in enumerate(nodes):
            nd.name = f"{p}/{i}"
        return nodes


def write_prefill(src: Path, dst: Path, keep_outputs: bool = True) -> int:
    """The graph `src` rewritten, as the module docstring says, written to `dst` (its weights to
    `<dst>_data`, one tensor at a time: memory holds one weight's conversion, not the model).
    Returns how many nodes were rewritten. A node is left as it is when its weight, scales or zero
    points are not initializers, it has a `g_idx`, or (`keep_outputs`) it makes a graph output."""
    base = src.parent
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    data = DataFile(dst.parent / f"{dst.name}_data")
    try:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
        rw = _Rewriter(data, opset)
        nodes, count = [], 0
        for node in g.node:
            ins = list(node.input) + [""] * (6 - len(node.input))
            convertible = (
                node.op_type == "MatMulNBits"
                and not (keep_outputs and node.output[0] in outputs)
                and all(i in inits for i in ins[1:3])
                and (not ins[3] or ins[3] in inits)
                and not ins[4]
                and _attr(node, "bits", 4) in (4, 8)
            )
            if not convertible:
                nodes.append(node)
                continue
            k, n, bits, block = (_attr(node, a) for a in ("K", "N", "bits", "block_size"))
            zp = load_array(inits[ins[3]], base) if ins[3] else None
            packed, scales = (load_array(inits[i], base) for i in ins[1:3])
            wq, s = int8_weights(packed, scales, k, n, bits, block, zp)
            nodes += rw.gemm(node, wq, s, ins[5] or None)
            count += 1
        used = {i for nd in nodes for i in nd.input}
        kept = []
        for t in g.initializer:
            if t.name not in used:
                continue
            if t.data_location == TensorProto.EXTERNAL:
                t = data.add(t.name, external_bytes(t, base), t.dims, t.data_type)
            kept.append(t)
    finally:
        data.close()
    del g.initializer[:]
    g.initializer.extend([*kept, *rw.added.values()])
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(dst))
    return count


def nbits_in(path: Path) -> set[int]:
    """The bit widths of the `MatMulNBits` nodes in a graph (its weights not loaded)."""
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's and onnx's own errors for a bad file; all mean the same here
        raise RuntimeModelError(
            f"{path}: cannot load ({first_line(e)}); the file is corrupt or incomplete, re-run `lsd-edge export`"
        ) from None
    return {int(_attr(n, "bits", 4)) for n in m.graph.node if n.op_type == "MatMulNBits"}


@contextmanager
def prefill_graph(path: Path, keep_outputs: bool = True):
    """The graph at `path` rewritten (`write_prefill`), in a temporary folder for the time a session
    takes to load it (the session keeps what it needs; the files are then deleted)."""
    with tempfile.TemporaryDirectory(prefix="lsd-edge-prefill-") as tmp:
        dst = Path(tmp) / path.name
        try:
            count = write_prefill(path, dst, keep_outputs)
        except OSError as e:  # a full disk, a read-only temporary folder
            raise RuntimeModelError(
                f"cannot write the int8 GEMM prefill of {path.name} to {tmp} ({e.strerror or e}); free "
                "space there or set TMPDIR to another folder, or load with prefill='exported'"
            ) from None
        if count == 0:
            raise RuntimeModelError(
                f"{path}: no MatMulNBits weights to run as an int8 GEMM; the int8 GEMM prefill is for "
                "the int8 and int4 exports (use prefill='exported')"
            )
        yield dst
