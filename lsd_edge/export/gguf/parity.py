"""The GGUF export's parity gate: llama.cpp (through llama-cpp-python and its mtmd bindings) against
PyTorch on the same prompt ids and images, greedy tokens and logits.

`LlamaCppRunner` loads `<name>.gguf` and `mmproj-<name>.gguf` as llama.cpp does, has mtmd encode the
image (its own preprocessing, projector included) and decodes PyTorch's prompt ids, the image tokens'
run replaced by mtmd's embeddings, with its own greedy loop, so both sides see the same ids and a
difference is the model's, not the tokenizer's. The tokenizer is checked on its own: llama.cpp's
tokens of the rendered prompts against the HF tokenizer's. Images are brought to the tower's size
first (the processor's resampling), so both sides feed the tower the same pixels.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from lsd_edge.data.chat import user_message
from lsd_edge.errors import ExportError
from lsd_edge.export.gated import rel_diff

INSTALL = 'pip install -e ".[gguf]" (llama-cpp-python builds from source; several minutes)'


def llama_cpp_missing() -> str | None:
    """Why llama-cpp-python cannot run here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
        from llama_cpp import mtmd_cpp  # noqa: F401
    except Exception as e:  # an import error or a library that fails to load
        return f"llama-cpp-python is not importable ({type(e).__name__}: {e})"
    return None


class LlamaCppRunner:
    """llama.cpp over a GGUF LLM and, optionally, its mmproj file; greedy decoding from prompt ids."""

    def __init__(self, model_path: Path, mmproj_path: Path | None = None, n_ctx: int = 1024):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self.c, self.m = llama_cpp, mtmd_cpp
        for path in (model_path, mmproj_path):
            if path is not None and not Path(path).is_file():
                raise ExportError(f"{path}: no such GGUF file; export again with `lsd-edge export --gguf`")
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(model_path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=1,
                verbose=False,
            )
        except Exception as e:
            raise ExportError(f"{model_path}: llama.cpp cannot load it ({e}); export again") from e
        self.model, self.ctx = self.llm._model.model, self.llm._ctx.ctx
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.mtmd = None
        if mmproj_path is not None:
            # mtmd logs through its own callback: route it to llama-cpp-python's (errors only, as verbose=False)
            from llama_cpp._logger import llama_log_callback

            mtmd_cpp.mtmd_log_set(llama_log_callback, None)
            params = mtmd_cpp.mtmd_context_params_default()
            params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 1, False, False
            self.mtmd = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.model, params)
            if not self.mtmd:
                raise ExportError(f"{mmproj_path}: llama.cpp's mtmd cannot load it; export again")

    def close(self) -> None:
        if self.mtmd:
            self.m.mtmd_free(self.mtmd)
            self.mtmd = None
        self.llm.close()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def image_embeddings(self, image) -> np.ndarray:
        """(K, D) embeddings mtmd makes for one RGB PIL image: its preprocessing, tower and projector."""
        m = self.m
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        data = rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        bitmap = m.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)
        chunks = m.mtmd_input_chunks_init()
        marker = m.mtmd_default_marker()
        text = m.mtmd_input_text(marker, len(marker), False, True)
        bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
        try:
            if m.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise ExportError("llama.cpp's mtmd could not tokenize the image prompt")
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    if m.mtmd_encode_chunk(self.mtmd, chunk) != 0:
                        raise ExportError("llama.cpp's mtmd could not encode the image")
                    k = m.mtmd_input_chunk_get_n_tokens(chunk)
                    out = m.mtmd_get_output_embd(self.mtmd)
                    return np.ctypeslib.as_array(out, shape=(k * self.n_embd,)).reshape(k, self.n_embd).copy()
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)
        raise ExportError("llama.cpp's mtmd made no image chunk for the image")

    def _decode(
        self, pos: int, tokens: list[int] | None = None, embd: np.ndarray | None = None
    ) -> np.ndarray:
        """Feed tokens or embeddings at positions pos.., return the last position's logits (V,)."""
        c = self.c
        n = len(tokens) if tokens is not None else embd.shape[0]
        batch = c.llama_batch_init(n, 0 if tokens is not None else self.n_embd, 1)
        try:
            flat = None if embd is None else np.ascontiguousarray(embd, dtype=np.float32).reshape(-1)
            if flat is not None:
                ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
            for i in range(n):
                if tokens is not None:
                    batch.token[i] = tokens[i]
                batch.pos[i] = pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == n - 1
            batch.n_tokens = n
            if c.llama_decode(self.ctx, batch) != 0:
                raise ExportError("llama.cpp failed to decode the prompt (is it longer than the context?)")
        finally:
            c.llama_batch_free(batch)
        row = c.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,)).copy()

    def greedy(
        self,
        ids: list[int],
        image_id: int,
        images: list,
        max_new_tokens: int,
        stop_ids: set[int],
        vocab_rows: int,
    ) -> tuple[list[int], list[np.ndarray]]:
        """Greedy tokens after prompt `ids` (each image's run of `image_id` replaced by its embeddings)
        and the logits of each step (the first is the prompt's last position)."""
        self.c.llama_memory_clear(self.c.llama_get_memory(self.ctx), True)
        pos, logits, i, todo = 0, None, 0, list(images)
        while i < len(ids):
            j = i
            while j < len(ids) and (ids[j] == image_id) == (ids[i] == image_id):
                j += 1
            if ids[i] == image_id:
                logits = self._decode(pos, embd=self.image_embeddings(todo.pop(0)))
            else:
                logits = self._decode(pos, tokens=ids[i:j])
            pos, i = pos + j - i, j
        out, steps = [], [logits]
        for _ in range(max_new_tokens):
            tok = int(np.argmax(logits[:vocab_rows]))
            if tok in stop_ids:
                break
            out.append(tok)
            logits = self._decode(pos, tokens=[tok])
            pos += 1
            steps.append(logits)
        return out, steps


