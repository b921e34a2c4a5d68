"""Runners: one `generate(image, question, ...)` over a PyTorch model or an ONNX Runtime export.

`Runner` is the protocol that bench, eval-by-runner and the demo use. `TorchRunner` wraps a model
folder written by lsd-edge (HF format). This module imports torch only inside `TorchRunner`, so the
ONNX runner can live beside it in an environment where torch cannot be imported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from lsd_edge.errors import RuntimeModelError
from lsd_edge.textgen import Generation, SamplingParams, StreamDecoder, decode_loop, pick_token


@runtime_checkable
class Runner(Protocol):
    """What every backend offers. `on_text` receives the answer as it grows, piece by piece."""

    name: str
    backend: str  # "torch" or "onnx"

    def generate(
        self,
        image,
        question: str,
        max_new_tokens: int = 64,
        *,
        sampling: SamplingParams | None = None,
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation: ...

    def info(self) -> dict: ...


class TorchRunner:
    """Greedy or sampled generation with a KV cache from an HF LLaVA folder."""

    backend = "torch"

    def __init__(
        self, model_dir: str | Path, device: str = "cpu", dtype: str = "auto", name: str | None = None
    ):
        import torch

        from lsd_edge.data.llava import ChatEncoder
        from lsd_edge.models import load_llava, stop_token_ids

        self.torch = torch
        self.path = Path(model_dir)
        self.name = name or self.path.name
        self.device = torch.device(device)
        self.model, self.processor = load_llava(str(model_dir), dtype=dtype, device=device)
        self.model.eval()
        self.encoder = ChatEncoder(self.processor)
        self.stop_ids = set(stop_token_ids(self.processor, self.model))
        self.vocab_rows = len(self.processor.tokenizer)

    def info(self) -> dict:
        from lsd_edge.models import count_params, dir_size_mb

        return {
            "name": self.name,
            "backend": self.backend,
            "path": str(self.path),
            "params": count_params(self.model)["total"],
            "size_mb": round(dir_size_mb(self.path), 3),
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
        }

    def prompt_ids(self, question: str, with_image: bool) -> list[int]:
        from lsd_edge.data.llava import user_message

        return self.encoder.encode_prompt([user_message(question, 1 if with_image else 0)])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

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
        torch = self.torch
        sampling = sampling or SamplingParams()
        rng = np.random.default_rng(sampling.seed)
        tok = self.processor.tokenizer
        stream = StreamDecoder(lambda ids: tok.decode(ids, skip_special_tokens=True), on_text)
        t0 = time.perf_counter()
        ids = self.prompt_ids(question, image is not None)
        kwargs = {}
        if image is not None:
            px = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            kwargs["pixel_values"] = px.to(self.device, dtype=next(self.model.parameters()).dtype)
        input_ids = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs)
            cache = out.cache
            nxt = pick_token(out.logits[0, -1].float().cpu().numpy(), sampling, rng, self.vocab_rows)
            self._sync()
            ttft = time.perf_counter() - t0

            def step(token: int) -> np.ndarray:
                nonlocal cache
                out = self.model(
                    input_ids=torch.tensor([[token]], device=self.device), cache=cache, use_cache=True
                )
                cache = out.cache
                return out.logits[0, -1].float().cpu().numpy()

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
            self._sync()
        total = time.perf_counter() - t0
        return Generation(stream.text(), list(stream.ids), len(ids), ttft, total, stopped)


def load_runner(path: str | Path, device: str = "cpu", name: str | None = None, **kw) -> Runner:
    """A runner for a model folder: HF weights -> TorchRunner; ONNX files -> OnnxRunner."""
    p = Path(path)
    if not p.exists():
        raise RuntimeModelError(
            f"{p}: no such model folder; give a folder written by lsd-edge distill or export"
        )
    if any(p.glob("*.onnx")):
        from lsd_edge.onnx_runner import OnnxRunner  # torch-free

        return OnnxRunner(p, device=device, name=name, **kw)
    return TorchRunner(p, device=device, name=name, **kw)
