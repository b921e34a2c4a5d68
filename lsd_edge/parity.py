"""How an export compares with the PyTorch model it came from: logits, greedy tokens, accuracy, speed.

The export's parity gate runs these on eval questions (or, without eval data, on random images):
prefill and decode logits of each ONNX variant against PyTorch's, teacher-forced on PyTorch's greedy
tokens so that one early flip does not hide later differences; free-running greedy tokens; exact-match
accuracy; decode tokens/s of both backends on the same prompt.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsd_edge.errors import ExportError
from lsd_edge.onnx_runner import OnnxRunner


@dataclass
class ParityItem:
    """One eval question: prompt ids (visual tokens expanded), its images, the reference answer."""

    ids: list[int]
    images: list
    answer: str | None = None
    type: str = "all"


def check_data(data: Path) -> None:
    if not Path(data).is_file():
        raise ExportError(
            f"{data}: no such eval data file; pass --data with a LLaVA-format eval JSON "
            "(the parity gate compares answers on it)"
        )


def parity_items(
    data: Path | None, images: Path | None, processor, n: int | None
) -> tuple[list[ParityItem], str]:
    """Eval questions for the gate, and where they came from; synthetic ones when there is no eval data."""
    from lsd_edge.data.llava import ChatEncoder, user_message
    from lsd_edge.evaluate import load_eval_items

    if data is not None:
        check_data(data)
        items = load_eval_items(data, images, processor, n)
        return [ParityItem(it.prompt_ids, it.images, it.answer, it.type) for it in items], str(data)
    # No eval data: random images and fixed questions still check logits and greedy tokens.
    from PIL import Image

    enc = ChatEncoder(processor)
    rng = np.random.default_rng(0)
    size = processor.image_processor.size
    h, w = size.get("height") or size.get("shortest_edge"), size.get("width") or size.get("shortest_edge")
    questions = ("describe the image .", "what is in the image ?", "how many shapes are there ?")
    out = []
    for i in range(n or 4):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out.append(ParityItem(enc.encode_prompt([user_message(questions[i % len(questions)], 1)]), [img]))
    return out, "synthetic (random images; no eval data)"


def _torch_pixels(processor, images: list, dtype) -> torch.Tensor | None:
    if not images:
        return None
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"].to(dtype=dtype)


def _onnx_pixels(runner: OnnxRunner, images: list) -> np.ndarray | None:
    if not images:
        return None
    return np.concatenate([runner.pixel_values(im) for im in images])


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|: the largest error relative to the logits' own scale."""
    return float(np.abs(a.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


@torch.no_grad()
def torch_greedy(
    model, ids: list[int], pixel_values, max_new_tokens: int, stop_ids: set[int], vocab_rows: int
):
    """Greedy tokens as the runners pick them, and the logits each came from: prefill (T, V), then (V,) per step."""
    out = model(input_ids=torch.tensor([ids]), pixel_values=pixel_values, use_cache=True)
    cache = out.cache
    logits = [out.logits[0].float().numpy()]
    tokens: list[int] = []
    nxt = int(np.argmax(logits[-1][-1][:vocab_rows]))
    for i in range(max_new_tokens):
        if nxt in stop_ids:
            break
        tokens.append(nxt)
        if i == max_new_tokens - 1:
            break
        out = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits[0, -1].float().numpy())
        nxt = int(np.argmax(logits[-1][:vocab_rows]))
    return tokens, logits


def compare(
    model, processor, runner: OnnxRunner, items: list[ParityItem], max_new_tokens: int
) -> dict[str, Any]:
    """Logits (teacher-forced on PyTorch's tokens) and free-running greedy tokens, ONNX vs PyTorch."""
    dtype = next(model.parameters()).dtype
    worst, vision_diff, agree = 0.0, 0.0, 0
    for it in items:
        tpx = _torch_pixels(processor, it.images, dtype)
        opx = _onnx_pixels(runner, it.images)
        tokens, ref = torch_greedy(model, it.ids, tpx, max_new_tokens, runner.stop_ids, runner.vocab_rows)
        if tpx is not None:  # the vision graph against the model's own image path, projector included
            with torch.no_grad():
                tv = torch.cat(list(model.model.get_image_features(pixel_values=tpx).pooler_output)).numpy()
            got_v = runner.image_features(opx)
            vision_diff = max(vision_diff, rel_diff(got_v.reshape(-1, got_v.shape[-1]), tv))
        logits, cache = runner.decode(runner.embed(it.ids, opx), runner.new_cache())
        worst = max(worst, rel_diff(logits[0], ref[0]))
        for tok, want in zip(tokens, ref[1:], strict=False):
            logits, cache = runner.decode(runner.embed([tok]), cache)
            worst = max(worst, rel_diff(logits[0, -1], want))
        got = runner.generate_ids(it.ids, opx, max_new_tokens)
        agree += got.token_ids == tokens
    return {
        "samples": len(items),
        "max_rel_logit_diff": worst,
        "vision_max_rel_diff": vision_diff,
        "greedy_agreement": agree / max(1, len(items)),
    }


def onnx_accuracy(runner: OnnxRunner, items: list[ParityItem], max_new_tokens: int) -> float:
    from lsd_edge.evaluate import normalize_answer

    right = 0
    for it in items:
        g = runner.generate_ids(it.ids, _onnx_pixels(runner, it.images), max_new_tokens)
        right += normalize_answer(g.text) == normalize_answer(it.answer or "")
    return right / len(items)


def torch_accuracy(model, processor, items: list[ParityItem], max_new_tokens: int) -> float:
    """Exact match of PyTorch's batched greedy answers: the number `lsd-edge eval` and distill report."""
    from lsd_edge.evaluate import EvalItem, greedy_answers, normalize_answer

    evs = [EvalItem(str(i), it.type, it.ids, it.images, it.answer or "") for i, it in enumerate(items)]
    answers = greedy_answers(model, processor, evs, max_new_tokens=max_new_tokens)
    return sum(
        normalize_answer(a) == normalize_answer(it.answer or "") for a, it in zip(answers, items, strict=True)
    ) / len(items)


# ---------------------------------------------------------------------------------------------- speed


def decode_speed(runners: dict[str, Any], image, question: str, tokens: int, repeats: int) -> dict[str, dict]:
    """Best decode tokens/s of each runner over `repeats` rounds after a warm-up, every run `tokens` long
    (stop tokens ignored). Each round runs every runner once, so a busy machine slows them alike."""
    for r in runners.values():
        r.generate(image, question, min(tokens, 4), ignore_eos=True)
    gens: dict[str, list] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, r in runners.items():
            gens[name].append(r.generate(image, question, tokens, ignore_eos=True))
    return {
        name: {
            "decode_tokens_per_s": round(max(g.decode_tokens_per_s for g in gs), 1),
            "ttft_ms": round(1000 * statistics.median(g.ttft_s for g in gs), 2),
            "prompt_tokens": gs[0].prompt_tokens,
            "new_tokens": gs[0].new_tokens,
        }
        for name, gs in gens.items()
    }


def machine() -> str:
    cores = os.cpu_count() or 0
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cores}-core {platform.machine()} CPU, {gpu}"


