"""Exact-match evaluation of a LLaVA model by batched greedy generation.

Every assistant turn of an eval record is one question (`lsd_edge.data.questions`); the model
answers greedily, many questions at a time with left padding, and `lsd_edge.evaluate.score` scores
the answers overall and per question `type` (ShapesVQA writes one per record).
"""

from __future__ import annotations

import torch

from lsd_edge.data.questions import EvalItem, load_eval_items
from lsd_edge.data.records import BadSampleLog
from lsd_edge.evaluate.score import EvalResult, score
from lsd_edge.models.groups import eager
from lsd_edge.models.tokens import stop_token_ids
from lsd_edge.progress import Reporter, ticker
from lsd_edge.recipe.schema import Recipe


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


def evaluate(
    model,
    processor,
    path,
    image_dir=None,
    *,
    max_samples=None,
    max_new_tokens=8,
    batch_size=64,
    progress=None,
) -> EvalResult:
    log = BadSampleLog()
    items = load_eval_items(path, image_dir, processor, max_samples, log)
    answers = greedy_answers(model, processor, items, max_new_tokens, batch_size, progress)
    result = score(items, answers)
    result.bad_samples = log.as_dict()
    return result


def eval_split(recipe: Recipe, model, processor, label: str, reporter: Reporter) -> dict:
    """The recipe's eval split scored with its [eval] settings, with a progress bar; {} without one."""
    if recipe.data.eval is None:
        return {}
    path, images = recipe.data.resolve(recipe.data.eval)
    ev = recipe.eval
    log = BadSampleLog()
    items = load_eval_items(path, images, processor, ev.max_samples, log)
    reporter.task(f"eval {label}", len(items))
    with eager():
        answers = greedy_answers(model, processor, items, ev.max_new_tokens, ev.batch_size, ticker(reporter))
    result = score(items, answers)
    result.bad_samples = log.as_dict()
    reporter.advance(0, f"accuracy {result.accuracy:.3f}")
    reporter.done()
    return result.as_dict()
