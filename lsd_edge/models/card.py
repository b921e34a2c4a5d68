"""Model cards: the README.md a distilled student's folder and its export folder carry.

The hub's convention: YAML front matter (`library_name`, `pipeline_tag`, `base_model`, `tags`,
`license`), then what the model is, how it was distilled, what was measured, and how to run it:
with lsd-edge, with plain transformers (the PyTorch folder) and with transformers.js (the export
folder). The snippets are complete programs (tests run them) over an example image and question
from the run's eval data when there is one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

README = "README.md"
CARD_FACTS = "card.json"  # a student folder's CardFacts, for the card of its export
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class CardFacts:
    """What a card says; `export` is the export report for an export folder's card, None otherwise."""

    name: str
    pytorch_dir: str  # the student's PyTorch folder, as the snippets name it
    export_dir: str  # its export folder (where `lsd-edge export` writes it when not yet exported)
    teacher: str  # the teacher's hub id or folder, or what trained it
    student_llm: str | None  # the student's LLM (hub id or folder) when composed from one
    recipe: str
    stages: list[dict[str, Any]]  # name, kind, steps, accuracy
    data: dict[str, str]  # data set -> file
    teacher_accuracy: float | None
    student_accuracy: float | None
    params: int
    teacher_params: int | None  # None: no teacher is known (a model folder lsd-edge did not distil)
    example: tuple[str, str] = ("image.png", "What is in the image?")  # (image path, question)
    export: dict[str, Any] | None = None
    license: str = "other"
    tags: list[str] = field(default_factory=list)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _front_matter(f: CardFacts) -> str:
    library = "transformers.js" if f.export is not None else "transformers"
    base = [ref for ref in (f.teacher, f.student_llm) if ref and HUB_ID.match(ref)]
    tags = ["llava", "vision-language", "knowledge-distillation", "lsd-edge"] + (
        ["onnx"] if f.export is not None else []
    )
    lines = ["---", f"library_name: {library}", "pipeline_tag: image-text-to-text", f"license: {f.license}"]
    if base:
        lines += ["base_model:"] + [f"- {b}" for b in base]
    lines += ["tags:"] + [f"- {t}" for t in tags + f.tags]
    return "\n".join(lines + ["---"])


def snippets(f: CardFacts) -> dict[str, str]:
    """The three usage programs: lsd-edge (Python), plain transformers (Python), transformers.js."""
    image, question = f.example
    folder = f.export_dir if f.export is not None else f.pytorch_dir
    return {
        "lsd-edge": (
            "from lsd_edge.infer import load_runner\n\n"
            f"runner = load_runner({folder!r})\n"
            f"print(runner.generate({image!r}, {question!r}, max_new_tokens=32).text)\n"
        ),
        "transformers": (
            "from PIL import Image\n"
            "from transformers import AutoProcessor, LlavaForConditionalGeneration\n\n"
            f"model = LlavaForConditionalGeneration.from_pretrained({f.pytorch_dir!r})\n"
            f"processor = AutoProcessor.from_pretrained({f.pytorch_dir!r})\n"
            f'messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {question!r}}}]}}]\n'
            "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
            f'inputs = processor(images=Image.open({image!r}), text=prompt, return_tensors="pt")\n'
            "out = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
            'print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
        ),
        "transformers.js": (
            "import { AutoProcessor, LlavaForConditionalGeneration, RawImage, env } from '@huggingface/transformers';\n\n"
            "env.allowRemoteModels = false;\n"
            "env.localModelPath = './';\n"
            f"const folder = {_js(f.export_dir)};\n"
            "const processor = await AutoProcessor.from_pretrained(folder);\n"
            "const model = await LlavaForConditionalGeneration.from_pretrained(folder);\n"
            f"const messages = [{{ role: 'user', content: [{{ type: 'image' }}, {{ type: 'text', text: {_js(question)} }}] }}];\n"
            "const prompt = processor.tokenizer.apply_chat_template(messages, { add_generation_prompt: true, tokenize: false });\n"
            f"const inputs = await processor(await RawImage.read({_js(image)}), prompt);\n"
            "const out = await model.generate({ ...inputs, max_new_tokens: 32, do_sample: false });\n"
            "console.log(processor.batch_decode(out.slice(null, [inputs.input_ids.dims.at(-1), null]), { skip_special_tokens: true })[0]);\n"
        ),
    }


