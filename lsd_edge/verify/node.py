"""transformers.js in Node (onnxruntime-node) on an export folder, as an app loads it: the checkout's
`web/answers.mjs` over the pinned npm packages in `web/node_modules`. The export tests
(tests/export/test_transformers_js.py) and `lsd-edge verify` both run it through `node_answers`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import lsd_edge
from lsd_edge.data.questions import EvalItem
from lsd_edge.demo.web_page import INSTALL
from lsd_edge.errors import RuntimeModelError
from lsd_edge.runtime.onnx.layout import JS_DTYPE
from lsd_edge.verify.plan import FileSide

WEB = Path(lsd_edge.__file__).resolve().parents[1] / "web"
SCRIPT = WEB / "answers.mjs"


def node_missing() -> str | None:
    """Why transformers.js cannot run in Node here, or None."""
    if shutil.which("node") is None:
        return "no node on PATH"
    if not SCRIPT.is_file():
        return f"no {SCRIPT} (run from a checkout of lsd-edge)"
    if not (WEB / "node_modules" / "@huggingface" / "transformers").is_dir():
        return f"web/node_modules has no @huggingface/transformers ({INSTALL})"
    return None


def node_answers(
    folder: Path, variant: str, questions: list[dict], max_new_tokens: int, timeout_s: float = 600
) -> list[dict]:
    """web/answers.mjs on `questions` ({image, question}) with the export's `variant`: per question
    {text, ids, seconds, first_token_s}."""
    with tempfile.TemporaryDirectory(prefix="lsd-edge-node-") as tmp:
        path = Path(tmp) / "questions.json"
        path.write_text(json.dumps(questions))
        cmd = ["node", str(SCRIPT), str(folder), JS_DTYPE[variant], str(path), str(max_new_tokens)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeModelError(
                f"{folder}: transformers.js in Node took over {timeout_s:g} s on {variant}"
            ) from None
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        raise RuntimeModelError(f"{folder}: transformers.js in Node failed on {variant}: {tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


class NodeSide(FileSide):
    """One variant of an export in transformers.js (Node takes an image file and a question)."""

    def answers(
        self, items: list[EvalItem], max_new_tokens: int, *, batch_size=None, progress=None
    ) -> list[str]:
        got = node_answers(self.folder, self.variant, self.asked(items), max_new_tokens)
        if progress is not None:
            progress(len(items), len(items))
        return [g["text"] for g in got]

    def first_logits(self, items: list[EvalItem]) -> None:
        return None  # answers.mjs gives tokens, not logits

    def close(self) -> None:
        pass
