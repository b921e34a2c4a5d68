"""The PyTorch runner: greedy or sampled generation with a KV cache from an HF LLaVA folder, and
batched greedy answers to eval questions (`greedy_answers`).

Prompts are built by the data side's `ChatEncoder` (the same ids training saw) and tokens are picked
by the one decode loop (`lsd_edge.runtime.textgen.decode_loop`) the ONNX runner uses too. Many eval
questions at a time go through HF `generate` with left padding instead: what `lsd-edge eval`,
distill's eval split, the export gates' PyTorch accuracy and regenerated data use.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from lsd_edge.data.chat import ChatEncoder, user_message
from lsd_edge.data.questions import EvalItem
from lsd_edge.models.groups import count_params
from lsd_edge.models.info import dir_size_mb
from lsd_edge.models.load import load_llava
from lsd_edge.models.tokens import stop_token_ids
from lsd_edge.runtime.runner import Progress, RunnerBase
from lsd_edge.runtime.textgen import Generation, PartTimer, SamplingParams, generate_tokens


class TorchRunner(RunnerBase):
    """`Runner` over a LlavaForConditionalGeneration (a folder, or a model already in memory)."""

    backend = "torch"

    def __init__(
        self, model_dir: str | Path, device: str = "cpu", dtype: str = "auto", name: str | None = None
    ):
        model, processor = load_llava(str(model_dir), dtype=dtype, device=device)
        self._attach(model, processor, Path(model_dir), name or Path(model_dir).name, device)

    @classmethod
    def from_model(cls, model, processor, name: str, device: str = "cpu") -> TorchRunner:
        """A runner over a model already in memory (e.g. random weights at a real architecture's size)."""
        runner = cls.__new__(cls)
        runner._attach(model.to(device), processor, None, name, device)
        return runner

    def _attach(self, model, processor, path: Path | None, name: str, device: str) -> None:
        self.path = path
        self.name = name
        self.device = torch.device(device)
        self.model, self.processor = model, processor
        self.model.eval()
        self.encoder = ChatEncoder(self.processor)
        self.stop_ids = set(stop_token_ids(self.processor, self.model))
        self.vocab_rows = len(self.processor.tokenizer)

    def info(self) -> dict:
        weights_mb = sum(p.numel() * p.element_size() for p in self.model.parameters()) / 2**20
        return {
            "name": self.name,
            "backend": self.backend,
            "path": None if self.path is None else str(self.path),
            "params": count_params(self.model)["total"],
            # in memory only: what save_pretrained would write
            "size_mb": round(weights_mb if self.path is None else dir_size_mb(self.path), 3),
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
        }

    def prompt_ids(self, question: str, with_image: bool) -> list[int]:
        return self.encoder.encode_prompt([user_message(question, 1 if with_image else 0)])

    def pixel_values(self, images: list) -> torch.Tensor | None:
        """(N, 3, H, W) in the model's dtype on its device, as the processor makes them; None for no image."""
        if not images:
            return None
        px = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return px.to(self.device, dtype=next(self.model.parameters()).dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def generate_ids(
        self,
        ids: list[int],
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        *,
        sampling: SamplingParams | None = None,
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
        t0: float | None = None,
        logits: list[np.ndarray] | None = None,
    ) -> Generation:
        """Generate after prompt ids (visual tokens expanded) and pixel values, if any.

        With a `logits` list, the prefill's logits at every prompt position (T, V) and then each
        decode step's (V,) are appended to it, as float32 numpy arrays (what the export's parity gate
        compares)."""
        tok = self.processor.tokenizer
        keep = {} if logits is not None else {"logits_to_keep": 1}
        cache = None

        def prefill() -> np.ndarray:
            nonlocal cache
            input_ids = torch.tensor([ids], device=self.device)
            out = self.model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True, **keep)
            cache = out.cache
            if logits is not None:
                logits.append(out.logits[0].float().cpu().numpy())
            return out.logits[0, -1].float().cpu().numpy()

        def step(token: int) -> np.ndarray:
            nonlocal cache
            out = self.model(
                input_ids=torch.tensor([[token]], device=self.device), cache=cache, use_cache=True
            )
            cache = out.cache
            row = out.logits[0, -1].float().cpu().numpy()
            if logits is not None:
                logits.append(row)
            return row

        vision = PartTimer(self._sync)
        with torch.inference_mode(), self._timed_vision(vision):
            return generate_tokens(
                prefill,
                step,
                prompt_tokens=len(ids),
                max_new_tokens=max_new_tokens,
                stop_ids=self.stop_ids,
                decode=lambda out: tok.decode(out, skip_special_tokens=True),
                sampling=sampling,
                ignore_eos=ignore_eos,
                on_text=on_text,
                vocab_rows=self.vocab_rows,
                t0=t0,
                sync=self._sync,
                vision=vision,
            )

    @contextmanager
    def _timed_vision(self, timer: PartTimer):
        """`timer` runs from the vision tower's input to the projector's output: LLaVA's forward
        encodes the image inside the prefill, and hooks time it there, without a second pass."""
        inner = self.model.model
        hooks = [
            inner.vision_tower.register_forward_pre_hook(lambda *_: timer.start()),
            inner.multi_modal_projector.register_forward_hook(lambda *_: timer.stop()),
        ]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def images_input(self, images: list) -> torch.Tensor | None:
        return self.pixel_values(images)

    def answers(
        self,
        items: list[EvalItem],
        max_new_tokens: int,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> list[str]:
        """Greedy answers to eval items (`Answerer`): `batch_size` at a time with left padding
        (`greedy_answers`, what `lsd-edge eval` and distill report), or with None one at a time through
        the decode loop, as the ONNX runner answers."""
        if batch_size is None:
            return super().answers(items, max_new_tokens, progress=progress)
        return greedy_answers(self.model, self.processor, items, max_new_tokens, batch_size, progress)


@torch.no_grad()
def greedy_answers(
    model, processor, items: list[EvalItem], max_new_tokens: int = 8, batch_size: int = 64, progress=None
) -> list[str]:
    """Greedy answers for eval items, batched with left padding."""
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop_token_ids(processor)[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        T = max(len(it.prompt_ids) for it in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, it in enumerate(chunk):
            ids[i, T - len(it.prompt_ids) :] = torch.tensor(it.prompt_ids)
            mask[i, T - len(it.prompt_ids) :] = 1
        imgs = [im for it in chunk for im in it.images]
        kwargs = {}
        if imgs:
            kwargs["pixel_values"] = processor.image_processor(images=imgs, return_tensors="pt")[
                "pixel_values"
            ].to(device, dtype=next(model.parameters()).dtype)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(processor, model),
            pad_token_id=pad,
            **kwargs,
        )
        for row in gen[:, T:]:
            out.append(tok.decode(row, skip_special_tokens=True))
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    model.train(was_training)
    return out
