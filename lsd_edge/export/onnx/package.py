"""The export folder as an onnx-community repo: the files transformers.js and ONNX Runtime users expect.

transformers.js (`AutoProcessor`, `LlavaForConditionalGeneration.from_pretrained`) reads the image
processor from `preprocessor_config.json` (with `processor_class`), the chat template from
`tokenizer_config.json`, the graphs from `onnx/` by dtype suffix, and per-file options from
`config.json`'s `transformers.js_config`: the dtype to load when none is asked for (the exported
variant), and which graphs keep their weights in `<file>_data`. transformers 5's `save_pretrained`
writes none of these, so they are made here from what it does write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lsd_edge.errors import ExportError
from lsd_edge.files import read_json, write_json
from lsd_edge.runtime.onnx.layout import GRAPHS, JS_DTYPE, graph_file


def preprocessor_config(out: Path) -> dict[str, Any]:
    """`preprocessor_config.json`: the image processor of processor_config.json plus its processor class."""
    path = out / "preprocessor_config.json"
    if path.is_file():
        pre = read_json(path)
    else:
        proc = out / "processor_config.json"
        if not proc.is_file():
            raise ExportError(
                f"{out.parent}: the model folder has no processor_config.json; save its processor"
            )
        pre = dict(read_json(proc).get("image_processor") or {})
        if not pre:
            raise ExportError(f"{proc}: no image_processor in it; save the model's LLaVA processor")
    pre.setdefault("processor_class", "LlavaProcessor")
    return pre


def tokenizer_config(out: Path) -> dict[str, Any]:
    """`tokenizer_config.json` with the chat template inline (transformers.js reads it only there)."""
    cfg = read_json(out / "tokenizer_config.json") if (out / "tokenizer_config.json").is_file() else {}
    template = out / "chat_template.jinja"
    if "chat_template" not in cfg and template.is_file():
        cfg["chat_template"] = template.read_text(encoding="utf-8")
    # transformers 5 leaves it False when unset, transformers.js assumes True: say it, so both
    # decode the same tokens to the same text
    cfg.setdefault("clean_up_tokenization_spaces", False)
    return cfg


def external_graphs(out: Path, variants: list[str]) -> dict[str, int]:
    """Graph file -> 1 for every graph whose weights are in `<file>_data` (transformers.js's form)."""
    found = {}
    for v in variants:
        for g in GRAPHS:
            f = out / graph_file(g, v)
            if (f.parent / f"{f.name}_data").is_file():
                found[f.name] = 1
    return found


def processor_config(out: Path) -> dict[str, Any]:
    """`processor_config.json` counting the visual tokens the vision encoder graph returns as
    transformers.js counts them (patches + num_additional_image_tokens): a 'default' selection, whose
    CLS token the graph already dropped, is written as 'full' with one additional token fewer, which
    transformers and lsd-edge's runner count the same way."""
    cfg = read_json(out / "processor_config.json")
    if cfg.get("vision_feature_select_strategy") == "default":
        cfg["num_additional_image_tokens"] = int(cfg.get("num_additional_image_tokens") or 0) - 1
        cfg["vision_feature_select_strategy"] = "full"
    return cfg


def package(out: Path, variants: list[str], default_variant: str) -> dict[str, Any]:
    """Write the web-ready files into the export folder `out`; returns what transformers.js is told."""
    write_json(out / "preprocessor_config.json", preprocessor_config(out))
    write_json(out / "processor_config.json", processor_config(out))
    write_json(out / "tokenizer_config.json", tokenizer_config(out))
    config = read_json(out / "config.json")
    js: dict[str, Any] = {"dtype": JS_DTYPE[default_variant]}
    external = external_graphs(out, variants)
    if external:
        js["use_external_data_format"] = external
    config["transformers.js_config"] = js
    write_json(out / "config.json", config)
    return js