# ----------------------------------------------------------------------------------------- reports


def parity_report(
    model,
    processor,
    folder: Path,
    variants: list[str],
    data: Path | None,
    images: Path | None,
    samples: int,
    eval_samples: int | None,
    max_new_tokens: int,
    reporter=None,
) -> dict[str, Any]:
    """Every variant in `folder` against PyTorch on `samples` questions; accuracy of the last variant.

    Keys: source, variants {v: compare(...)}, max_rel_logit_diff and greedy_agreement (fp32's),
    accuracy_torch / accuracy_onnx / accuracy_samples (None without eval data), bench_image.
    """
    items, source = parity_items(data, images, processor, samples)
    # ONNX Runtime's spinning threads would slow the PyTorch calls interleaved with them here.
    quiet = {"session.intra_op.allow_spinning": "0"}
    runners = {v: OnnxRunner(folder, variant=v, session_config=quiet) for v in variants}
    rep: dict[str, Any] = {"source": source, "variants": {}}
    for v in variants:
        rep["variants"][v] = compare(model, processor, runners[v], items, max_new_tokens)
        if reporter is not None:
            reporter.advance(1, f"{v} parity")
    rep["max_rel_logit_diff"] = rep["variants"]["fp32"]["max_rel_logit_diff"]
    rep["greedy_agreement"] = rep["variants"]["fp32"]["greedy_agreement"]
    rep["accuracy_torch"] = rep["accuracy_onnx"] = None
    if data is not None:
        acc_items, _ = parity_items(data, images, processor, eval_samples)
        rep["accuracy_samples"] = len(acc_items)
        rep["accuracy_variant"] = variants[-1]
        rep["accuracy_torch"] = torch_accuracy(model, processor, acc_items, max_new_tokens)
        rep["accuracy_onnx"] = onnx_accuracy(runners[variants[-1]], acc_items, max_new_tokens)
    if reporter is not None:
        reporter.advance(1, "accuracy")
    rep["bench_image"] = items[0].images[0] if items and items[0].images else None
    return rep


def speed_report(
    torch_runner, folder: Path, variants: list[str], image, tokens: int, repeats: int
) -> dict[str, Any]:
    """Decode tokens/s of PyTorch and of each ONNX variant on one prompt, and the last variant's ratio."""
    runners = {"torch": torch_runner}  # ONNX: fresh sessions, with ONNX Runtime's default threading
    runners.update({f"onnx_{v}": OnnxRunner(folder, variant=v) for v in variants})
    speed: dict[str, Any] = decode_speed(runners, image, "describe the image .", tokens, repeats)
    base = speed["torch"]["decode_tokens_per_s"] or float("nan")
    speed["onnx_vs_torch_decode"] = round(speed[f"onnx_{variants[-1]}"]["decode_tokens_per_s"] / base, 2)
    speed["machine"] = machine()
    speed["threads"] = {"torch": torch.get_num_threads(), "onnxruntime": "default (one per physical core)"}
    return speed
