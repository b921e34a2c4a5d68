"""What the page says about each model and answer, as Markdown and JSON: no Gradio here."""

from __future__ import annotations

from collections.abc import Sequence

from lsd_edge.demo.answering import Answer
from lsd_edge.evaluate.score import exact_match


def mib(x: float) -> str:
    return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.1f} MiB"


def facts(info: dict) -> str:
    """Markdown: what the model is (backend, parameters, size) and the memory it took."""
    where = info.get("device", "cpu")
    if info.get("backend") == "onnx":
        kind = f"ONNX Runtime, {info.get('variant', 'fp32')}, on {where}"
    else:
        kind = f"PyTorch, {info.get('dtype', '')}, on {where}"
    params = info.get("params")
    lines = [
        f"**model** {kind} · "
        + (f"{params / 1e6:.2f} M parameters" if params else "parameters unknown")
        + f" · {info.get('size_mb', 0):.2f} MB of weights on disk"
    ]
    m = info.get("memory")
    if m:
        parts = []
        if "weights_mib" in m:
            parts.append(f"weights {mib(m['weights_mib'])}")
        if "cuda_peak_mib" in m:
            parts.append(f"CUDA peak {mib(m['cuda_peak_mib'])}")
        parts.append(f"process RSS +{mib(m['peak_rss_mib'])}")
        lines.append(
            "**peak memory** " + " · ".join(parts) + " (loading and answering, measured alone at start-up)"
        )
    else:
        lines.append("**peak memory** not measured")
    return "\n\n".join(lines)


def speed(a: Answer) -> str:
    """Markdown: this answer's time to first token, decode speed and length, or its error."""
    if a.error:
        return f"**error** {a.error}"
    g = a.generation
    if g is None:
        return "_answering…_" if a.text else "_waiting for the first token…_"
    end = "end of answer" if g.stopped == "stop" else "token limit"
    rate = f"{g.decode_tokens_per_s:.1f} tokens/s" if g.new_tokens > 1 else "n/a (one token)"
    tokens = f"{g.new_tokens} token" + ("s" if g.new_tokens != 1 else "")
    return f"**first token** {1000 * g.ttft_s:.0f} ms · **decode** {rate} · {tokens} ({end})"


def agree(teacher: Answer, student: Answer) -> bool | None:
    """Whether both finished answers say the same (exact match after normalization); None until both end."""
    if teacher.generation is None or student.generation is None:
        return None
    return exact_match(teacher.text, student.text)


def agreement(same: bool | None) -> str:
    if same is None:
        return ""
    return "✓ **The answers agree**" if same else "✗ **The answers differ**"


def summary(a: Answer, info: dict) -> dict:
    """One model's answer and figures as plain JSON."""
    g = a.generation
    return {
        "model": info.get("path", info.get("name")),
        "backend": info.get("backend"),
        "answer": a.text,
        "done": a.done,
        "error": a.error,
        "ttft_s": None if g is None else round(g.ttft_s, 6),
        "decode_tokens_per_s": None if g is None else round(g.decode_tokens_per_s, 3),
        "new_tokens": None if g is None else g.new_tokens,
        "stopped": None if g is None else g.stopped,
    }


# ---------------------------------------------------------------------------------------------- the page


def header(teacher: dict, students: dict[str, dict], notes: Sequence[str]) -> str:
    student_paths = ", ".join(f"{k}: `{v.get('path')}`" for k, v in students.items())
    text = (
        "# lsd-edge: teacher vs distilled student\n"
        "Ask one question about one image; both models answer at once, token by token. "
        f"Teacher `{teacher.get('path')}`; student {student_paths}."
    )
    for note in notes:
        text += f"\n\n_Note: {note}._"
    return text


FOOTER = """\
**How to read the figures.** *First token*: from the call to the first new token (image preprocessing,
vision encoder, prefill). *Decode*: tokens after the first, per second. Both models run at the same
time on the same machine, so each one's speed is measured while the other shares its cores.
*Peak memory* is measured once per model at start-up, alone. *Agree*: the two answers are equal
after lower-casing and dropping a final full stop, as the exact-match accuracy compares them.

**Scripting.** The page's handler is the API endpoint `/ask`:
`Client(URL).predict(handle_file("scene.png"), "what color is the circle ?", "PyTorch", 24, api_name="/ask")`
returns the teacher's answer, its figures, the student's answer, its figures, the agreement and a JSON summary.
"""
