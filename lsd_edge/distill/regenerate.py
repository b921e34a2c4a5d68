"""Teacher-regenerated data (LLaVADI): the teacher answers a data set's questions, and the answers
are written as a new LLaVA-format JSON that a stage trains on instead of the reference answers.

Every assistant turn a stage reads (the first `max_turns` of the first `max_samples` records) is
answered greedily by the teacher, given the conversation so far with the teacher's own earlier
answers, so a regenerated conversation is one the teacher could have held. Records keep their ids,
images and questions; turns past `max_turns` (never read by the stage) and records the data set
cannot use are written unchanged, and an empty teacher answer keeps the reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsd_edge.data.chat import ChatEncoder
from lsd_edge.data.questions import EvalItem, n_images
from lsd_edge.data.records import BadSample, load_image, parse_record, read_records
from lsd_edge.evaluate.score import exact_match
from lsd_edge.files import write_json
from lsd_edge.progress import QuietReporter, Reporter
from lsd_edge.runtime.torch_runner import greedy_answers


@dataclass
class RegenSummary:
    records: int
    answers: int
    changed: int  # teacher answers that differ from the reference (after normalisation)
    kept_reference: int  # empty teacher answers, replaced by the reference
    bad_records: int  # records the data set cannot use, written unchanged
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _with_answers(record: dict[str, Any], answers: list[str]) -> dict[str, Any]:
    """A copy of a LLaVA record whose first len(answers) gpt turns say `answers` (the record itself
    when there are none: one the data set cannot use may not even have a list of turns)."""
    if not answers:
        return record
    out = dict(record)
    turns, j = [], 0
    for turn in record["conversations"]:
        turn = dict(turn)
        if turn.get("from") in ("gpt", "assistant") and j < len(answers):
            turn["value"] = answers[j]
            j += 1
        turns.append(turn)
    out["conversations"] = turns
    return out


def _open(recs: list[dict], image_dir: Path, max_turns: int | None) -> list[tuple[list[dict], list] | None]:
    """Each record's messages (the turns the stage reads) and images; None for one it cannot use."""
    convs: list[tuple[list[dict], list] | None] = []
    for rec in recs:
        try:
            messages, files = parse_record(rec, max_turns)
            convs.append((messages, [load_image(image_dir / f) for f in files]))
        except BadSample:
            convs.append(None)
    return convs


def _turn_items(convs, recs: list[dict], first_id: int, turn: int, encoder: ChatEncoder):
    """Answer `turn` of every conversation that has one: the questions to ask, and whose they are."""
    items, owners = [], []
    for r, conv in enumerate(convs):
        if conv is None:
            continue
        messages, images = conv
        at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if turn >= len(at):
            continue
        i = at[turn]
        reference = " ".join(c["text"] for c in messages[i]["content"] if c["type"] == "text")
        prompt = messages[:i]
        rid = str(recs[r].get("id", first_id + r))
        items.append(
            EvalItem(rid, "all", encoder.encode_prompt(prompt), images[: n_images(prompt)], reference)
        )
        owners.append((r, i))
    return items, owners


def regenerate(
    model,
    processor,
    data_path: str | Path,
    image_dir: str | Path | None,
    out_path: str | Path,
    *,
    max_samples: int | None = None,
    max_turns: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    block: int = 256,
    reporter: Reporter | None = None,
) -> RegenSummary:
    """Write `out_path`: the records of `data_path` with the teacher's greedy answers."""
    reporter = reporter or QuietReporter()
    started = time.perf_counter()
    records = read_records(data_path)[:max_samples]
    # as LlavaDataset resolves it, so the teacher sees the images the stage will
    image_dir = Path(image_dir) if image_dir is not None else Path(data_path).parent
    encoder = ChatEncoder(processor)
    written: list[dict[str, Any]] = []
    n_answers = changed = kept = bad = 0
    reporter.task("regenerate", len(records))
    # Blocks bound the images held at once; within a block, answer j of every record is asked together.
    for b0 in range(0, len(records), block):
        recs = records[b0 : b0 + block]
        convs = _open(recs, image_dir, max_turns)
        bad += sum(c is None for c in convs)
        answers: list[list[str]] = [[] for _ in recs]
        turn = 0
        while True:
            items, owners = _turn_items(convs, recs, b0, turn, encoder)
            if not items:
                break
            texts = greedy_answers(model, processor, items, max_new_tokens, batch_size)
            for (r, i), item, text in zip(owners, items, texts, strict=True):
                text = text.strip()
                if not text:
                    kept += 1
                    text = item.answer
                elif not exact_match(text, item.answer):
                    changed += 1
                convs[r][0][i] = {"role": "assistant", "content": [{"type": "text", "text": text}]}
                answers[r].append(text)
                n_answers += 1
            turn += 1
        written += [_with_answers(rec, a) for rec, a in zip(recs, answers, strict=True)]
        reporter.advance(len(recs), f"{n_answers} answers, {changed} differ from the reference")
    reporter.done()
    write_json(out_path, written)
    return RegenSummary(len(records), n_answers, changed, kept, bad, round(time.perf_counter() - started, 2))
