"""The runtimes `lsd-edge verify` runs in this process: PyTorch, ONNX Runtime and llama.cpp.

Each is an `Answerer` the one accuracy path scores (`lsd_edge.evaluate.accuracy`) and gives the
logits of the first answer token after each prompt, for the first-token KL against PyTorch's:
PyTorch's runner (answers batched, as `lsd-edge eval` does), the ONNX runner on one variant, and
llama.cpp through llama-cpp-python as the GGUF export's parity gate runs it (PyTorch's prompt ids,
mtmd's image embeddings; `lsd_edge.export.gguf.parity`).
"""

from __future__ import annotations

import numpy as np

from lsd_edge.data.questions import EvalItem
from lsd_edge.export.gguf.parity import LlamaCppAnswers, LlamaCppRunner, llama_cpp_missing, tower_images
from lsd_edge.infer import load_runner
from lsd_edge.runtime.runner import Answerer
from lsd_edge.runtime.torch_runner import TorchRunner
from lsd_edge.verify.plan import Row


class TorchSide:
    """The PyTorch folder: the reference every other row is compared with."""

    # The decode loop, not transformers' batched generate (`lsd-edge eval`'s): the loop, like the ONNX
    # runner's and llama.cpp's answers here, never picks the output rows past the tokenizer's (a
    # vocabulary padded to a multiple of 64), which generate does, so a difference is the runtime's
    batch_size = None

    def __init__(self, runner: TorchRunner):
        self.runner = self.answerer = runner

    def first_logits(self, items: list[EvalItem]) -> list[np.ndarray]:
        out = []
        for it in items:
            ref: list[np.ndarray] = []  # the prefill's (T, V) first
            self.runner.generate_ids(it.prompt_ids, self.runner.pixel_values(it.images), 1, logits=ref)
            out.append(ref[0][-1][: self.runner.vocab_rows])
        return out

    def close(self) -> None:
        pass


class OnnxSide:
    """One variant of an ONNX export in ONNX Runtime (`OnnxRunner`, loaded by `load_runner`)."""

    batch_size = None  # one question at a time through the decode loop, as the export gate scores it

    def __init__(self, row: Row):
        self.runner = self.answerer = load_runner(row.folder, variant=row.variant)

    def first_logits(self, items: list[EvalItem]) -> list[np.ndarray]:
        r, out = self.runner, []
        for it in items:
            cache = r.new_cache(len(it.prompt_ids) + 1)
            logits, _ = r.decode(r.embed(it.prompt_ids, r.images_input(it.images)), cache)
            out.append(np.asarray(logits[0, -1], dtype=np.float32)[: r.vocab_rows])
        return out

    def close(self) -> None:
        pass


class LlamaCppSide:
    """One GGUF quant and its mmproj in llama.cpp, through llama-cpp-python."""

    batch_size = None

    def __init__(self, row: Row, torch_runner: TorchRunner):
        self.torch_runner = torch_runner
        self.runner = LlamaCppRunner(row.model, row.mmproj)
        # the images as given: mtmd resizes them as llama-server and llama-mtmd-cli do
        self.answerer: Answerer = LlamaCppAnswers(self.runner, torch_runner, None)

    def first_logits(self, items: list[EvalItem]) -> list[np.ndarray]:
        t, out = self.torch_runner, []
        for it in items:
            images = tower_images(it.images, t.processor, None)
            _, steps = self.runner.greedy(
                it.prompt_ids, t.encoder.image_id, images, 0, t.stop_ids, t.vocab_rows
            )
            out.append(steps[0][: t.vocab_rows])
        return out

    def close(self) -> None:
        self.runner.close()


def llama_missing() -> str | None:
    """Why llama.cpp cannot run here (llama-cpp-python not importable), or None."""
    missing = llama_cpp_missing()
    return None if missing is None else f'{missing}; pip install -e ".[gguf]"'
