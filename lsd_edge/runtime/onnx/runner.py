"""The ONNX Runtime runner: greedy or sampled generation with a KV cache over an export folder, torch-free.

It builds the same prompt ids (`PromptBuilder`) and pixel values (`ImagePreprocessor`) as the
PyTorch runner and generates through the same decode loop (`lsd_edge.runtime.textgen`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lsd_edge.errors import RuntimeModelError
from lsd_edge.models.tokens import stop_ids
from lsd_edge.runtime.onnx.image import ImagePreprocessor
from lsd_edge.runtime.onnx.kv import ConcatCache, SharedCache, concat_step, new_concat_cache, shared_step
from lsd_edge.runtime.onnx.layout import (
    GRAPHS,
    REPORT,
    VARIANT_SUFFIX,
    first_line,
    graph_file,
    read_json_file,
    variants_in,
)
from lsd_edge.runtime.onnx.prefill import PREFILL_MODES, nbits_in, prefill_graph
from lsd_edge.runtime.onnx.prompt import PromptBuilder
from lsd_edge.runtime.runner import RunnerBase
from lsd_edge.runtime.textgen import Generation, PartTimer, SamplingParams, generate_tokens

_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Weight bytes per intra-op thread below which one more thread costs more (waking, splitting, joining
# the work of each op) than it saves: a graph gets one thread per this many bytes, at most the cores.
THREAD_BYTES = 8 * 2**20


def graph_threads(path: Path, requested: int | None = None) -> int:
    """Intra-op threads for one graph: `requested` (default: every core), but no more than its size
    makes worth it, so that more threads are never slower than fewer (a tiny decoder runs on one)."""
    cores = requested or os.cpu_count() or 1
    data = path.parent / f"{path.name}_data"
    size = path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    return max(1, min(cores, size // THREAD_BYTES))


class OnnxRunner(RunnerBase):
    """Greedy or sampled generation with a KV cache over an export folder, in ONNX Runtime alone.

    `variant` picks the graphs (fp32, int8, int4, fp16); by default the one the export was asked
    for (export_report.json), else fp32. The model builder's decoder keeps its KV cache in one
    preallocated buffer per layer that it updates in place (`lsd_edge.runtime.onnx.kv.SharedCache`,
    on the device on CUDA); lsd-edge's traced decoder grows it by concatenation (on CUDA kept on the
    device through IO binding; `io_binding=True` forces that path on the CPU too). `threads` caps
    each graph's intra-op threads (default: every core), and a small graph gets fewer
    (`graph_threads`). `session_config` entries go to every session (e.g.
    {"session.intra_op.allow_spinning": "0"} beside busy PyTorch work).

    `prefill`: how the image and a prompt (more than one token) go through the model. "gemm": their
    `MatMulNBits` weights run as ONNX Runtime's int8 GEMM (`lsd_edge.runtime.onnx.prefill`): the
    prompt through a copy of the decoder that shares the KV cache with the decoder running each new
    token, the image through a rewritten vision encoder in place of the exported one; "exported":
    the graphs as exported; "auto" (default): "gemm" for a 4-bit decoder on the CPU, where it is
    faster than the block format on long prompts, "exported" otherwise. `gemm_graphs` names the
    graphs it rewrote.
    """

    backend = "onnx"

    def __init__(
        self,
        folder: str | Path,
        device: str = "cpu",
        name: str | None = None,
        variant: str | None = None,
        threads: int | None = None,
        io_binding: bool | None = None,
        session_config: dict[str, str] | None = None,
        prefill: str = "auto",
    ):
        self.ort = ort
        self.path = Path(folder)
        if not self.path.is_dir():
            raise RuntimeModelError(f"{self.path}: no such export folder; run `lsd-edge export` first")
        report = self.path / REPORT
        self.report = read_json_file(report, "export report") if report.is_file() else {}
        self.variant = self._pick_variant(variant)
        self.name = name or f"{self.path.name} ({self.variant})"
        self.device = device
        if device not in ("cpu", "cuda"):
            raise RuntimeModelError(f"device '{device}': the ONNX runner runs on cpu or cuda")
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeModelError(
                "device cuda: this onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu "
                "(pip install -e .[gpu]) or run on cpu"
            )
        self.providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if device == "cuda"
            else ["CPUExecutionProvider"]
        )
        self.io_binding = device == "cuda" if io_binding is None else io_binding
        self.binding_device = "cuda" if device == "cuda" else "cpu"
        self.threads = threads
        self.session_config = session_config or {}
        self.config = read_json_file(self.path / "config.json", "model config")
        gen_path = self.path / "generation_config.json"
        self.generation_config = read_json_file(gen_path, "generation config") if gen_path.is_file() else {}
        self.graph_threads: dict[str, int] = {}
        self.prefill = self._pick_prefill(prefill)
        self.gemm_graphs: list[str] = []
        self.sessions = {g: self._graph_session(g) for g in GRAPHS}
        self._inspect_graphs()
        self.prefill_session = None
        if self.prefill == "gemm":
            self.prefill_session = self._gemm_session("decoder_model_merged", keep_outputs=True)
        self.prompts = PromptBuilder(self.path, self.n_image_tokens)
        self.preprocess = ImagePreprocessor.from_folder(self.path)
        self.stop_ids = self._stop_ids()
        self.vocab_rows = self.prompts.vocab_rows()
        self._token_rows: dict[int, np.ndarray] = {}

    # -- loading

    def _pick_variant(self, variant: str | None) -> str:
        have = variants_in(self.path)
        if variant is None:  # what the export was asked for: a missing file of it is an error, not a fallback
            variant = self.report.get("default_variant") or (
                "fp32" if "fp32" in have or not have else have[0]
            )
        if variant not in VARIANT_SUFFIX:
            raise RuntimeModelError(f"variant '{variant}': choose one of {', '.join(VARIANT_SUFFIX)}")
        for g in GRAPHS:
            f = self.path / graph_file(g, variant)
            if not f.is_file():
                found = f"; this folder has {', '.join(have)}" if have else ""
                raise RuntimeModelError(f"{f}: missing {variant} graph{found}; re-run `lsd-edge export`")
        return variant

    def _session(self, graph: str, made: Path | None = None):
        """A session of one graph file of the variant, or of `made` (a graph made from `graph`'s)."""
        ort = self.ort
        path = self.path / graph_file(graph, self.variant)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.device == "cpu":
            opts.intra_op_num_threads = self.graph_threads[graph] = graph_threads(path, self.threads)
        for k, v in self.session_config.items():
            opts.add_session_config_entry(k, v)
        try:
            return ort.InferenceSession(str(made or path), sess_options=opts, providers=self.providers)
        except Exception as e:  # ORT raises its own exception types for bad files; all mean the same here
            raise RuntimeModelError(
                f"{path}: cannot load ({first_line(e)}); the file is corrupt or incomplete, re-run `lsd-edge export`"
            ) from None

    def _inspect_graphs(self) -> None:
        dec = self.sessions["decoder_model_merged"]
        inputs = {i.name: i for i in dec.get_inputs()}
        for need in ("inputs_embeds", "attention_mask"):
            if need not in inputs:
                raise RuntimeModelError(
                    f"{self.path / graph_file('decoder_model_merged', self.variant)}: no input '{need}'; "
                    "not a decoder written by `lsd-edge export`"
                )
        self.has_position_ids = "position_ids" in inputs
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in dec.get_outputs() if o.name.startswith("present.")]
        self.present_names_by_past = [n.replace("past_key_values.", "present.", 1) for n in self.past_names]
        if not self.past_names or sorted(self.present_names) != sorted(self.present_names_by_past):
            raise RuntimeModelError(
                f"{self.path}: the decoder's past_key_values and present outputs do not pair up; re-run `lsd-edge export`"
            )
        first = inputs[self.past_names[0]]
        self.kv_heads = int(first.shape[1])
        self.head_dim = int(first.shape[3]) if isinstance(first.shape[3], int) else self._config_head_dim()
        self.kv_dtype = _ORT_FLOATS.get(first.type, np.float32)
        self.embeds_dtype = _ORT_FLOATS.get(inputs["inputs_embeds"].type, np.float32)
        logits = next(o for o in dec.get_outputs() if o.name == "logits")
        self.logits_dtype = _ORT_FLOATS.get(logits.type, np.float32)
        self.logit_rows = int(logits.shape[2]) if isinstance(logits.shape[2], int) else self._vocab()
        # The builder's decoder shares past and present in place (export_report.json says so).
        source = (self.report.get("decoder") or {}).get(self.variant) or {}
        self.kv_cache = source.get("kv_cache", "concat")
        if self.kv_cache == "shared" and logits.shape[1] != 1:
            raise RuntimeModelError(
                f"{self.path}: a shared-KV decoder must return the last position's logits only; re-run `lsd-edge export`"
            )
        feats = self.sessions["vision_encoder"].get_outputs()[0]
        k = feats.shape[1]
        self.n_image_tokens = int(k) if isinstance(k, int) else int(self.config.get("image_seq_length", 0))

    def _pick_prefill(self, mode: str) -> str:
        if mode not in PREFILL_MODES:
            raise RuntimeModelError(f"prefill '{mode}': choose one of {', '.join(PREFILL_MODES)}")
        if mode == "exported":
            return mode
        bits = nbits_in(self.path / graph_file("decoder_model_merged", self.variant))
        if mode == "auto":
            return "gemm" if self.device == "cpu" and 4 in bits else "exported"
        if self.device != "cpu":
            raise RuntimeModelError(
                "prefill 'gemm' runs on the CPU (ONNX Runtime's int8 GEMM); use 'exported' on cuda"
            )
        if not bits:
            raise RuntimeModelError(
                f"prefill 'gemm': the {self.variant} decoder has no MatMulNBits weights; it is for the "
                "int8 and int4 exports, use 'exported'"
            )
        return mode

    def _graph_session(self, graph: str):
        """A graph's session: the exported one, or with prefill "gemm" a vision encoder with
        `MatMulNBits` weights rewritten for the int8 GEMM (all of it runs once per image)."""
        path = self.path / graph_file(graph, self.variant)
        if graph == "vision_encoder" and self.prefill == "gemm" and nbits_in(path):
            return self._gemm_session(graph, keep_outputs=False)
        return self._session(graph)

    def _gemm_session(self, graph: str, keep_outputs: bool):
        """`graph` rewritten for the int8 GEMM, on the graph's thread count."""
        with prefill_graph(self.path / graph_file(graph, self.variant), keep_outputs) as made:
            self.gemm_graphs.append(graph)
            return self._session(graph, made)

    def _text_config(self) -> dict:
        return self.config.get("text_config") or {}

    def _config_head_dim(self) -> int:
        tc = self._text_config()
        if tc.get("head_dim"):
            return int(tc["head_dim"])
        if not tc.get("hidden_size") or not tc.get("num_attention_heads"):
            raise RuntimeModelError(
                f"{self.path / 'config.json'}: no text_config head size (head_dim, or hidden_size and "
                "num_attention_heads); re-run `lsd-edge export`"
            )
        return int(tc["hidden_size"]) // int(tc["num_attention_heads"])

    def _vocab(self) -> int:
        rows = self._text_config().get("vocab_size")
        if not rows:
            raise RuntimeModelError(
                f"{self.path / 'config.json'}: no text_config vocab_size; re-run `lsd-edge export`"
            )
        return int(rows)

    def _stop_ids(self) -> set[int]:
        tok = self.prompts.tokenizer
        unk = self.prompts.special.get("unk_token")

        def lookup(token: str) -> int | None:
            return None if token == unk else tok.token_to_id(token)

        eos = self.generation_config.get("eos_token_id")
        return set(stop_ids(lookup, eos_tokens=[self.prompts.eos_token], generation_eos=eos))

    def info(self) -> dict:
        files = [self.path / graph_file(g, self.variant) for g in GRAPHS]
        size = sum(f.stat().st_size for f in files)
        size += sum(p.stat().st_size for f in files for p in f.parent.glob(f.name + "_data"))
        return {
            "name": self.name,
            "backend": self.backend,
            "path": str(self.path),
            "variant": self.variant,
            "size_mb": round(size / 2**20, 3),
            "device": self.device,
            "providers": self.sessions["decoder_model_merged"].get_providers(),
            "kv_cache": self.kv_cache,
            "prefill": self.prefill,
            "gemm_graphs": list(self.gemm_graphs),
            "threads": dict(self.graph_threads),
        }

    # -- pieces of one generation, each one graph call

    def prompt_ids(self, question: str, with_image: bool) -> list[int]:
        return self.prompts.prompt_ids(question, with_image)

    def pixel_values(self, image) -> np.ndarray:
        """(1, 3, H, W) float32, as the model folder's image processor makes them."""
        return self.preprocess(image)

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) -> (N, K, D): vision encoder and projector."""
        return self.sessions["vision_encoder"].run(None, {"pixel_values": pixel_values.astype(np.float32)})[0]

    def embed(
        self, ids: list[int], pixel_values: np.ndarray | None = None, vision: PartTimer | None = None
    ) -> np.ndarray:
        """Prompt ids -> inputs_embeds (1, T, D), visual tokens replaced by image features in order;
        the vision encoder runs under the `vision` timer when one is given."""
        x = self.sessions["embed_tokens"].run(None, {"input_ids": np.asarray([ids], dtype=np.int64)})[0]
        if pixel_values is not None:
            with vision or nullcontext():
                feats = self.image_features(pixel_values)
            slots = np.flatnonzero(np.asarray(ids) == self.prompts.image_id)
            flat = feats.reshape(-1, feats.shape[-1])
            if len(slots) != flat.shape[0]:
                raise RuntimeModelError(
                    f"{len(slots)} image tokens in the prompt but {flat.shape[0]} image features; the export's "
                    "image_seq_length does not match its vision encoder, re-run `lsd-edge export`"
                )
            x[0, slots] = flat.astype(x.dtype)
        return x.astype(self.embeds_dtype, copy=False)

    def new_cache(self, capacity: int = 256) -> ConcatCache | SharedCache:
        """An empty KV cache for one sequence; a shared one is preallocated for `capacity` positions."""
        if self.kv_cache == "shared":
            return SharedCache(self, capacity)
        return new_concat_cache(self)

    def decode(self, embeds: np.ndarray, cache):
        """One decoder call: embeds (1, S, D) after `cache` -> logits and the grown cache. Logits are
        (1, S, V) from a traced decoder, (1, 1, V) (the last position) from the builder's."""
        if isinstance(cache, SharedCache):
            return shared_step(self, embeds, cache)
        return concat_step(self, embeds, cache)

    def embed_token(self, token: int) -> np.ndarray:
        """inputs_embeds (1, 1, D) of one generated token, looked up once per token id."""
        row = self._token_rows.get(token)
        if row is None:
            row = self.embed([token])
            if len(self._token_rows) < 65536:
                self._token_rows[token] = row
        return row

    # -- generation

    def generate_ids(
        self,
        ids: list[int],
        pixel_values: np.ndarray | None = None,
        max_new_tokens: int = 64,
        *,
        sampling: SamplingParams | None = None,
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
        t0: float | None = None,
    ) -> Generation:
        """Generate after prompt ids (visual tokens expanded) and the image's pixel values, if any."""
        cache = self.new_cache(len(ids) + max_new_tokens)
        vision = PartTimer()

        def prefill() -> np.ndarray:
            nonlocal cache
            logits, cache = self.decode(self.embed(ids, pixel_values, vision), cache)
            return logits[0, -1]

        def step(token: int) -> np.ndarray:
            nonlocal cache
            logits, cache = self.decode(self.embed_token(token), cache)
            return logits[0, -1]

        return generate_tokens(
            prefill,
            step,
            prompt_tokens=len(ids),
            max_new_tokens=max_new_tokens,
            stop_ids=self.stop_ids,
            decode=self.prompts.decode,
            sampling=sampling,
            ignore_eos=ignore_eos,
            on_text=on_text,
            vocab_rows=self.vocab_rows,
            t0=t0,
            vision=vision,
        )

    def images_input(self, images: list) -> np.ndarray | None:
        """(N, 3, H, W) pixel values of N images; None for none."""
        return np.concatenate([self.pixel_values(im) for im in images]) if images else None
