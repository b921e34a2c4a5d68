"""How an export compares with the PyTorch model it came from: logits, greedy tokens, accuracy.

The export's parity gate runs these on eval questions (or, without eval data, on random images):
prefill and decode logits of each ONNX variant against PyTorch's, teacher-forced on PyTorch's greedy
tokens so that one early flip does not hide later differences; free-running greedy tokens; exact-match
accuracy (`lsd_edge.evaluate.accuracy`, the one accuracy path). Both sides generate through their
runners, that is through the one decode loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsd_edge.data.questions import EvalItem
from lsd_edge.evaluate.accuracy import BATCH_SIZE, evaluate_answers
from lsd_edge.export.gated import parity_items, rel_diff
from lsd_edge.runtime.onnx.runner import OnnxRunner
from lsd_edge.runtime.torch_runner import TorchRunner


def compare(
    torch_runner: TorchRunner, runner: OnnxRunner, items: list[EvalItem], max_new_tokens: int
) -> dict[str, Any]:
    """Logits (teacher-forced on PyTorch's tokens) and free-running greedy tokens, ONNX vs PyTorch."""
    model = torch_runner.model
    worst, vision_diff, agree, first = 0.0, 0.0, 0, 0
    for it in items:
        tpx = torch_runner.pixel_values(it.images)
        opx = runner.images_input(it.images)
        ref: list[np.ndarray] = []  # prefill (T, V), then (V,) per decode step
        tokens = torch_runner.generate_ids(it.prompt_ids, tpx, max_new_tokens, logits=ref).token_ids
        if tpx is not None:  # the vision graph against the model's own image path, projector included
            with torch.no_grad():
                tv = torch.cat(list(model.model.get_image_features(pixel_values=tpx).pooler_output)).numpy()
            got_v = runner.image_features(opx)
            vision_diff = max(vision_diff, rel_diff(got_v.reshape(-1, got_v.shape[-1]), tv))
        cache = runner.new_cache(len(it.prompt_ids) + max_new_tokens)
        logits, cache = runner.decode(runner.embed(it.prompt_ids, opx), cache)
        # every prompt position's logits, or the last one's where the decoder computes only those
        worst = max(worst, rel_diff(logits[0], ref[0][-logits.shape[1] :]))
        for tok, want in zip(tokens, ref[1:], strict=False):
            logits, cache = runner.decode(runner.embed([tok]), cache)
            worst = max(worst, rel_diff(logits[0, -1], want))
        got = runner.generate_ids(it.prompt_ids, opx, max_new_tokens)
        agree += got.token_ids == tokens
        first += got.token_ids[:1] == tokens[:1]
    return {
        "samples": len(items),
        "max_rel_logit_diff": worst,
        "vision_max_rel_diff": vision_diff,
        "greedy_agreement": agree / max(1, len(items)),
        "first_token_agreement": first / max(1, len(items)),
    }


def parity_report(
    torch_runner: TorchRunner,
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
    processor = torch_runner.processor
    items, source = parity_items(data, images, processor, samples)
    # ONNX Runtime's spinning threads would slow the PyTorch calls interleaved with them here.
    quiet = {"session.intra_op.allow_spinning": "0"}
    runners = {v: OnnxRunner(folder, variant=v, session_config=quiet) for v in variants}
    rep: dict[str, Any] = {"source": source, "variants": {}}
    for v in variants:
        rep["variants"][v] = compare(torch_runner, runners[v], items, max_new_tokens)
        rep["variants"][v]["prefill"] = runners[v].prefill  # the prompt path the runner took (gemm/exported)
        if reporter is not None:
            reporter.advance(1, f"{v} parity")
    rep["max_rel_logit_diff"] = rep["variants"]["fp32"]["max_rel_logit_diff"]
    rep["greedy_agreement"] = rep["variants"]["fp32"]["greedy_agreement"]
    rep["accuracy_torch"] = rep["accuracy_onnx"] = None
    if data is not None:
        acc_items, _ = parity_items(data, images, processor, eval_samples)
        rep["accuracy_samples"] = len(acc_items)
        rep["accuracy_variant"] = variants[-1]
        # PyTorch batched, as `lsd-edge eval` and distill report it; ONNX Runtime one question at a time
        rep["accuracy_torch"] = evaluate_answers(
            torch_runner, acc_items, max_new_tokens, batch_size=BATCH_SIZE
        ).accuracy
        rep["accuracy_onnx"] = evaluate_answers(runners[variants[-1]], acc_items, max_new_tokens).accuracy
    if reporter is not None:
        reporter.advance(1, "accuracy")
    rep["bench_image"] = items[0].images[0] if items and items[0].images else None
    return rep
