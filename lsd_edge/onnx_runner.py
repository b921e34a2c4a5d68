"""The ONNX Runtime runner and the layout of an exported folder; needs no torch.

An export folder (written by `lsd_edge.export`) holds three graphs, in fp32 and optionally in one
quantized variant beside them (`<graph><suffix>.onnx`):

- `vision_encoder.onnx`: pixel_values (N, 3, H, W) -> image_features (N, K, D), projector included;
- `embed_tokens.onnx`: input_ids (B, S) -> inputs_embeds (B, S, D);
- `decoder_model_merged.onnx`: inputs_embeds, attention_mask (B, P+S), position_ids (B, S),
  past_key_values.{i}.key/value (B, kv_heads, P, head_dim) -> logits (B, S, V), present.{i}.key/value
  (B, kv_heads, P+S, head_dim); P = 0 is the prefill, S = 1 a decode step,

plus config.json, generation_config.json, the tokenizer (tokenizer.json, tokenizer_config.json),
the chat template (chat_template.jinja) and the image processor (processor_config.json), and
export_report.json. `OnnxRunner` reads all of it with onnxruntime, numpy, tokenizers, jinja2 and
PIL only, and builds the same prompt ids and pixel values as the PyTorch runner.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lsd_edge.errors import RuntimeModelError
from lsd_edge.textgen import Generation, SamplingParams, StreamDecoder, decode_loop, pick_token

GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
# Precision -> file suffix, as web and ONNX Runtime users name VLM variants.
VARIANT_SUFFIX = {"fp32": "", "int8": "_int8", "int4": "_q4", "fp16": "_fp16"}
REPORT = "export_report.json"
IMAGE_TOKEN = "<image>"
# Tokens that end a turn in common chat templates; the ones the vocabulary has are stop tokens.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>")
# ONNX Runtime reports these element types for float tensors; past key/values are created to match.
_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def graph_file(graph: str, variant: str = "fp32") -> str:
    return f"{graph}{VARIANT_SUFFIX[variant]}.onnx"


def variants_in(folder: str | Path) -> list[str]:
    """The variants whose three graphs are all in `folder`, fp32 first."""
    folder = Path(folder)
    return [v for v in VARIANT_SUFFIX if all((folder / graph_file(g, v)).is_file() for g in GRAPHS)]


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RuntimeModelError(
            f"{path}: missing {what}; re-run `lsd-edge export` to write a complete folder"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RuntimeModelError(f"{path}: not valid JSON ({e}); re-run `lsd-edge export`") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# ------------------------------------------------------------------------------------------- text side


def _token_text(tok) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a dict with 'content'."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class PromptBuilder:
    """Chat template + tokenizer, as `ChatEncoder.encode_prompt` renders and tokenizes a question."""

    def __init__(self, folder: Path, n_image_tokens: int):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        tok_path = folder / "tokenizer.json"
        if not tok_path.is_file():
            raise RuntimeModelError(f"{tok_path}: missing tokenizer; re-run `lsd-edge export`")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # a damaged tokenizer file is a bad input
            raise RuntimeModelError(f"{tok_path}: cannot read the tokenizer ({_first_line(e)})") from None
        tok_config = _read_json(folder / "tokenizer_config.json", "tokenizer config")
        proc_config = (
            _read_json(folder / "processor_config.json", "processor config")
            if (folder / "processor_config.json").is_file()
            else {}
        )
        self.template_text = self._template(folder, tok_config, proc_config)
        # The environment transformers renders chat templates in, so the same template gives the same text.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
            json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
            )
        )
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.template = env.from_string(self.template_text)
        self.special = {
            k: _token_text(tok_config.get(k))
            for k in (
                "bos_token",
                "eos_token",
                "unk_token",
                "sep_token",
                "pad_token",
                "cls_token",
                "mask_token",
            )
            if _token_text(tok_config.get(k)) is not None
        }
        self.cleanup = bool(tok_config.get("clean_up_tokenization_spaces", False)) and (
            type(self.tokenizer.model).__name__ != "BPE"
        )
        image_token = proc_config.get("image_token", IMAGE_TOKEN)
        self.image_id = self.tokenizer.token_to_id(image_token)
        if self.image_id is None:
            raise RuntimeModelError(
                f"{tok_path}: the tokenizer has no {image_token} token; re-run `lsd-edge export`"
            )
        self.n_image_tokens = n_image_tokens
        self.eos_token = self.special.get("eos_token")

    @staticmethod
    def _template(folder: Path, tok_config: dict, proc_config: dict) -> str:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        for cfg in (proc_config, tok_config):
            if isinstance(cfg.get("chat_template"), str):
                return cfg["chat_template"]
        raise RuntimeModelError(
            f"{folder}: no chat template (chat_template.jinja); re-run `lsd-edge export` from a model folder that has one"
        )

    def prompt_ids(self, question: str, with_image: bool) -> list[int]:
        """Token ids of a one-turn prompt ending with the assistant's generation prompt; `<image>` expanded."""
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
        text = self.template.render(
            messages=[{"role": "user", "content": content}], add_generation_prompt=True, **self.special
        )
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.n_image_tokens if t == self.image_id else [t])
        return out

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.cleanup:  # transformers' clean_up_tokenization, for tokenizers configured with it
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
                text = text.replace(a, b)
            for a, b in ((" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def vocab_rows(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def _raise_template_error(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


# ------------------------------------------------------------------------------------------ image side


@dataclass
class ImagePreprocessor:
    """The saved image-processor config applied with PIL + numpy, step for step as transformers' PIL backend:
    RGB (alpha over white), resize, center crop, rescale (in float64, then float32), normalize, CHW."""

    size: dict
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = False
    crop_size: dict | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_folder(cls, folder: Path) -> ImagePreprocessor:
        if (folder / "processor_config.json").is_file():
            cfg = _read_json(folder / "processor_config.json", "processor config").get("image_processor")
        else:
            cfg = None
        if cfg is None and (folder / "preprocessor_config.json").is_file():
            cfg = _read_json(folder / "preprocessor_config.json", "image processor config")
        if not cfg:
            raise RuntimeModelError(
                f"{folder}: no image processor config (processor_config.json); re-run `lsd-edge export`"
            )
        size = cfg.get("size") or {}
        if not (("height" in size and "width" in size) or "shortest_edge" in size):
            raise RuntimeModelError(
                f"{folder}: image processor size {size} is not supported; give height and width or shortest_edge"
            )

        def triple(v, default):
            v = default if v is None else v
            return tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v, v, v]))

        return cls(
            size=size,
            resample=int(cfg.get("resample", 3)),
            do_resize=cfg.get("do_resize", True),
            do_center_crop=bool(cfg.get("do_center_crop", False)),
            crop_size=cfg.get("crop_size"),
            do_rescale=cfg.get("do_rescale", True),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_normalize=cfg.get("do_normalize", True),
            image_mean=triple(cfg.get("image_mean"), 0.5),
            image_std=triple(cfg.get("image_std"), 0.5),
        )

    def _target(self, h: int, w: int) -> tuple[int, int]:
        if "height" in self.size:
            return int(self.size["height"]), int(self.size["width"])
        s = int(self.size["shortest_edge"])
        if w <= h:
            return int(s * h / w), s
        return s, int(s * w / h)

    def __call__(self, image) -> np.ndarray:
        """One PIL image -> pixel values (1, 3, H, W) float32."""
        from PIL import Image

        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert("RGB")
        if self.do_resize:
            h, w = self._target(image.height, image.width)
            image = image.resize((w, h), resample=Image.Resampling(self.resample))
        x = np.asarray(image).transpose(2, 0, 1)  # (3, H, W) uint8
        if self.do_center_crop and self.crop_size:
            x = _center_crop(x, int(self.crop_size["height"]), int(self.crop_size["width"]))
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            mean = np.array(self.image_mean, dtype=np.float32)
            std = np.array(self.image_std, dtype=np.float32)
            x = ((x.T - mean) / std).T
        return np.ascontiguousarray(x[None], dtype=np.float32)


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """(C, H, W) -> (C, ch, cw), zero-padded where the image is smaller, as transformers does."""
    _, h, w = x.shape
    nh, nw = max(ch, h), max(cw, w)
    canvas = np.zeros(x.shape[:-2] + (nh, nw), dtype=x.dtype)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)
    canvas[..., tp : tp + h, lp : lp + w] = x
    top, left = (h - ch) // 2 + tp, (w - cw) // 2 + lp
    return canvas[..., max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


# ----------------------------------------------------------------------------------------------- runner


class KVCache:
    """Past keys and values of every layer, by decoder input name; numpy arrays or device OrtValues."""

    def __init__(self, tensors: dict, length: int):
        self.tensors = tensors
        self.length = length


class OnnxRunner:
    """Greedy or sampled generation with a KV cache over an export folder, in ONNX Runtime alone.

    `variant` picks the graphs (fp32, int8, int4, fp16); by default the one the export was asked
    for (export_report.json), else fp32. On CUDA the cache stays on the device through IO binding;
    `io_binding=True` forces that path on the CPU too. `session_config` entries go to every
    session (e.g. {"session.intra_op.allow_spinning": "0"} beside busy PyTorch work).
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
    ):
        import onnxruntime as ort

        self.ort = ort
        self.path = Path(folder)
        if not self.path.is_dir():
            raise RuntimeModelError(f"{self.path}: no such export folder; run `lsd-edge export` first")
        report = self.path / REPORT
        self.report = _read_json(report, "export report") if report.is_file() else {}
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
        self.config = _read_json(self.path / "config.json", "model config")
        gen_path = self.path / "generation_config.json"
        self.generation_config = _read_json(gen_path, "generation config") if gen_path.is_file() else {}
        self.sessions = {g: self._session(g) for g in GRAPHS}
        self._inspect_graphs()
        self.prompts = PromptBuilder(self.path, self.n_image_tokens)
        self.preprocess = ImagePreprocessor.from_folder(self.path)
        self.stop_ids = self._stop_ids()
        self.vocab_rows = self.prompts.vocab_rows()

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

    def _session(self, graph: str):
        ort = self.ort
        path = self.path / graph_file(graph, self.variant)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        for k, v in self.session_config.items():
            opts.add_session_config_entry(k, v)
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as e:  # ORT raises its own exception types for bad files; all mean the same here
            raise RuntimeModelError(
                f"{path}: cannot load ({_first_line(e)}); the file is corrupt or incomplete, re-run `lsd-edge export`"
            ) from None

    def _inspect_graphs(self) -> None:
        dec = self.sessions["decoder_model_merged"]
        inputs = {i.name: i for i in dec.get_inputs()}
        for need in ("inputs_embeds", "attention_mask", "position_ids"):
            if need not in inputs:
                raise RuntimeModelError(
                    f"{self.path / graph_file('decoder_model_merged', self.variant)}: no input '{need}'; "
                    "not a decoder written by `lsd-edge export`"
                )
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in dec.get_outputs() if o.name.startswith("present.")]
        if len(self.past_names) != len(self.present_names) or not self.past_names:
            raise RuntimeModelError(
                f"{self.path}: the decoder's past_key_values and present outputs do not pair up; re-run `lsd-edge export`"
            )
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = _ORT_FLOATS.get(first.type, np.float32)
        self.embeds_dtype = _ORT_FLOATS.get(inputs["inputs_embeds"].type, np.float32)
        feats = self.sessions["vision_encoder"].get_outputs()[0]
        k = feats.shape[1]
        self.n_image_tokens = int(k) if isinstance(k, int) else int(self.config.get("image_seq_length", 0))

    def _stop_ids(self) -> set[int]:
        tok = self.prompts.tokenizer
        unk = self.prompts.special.get("unk_token")
        ids = set()
        for t in END_OF_TURN + ((self.prompts.eos_token,) if self.prompts.eos_token else ()):
            tid = tok.token_to_id(t)
            if tid is not None and t != unk:
                ids.add(tid)
        eos = self.generation_config.get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
        return ids

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

    def embed(self, ids: list[int], pixel_values: np.ndarray | None = None) -> np.ndarray:
        """Prompt ids -> inputs_embeds (1, T, D), visual tokens replaced by image features in order."""
        x = self.sessions["embed_tokens"].run(None, {"input_ids": np.asarray([ids], dtype=np.int64)})[0]
        if pixel_values is not None:
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

    def new_cache(self, batch: int = 1) -> KVCache:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        if self.io_binding:
            tensors = {
                n: self.ort.OrtValue.ortvalue_from_numpy(empty, self.binding_device, 0)
                for n in self.past_names
            }
        else:
            tensors = dict.fromkeys(self.past_names, empty)
        return KVCache(tensors, 0)

    def decode(self, embeds: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """One decoder call: embeds (1, S, D) after `cache` -> logits (1, S, V) and the grown cache."""
        b, s = embeds.shape[:2]
        p = cache.length
        feed = {
            "inputs_embeds": embeds,
            "attention_mask": np.ones((b, p + s), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy(),
        }
        dec = self.sessions["decoder_model_merged"]
        if not self.io_binding:
            outs = dec.run(["logits", *self.present_names], {**feed, **cache.tensors})
            present = dict(zip(self.past_names, outs[1:], strict=True))
            return outs[0], KVCache(present, p + s)
        # The cache never leaves the device: present outputs are bound on it and fed back as the next past.
        binding = dec.io_binding()
        for k, v in feed.items():
            binding.bind_cpu_input(k, v)
        for k, v in cache.tensors.items():
            binding.bind_ortvalue_input(k, v)
        binding.bind_output("logits", "cpu")
        for n in self.present_names:
            binding.bind_output(n, self.binding_device, 0)
        dec.run_with_iobinding(binding)
        outs = binding.get_outputs()
        present = dict(zip(self.past_names, outs[1:], strict=True))
        return outs[0].numpy(), KVCache(present, p + s)

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
        sampling = sampling or SamplingParams()
        rng = np.random.default_rng(sampling.seed)
        stream = StreamDecoder(self.prompts.decode, on_text)
        t0 = time.perf_counter() if t0 is None else t0
        logits, cache = self.decode(self.embed(ids, pixel_values), self.new_cache())
        nxt = pick_token(logits[0, -1], sampling, rng, self.vocab_rows)
        ttft = time.perf_counter() - t0

        def step(token: int) -> np.ndarray:
            nonlocal cache
            logits, cache = self.decode(self.embed([token]), cache)
            return logits[0, -1]

        stopped = decode_loop(
            nxt,
            step,
            max_new_tokens,
            self.stop_ids,
            stream,
            sampling=sampling,
            rng=rng,
            vocab_rows=self.vocab_rows,
            ignore_eos=ignore_eos,
        )
        total = time.perf_counter() - t0
        return Generation(stream.text(), list(stream.ids), len(ids), ttft, total, stopped)

    def generate(
        self,
        image,
        question: str,
        max_new_tokens: int = 64,
        *,
        sampling: SamplingParams | None = None,
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        t0 = time.perf_counter()
        ids = self.prompt_ids(question, image is not None)
        px = self.pixel_values(image) if image is not None else None
        return self.generate_ids(
            ids, px, max_new_tokens, sampling=sampling, ignore_eos=ignore_eos, on_text=on_text, t0=t0
        )