def _js(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _training(f: CardFacts) -> list[str]:
    rows = ["| stage | kind | steps | accuracy after it |", "|---|---|---:|---:|"]
    rows += [
        f"| {s['name']} | {s['kind']} | {s.get('steps', '')} | {_pct(s.get('accuracy'))} |" for s in f.stages
    ]
    data = ", ".join(f"{k}: `{v}`" for k, v in f.data.items()) or "the recipe's"
    llm = f" and the LLM `{f.student_llm}`" if f.student_llm else ""
    results = ["| model | exact-match accuracy | parameters |", "|---|---:|---:|"]
    if f.teacher_params is not None:
        results.append(f"| teacher | {_pct(f.teacher_accuracy)} | {f.teacher_params:,} |")
    results.append(f"| this student | {_pct(f.student_accuracy)} | {f.params:,} |")
    if f.teacher_params is None:  # nothing known of how it was made: only what was measured here
        return ["## Results", "", *results]
    return [
        "## How it was made",
        "",
        f"Distilled with lsd-edge (recipe `{f.recipe}`) from the teacher `{f.teacher}`{llm}, "
        "in LLaVA-KD's stages (distilled pre-training, supervised fine-tuning, distilled fine-tuning: "
        "response-token KL, visual-token KL, relation distillation). Data: " + data + ".",
        "",
        *rows,
        "",
        "## Results",
        "",
        *results,
    ]


def _export_section(e: dict[str, Any]) -> list[str]:
    parity, sizes = e.get("parity", {}), e.get("sizes_mb", {})
    rows = [
        "| variant | size MB | greedy tokens as PyTorch's | max relative logit difference |",
        "|---|---:|---:|---:|",
    ]
    for v in e.get("variants", []):
        p = parity.get("variants", {}).get(v, {})
        agree = p.get("greedy_agreement")
        rows.append(
            f"| {v} | {sizes.get(v, {}).get('total', 0):.2f} | {_pct(agree)} | {p.get('max_rel_logit_diff', float('nan')):.1e} |"
        )
    acc = f"exact-match accuracy {_pct(parity.get('accuracy_onnx'))} ({e.get('default_variant')}) against PyTorch's {_pct(parity.get('accuracy_torch'))}"
    return [
        "## This export",
        "",
        "ONNX graphs under `onnx/` (vision encoder with the projector, token embeddings, decoder with a "
        "KV cache) in transformers.js's layout, for ONNX Runtime and transformers.js in Node and browsers. "
        f"Default variant (what `from_pretrained` loads): {e.get('default_variant')}; {acc}.",
        "",
        *rows,
    ]


def model_card(f: CardFacts) -> str:
    what = "ONNX export" if f.export is not None else "PyTorch weights (Hugging Face format)"
    made = (
        f"distilled from a larger one for edge devices: {f.params:,} parameters, "
        f"{f.params / max(1, f.teacher_params):.2f}x the teacher's"
        if f.teacher_params is not None
        else f"with {f.params:,} parameters"
    )
    body = [
        _front_matter(f),
        "",
        f"# {f.name}",
        "",
        f"A small LLaVA-style vision-language model (vision encoder, projector, LLM) {made}. "
        f"This folder holds its {what}.",
        "",
        *_training(f),
        "",
    ]
    if f.export is not None:
        body += [*_export_section(f.export), ""]
    s = snippets(f)
    body += [
        "## Use",
        "",
        "With lsd-edge (`pip install lsd-edge`) through its public API, `lsd_edge.infer` (the ONNX "
        "runner needs no torch):",
        "",
        "```python",
        s["lsd-edge"].rstrip(),
        "```",
        "",
        f"With plain transformers, on the PyTorch folder `{f.pytorch_dir}`:",
        "",
        "```python",
        s["transformers"].rstrip(),
        "```",
        "",
        "With transformers.js in Node (`npm install @huggingface/transformers`), on the export folder"
        + (
            ""
            if f.export is not None
            else f" (`lsd-edge export {f.pytorch_dir}` writes it to `{f.export_dir}`)"
        )
        + ":",
        "",
        "```js",
        s["transformers.js"].rstrip(),
        "```",
        "",
    ]
    return "\n".join(body)


def read_facts(folder: Path) -> CardFacts | None:
    """The CardFacts a distilled student folder keeps (None for a folder lsd-edge did not distil)."""
    path = Path(folder) / CARD_FACTS
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw["example"] = tuple(raw.get("example") or CardFacts.example)
        return CardFacts(**raw)
    except (json.JSONDecodeError, TypeError, ValueError):
        return None  # a card is a nicety: a damaged card.json gives the plain card


def write_card(folder: Path, facts: CardFacts) -> Path:
    path = Path(folder) / README
    path.write_text(model_card(facts), encoding="utf-8")
    return path


def code_blocks(card: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of a card, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)```", card, re.S)]
