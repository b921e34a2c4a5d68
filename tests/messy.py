"""Messy LLaVA-format data: the compositions real mixes bring, at random per seed, for tests.

The LLaVA v1.5 665k mix, LLaVA-Pretrain and LLaVA-Interleave hold, beside clean single-image
questions: text-only conversations (ShareGPT), multi-turn and multi-image conversations, images after
the question, system turns, unicode, grayscale / RGBA / palette / CMYK / 16-bit / very wide / 1-pixel
images, and the odd broken record: a missing, corrupt, cut or empty image file, an `<image>` count
that does not match the files, an empty answer, a record without an answer or with malformed turns,
and conversations longer than any max_length (some cut in an answer, some with every answer past it).

`messy_data(out, seed, n)` writes `out/messy.json` and `out/images/` with every composition at least
once and the rest drawn at random, and returns the file with what each record is (`kinds`), so a
test can say which reasons it expects the data set to skip.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = (
    "red green blue circle square triangle left right top bottom big small how many what color is the".split()
)
UNICODE = ["日本語の質問", "emoji 🟥🔵", "مرحبا", "e\u0301te\u0301", "naïve café", "\u200bzero-width"]

# composition -> (weight, the reason LlavaDataset skips it for, or None if it trains)
KINDS: dict[str, tuple[int, str | None]] = {
    "single": (8, None),
    "text-only": (4, None),
    "text-multi-turn": (2, None),
    "multi-turn": (3, None),
    "multi-image": (3, None),
    "image-after-question": (2, None),
    "system-turn": (1, None),
    "unicode": (2, None),
    "odd-image": (4, None),  # grayscale, RGBA, palette, CMYK, 16-bit, wide, 1 px
    "dangling-question": (1, None),
    "long-answer": (2, None),  # cut inside an answer at max_length: trains on what remains
    "long-multi-image": (1, None),  # the cut falls inside an image's tokens: that image is dropped
    "long-prompt": (1, "truncated"),  # every answer past max_length
    "missing-image": (1, "missing image"),
    "corrupt-image": (1, "corrupt image"),
    "cut-image": (1, "corrupt image"),
    "empty-image": (1, "corrupt image"),
    "placeholder-mismatch": (1, "image count mismatch"),
    "unplaced-image": (1, "image count mismatch"),
    "empty-answer": (1, "empty answer"),
    "no-answer": (1, "no answer"),
    "image-in-answer": (1, "image in an answer"),
    "malformed-turn": (1, "malformed turn"),
    "no-conversations": (1, "malformed record"),
    "bad-image-field": (1, "malformed image field"),
}
ODD_IMAGES = ("gray.png", "rgba.png", "palette.png", "cmyk.jpg", "deep.png", "wide.png", "dot.png")
GOOD_IMAGES = tuple(f"img{i}.png" for i in range(6))


def _images(folder: Path, size: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in GOOD_IMAGES:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
    Image.new("L", (size, size), 90).save(folder / "gray.png")
    Image.new("RGBA", (size, size), (200, 0, 0, 0)).save(folder / "rgba.png")
    pal = Image.new("P", (size, size), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(folder / "palette.png", transparency=0)
    Image.new("CMYK", (size, size), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (size, size))).astype(np.uint16)).save(folder / "deep.png")
    Image.new("RGB", (size * 8, max(1, size // 2)), (0, 0, 200)).save(folder / "wide.png")
    Image.new("RGB", (1, 1), (0, 200, 0)).save(folder / "dot.png")
    (folder / "corrupt.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 64, dtype=np.uint8))
    )
    good = (folder / GOOD_IMAGES[0]).read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    (folder / "empty.png").write_bytes(b"")


def _say(r: random.Random, n: int) -> str:
    return " ".join(r.choice(WORDS) for _ in range(n))


def turns(*pairs: tuple[str, str]) -> list[dict]:
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def record(kind: str, r: random.Random, long: int) -> dict:
    """One record of a composition; `long` words make a conversation longer than the tests' max_length."""
    img = r.choice(GOOD_IMAGES)
    q, a = _say(r, r.randint(2, 6)) + " ?", _say(r, r.randint(1, 3))
    one = {"image": img, "conversations": turns(("<image>\n" + q, a))}
    if kind == "single":
        return one
    if kind == "text-only":
        return {"conversations": turns((q, a))}
    if kind == "text-multi-turn":
        return {"conversations": turns((q, a), (_say(r, 3), _say(r, 2)), (_say(r, 2), _say(r, 4)))}
    if kind == "multi-turn":
        return {"image": img, "conversations": turns(("<image>\n" + q, a), (_say(r, 3), _say(r, 2)))}
    if kind == "multi-image":
        n = r.randint(2, 3)
        text = " ".join(f"picture {i} <image>" for i in range(n)) + " " + q
        return {
            "image": r.sample(GOOD_IMAGES, n),
            "conversations": turns((text, a), (_say(r, 2), _say(r, 1))),
        }
    if kind == "image-after-question":
        return {"image": [img], "conversations": turns((q + "\n<image>", a))}
    if kind == "system-turn":
        return {
            "image": img,
            "conversations": [{"from": "system", "value": "answer in one word ."}]
            + turns(("<image>\n" + q, a)),
        }
    if kind == "unicode":
        return {
            "image": img,
            "conversations": turns((f"<image>\n{r.choice(UNICODE)} {q}", f"{a} {r.choice(UNICODE)}")),
        }
    if kind == "odd-image":
        return one | {"image": r.choice(ODD_IMAGES)}
    if kind == "dangling-question":
        return one | {"conversations": one["conversations"] + [{"from": "human", "value": "and then ?"}]}
    if kind == "long-answer":
        return {"image": img, "conversations": turns(("<image>\n" + q, a), (q, _say(r, long)))}
    if kind == "long-multi-image":
        head = _say(r, long // 2)
        text = f"<image> {head} <image> {head} <image>\n{q}"
        return {"image": r.sample(GOOD_IMAGES, 3), "conversations": turns((q, a), (text, a))}
    if kind == "long-prompt":
        return {"image": img, "conversations": turns((f"<image>\n{_say(r, long)} ?", a))}
    if kind in ("missing-image", "corrupt-image", "cut-image", "empty-image"):
        name = {"missing-image": "nope/missing.png", "corrupt-image": "corrupt.png"}.get(
            kind, kind[:-6] + ".png"
        )
        return one | {"image": name}
    if kind == "placeholder-mismatch":
        return one | {"conversations": turns(("<image>\n<image>\n" + q, a))}
    if kind == "unplaced-image":
        return one | {"conversations": turns((q, a))}
    if kind == "empty-answer":
        return one | {"conversations": turns(("<image>\n" + q, r.choice(["", "   ", "\n"])))}
    if kind == "no-answer":
        return one | {"conversations": [{"from": "human", "value": "<image>\n" + q}]}
    if kind == "image-in-answer":
        return one | {"conversations": turns(("<image>\n" + q, "<image> " + a))}
    if kind == "malformed-turn":
        return one | {
            "conversations": [
                {"from": "human", "value": "<image>\n" + q},
                r.choice(
                    [{"from": "gpt"}, {"from": "robot", "value": a}, {"from": "gpt", "value": 3}, "text"]
                ),
            ]
        }
    if kind == "no-conversations":
        return {"image": img, "conversations": r.choice([None, "q", {}])}
    if kind == "bad-image-field":
        return one | {"image": r.choice([3, {"path": img}, [img, 4]])}
    raise ValueError(kind)


def messy_data(
    out: Path, seed: int, n: int = 64, *, image_size: int = 16, long: int = 80
) -> tuple[Path, list[str]]:
    """`out/messy.json` (n >= len(KINDS) records, every composition at least once, shuffled) and
    `out/images/`; returns the file and each record's composition, in file order."""
    r = random.Random(seed)
    _images(out / "images", image_size, np.random.default_rng(seed))
    names = list(KINDS)
    kinds = names + r.choices(names, weights=[w for w, _ in KINDS.values()], k=max(0, n - len(names)))
    r.shuffle(kinds)
    records = []
    for i, kind in enumerate(kinds):
        rec = record(kind, r, long)
        if r.random() < 0.8:  # ids are optional in LLaVA files, and not always strings
            rec = {"id": f"{kind}-{i}" if r.random() < 0.9 else i, **rec}
        records.append(rec)
    path = out / "messy.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path, kinds


def expected_skips(kinds: list[str]) -> dict[str, int]:
    """How many records of each skip reason a data set of these compositions holds."""
    out: dict[str, int] = {}
    for kind in kinds:
        reason = KINDS[kind][1]
        if reason is not None:
            out[reason] = out.get(reason, 0) + 1
    return out


def messy_processor(data: Path):
    """The tiny processor a run over `data` would build: its tokenizer trained on the file's turns
    (malformed ones left out, as `corpus_texts` leaves them), so the data's words are one token each."""
    from lsd_edge.models.build import build_tiny_processor
    from lsd_edge.recipe.schema import VisionSize

    from .helpers import TINY_VISION

    texts = [
        t["value"]
        for rec in json.loads(data.read_text())
        for t in (rec.get("conversations") if isinstance(rec.get("conversations"), list) else [])
        if isinstance(t, dict) and isinstance(t.get("value"), str)
    ]
    return build_tiny_processor(VisionSize(**TINY_VISION), texts)