def tower_images(images: list, processor, image_size: tuple[int, int] | None) -> list:
    """RGB images at the tower's (width, height), resampled with `processor`'s filter (bicubic where it
    names none): both sides feed the tower the same pixels. With `image_size` None, the images as
    given: mtmd resizes them itself (its own filter, as llama-server, llama-mtmd-cli and Ollama do)."""
    if image_size is None:
        return [im.convert("RGB") for im in images]
    resample = int(getattr(processor.image_processor, "resample", None) or 3)
    return [im.convert("RGB").resize(image_size, resample=resample) for im in images]


class LlamaCppAnswers:
    """llama.cpp's greedy answers to eval items as text, an `Answerer` (`lsd_edge.runtime.runner`):
    the one accuracy path scores them as it scores PyTorch's and ONNX Runtime's. PyTorch's runner
    gives the image token, the stop tokens and the decoding to text, so only the model differs.
    `image_size` None hands mtmd the images as given, to resize as llama.cpp's apps do (what users
    get); a (width, height), the pixels PyTorch's processor makes (the model alone compared)."""

    def __init__(self, runner: LlamaCppRunner, torch_runner, image_size: tuple[int, int] | None):
        self.runner, self.torch_runner, self.image_size = runner, torch_runner, image_size

    def answers(self, items, max_new_tokens: int, *, batch_size=None, progress=None) -> list[str]:
        t, out = self.torch_runner, []
        for it in items:
            images = tower_images(it.images, t.processor, self.image_size)
            tokens, _ = self.runner.greedy(
                it.prompt_ids, t.encoder.image_id, images, max_new_tokens, t.stop_ids, t.vocab_rows
            )
            out.append(t.processor.tokenizer.decode(tokens, skip_special_tokens=True))
            if progress is not None:
                progress(len(out), len(items))
        return out


def compare(torch_runner, runner: LlamaCppRunner, items, image_size, max_new_tokens: int) -> dict[str, Any]:
    """Greedy agreement (whole answers, first tokens, and the share of each answer kept before it first
    differs) and logits of llama.cpp against PyTorch on `items` (EvalItems)."""
    enc = torch_runner.encoder
    agree, worst, top_agree, kept, details = 0, 0.0, 0, 0.0, []
    for it in items:
        images = tower_images(it.images, torch_runner.processor, image_size)
        ref: list[np.ndarray] = []
        want = torch_runner.generate_ids(
            it.prompt_ids, torch_runner.pixel_values(images), max_new_tokens, logits=ref
        ).token_ids
        got, steps = runner.greedy(
            it.prompt_ids,
            enc.image_id,
            images,
            max_new_tokens,
            torch_runner.stop_ids,
            torch_runner.vocab_rows,
        )
        rows = torch_runner.vocab_rows
        torch_steps = [ref[0][-1]] + ref[1:]
        same = next(
            (k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
        )
        n = min(len(steps), len(torch_steps), same + 1)  # up to the first step whose tokens differ
        for a, b in zip(steps[:n], torch_steps[:n], strict=True):
            worst = max(worst, rel_diff(a[:rows], b[:rows]))
        top_agree += int(np.argmax(steps[0][:rows]) == np.argmax(torch_steps[0][:rows]))
        agree += got == want
        kept += 1.0 if got == want else same / max(len(got), len(want))
        details.append({"id": it.id, "torch": want, "llama_cpp": got})
    return {
        "samples": len(items),
        "greedy_agreement": agree / max(1, len(items)),
        "first_token_agreement": top_agree / max(1, len(items)),
        # per prompt, the share of the longer answer both give before they first differ; averaged
        "greedy_token_agreement": kept / max(1, len(items)),
        "max_rel_logit_diff": worst,
        "tokens": details,
    }


def tokenizer_agreement(torch_runner, runner: LlamaCppRunner, questions: list[str]) -> dict[str, Any]:
    """llama.cpp's tokens of rendered text-only prompts against the HF tokenizer's."""
    tok = torch_runner.processor.tokenizer
    same = 0
    for q in questions:
        text = torch_runner.encoder.render([user_message(q, 0)], True)
        same += runner.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]
    return {"prompts": len(questions), "agreement": same / max(1, len(questions))}
