"""llama.cpp's `llama-mtmd-cli` on a GGUF LLM and its mmproj: one image and one question, greedy, read
from the timings it prints itself.

One run answers one question about one image (`--image`, `-p`, `-n N --temp 0 --ignore-eos`, so it
decodes N tokens whatever a random-weight model picks; `--perf -v`, without which it prints no
timings), then the figures come from its log: mtmd's own "mtmd batch encoding done in N ms" (or the
helper's "image slice encoded in N ms": the vision tower and projector), "image decoded (batch i/n)
in N ms" (the visual tokens through the LLM) and llama.cpp's `llama_perf_context_print` (`prompt
eval time = X ms / P tokens`: the prompt's batches, visual tokens and text; `eval time = Y ms / R
runs`: one token each).

llama.cpp adds a batch's time to the prompt eval when it next synchronizes, counted from the batch's
start, and mtmd-cli encodes the image after decoding the chat template's first text chunk and
before the visual tokens: so the prompt eval spans the encode too (measured: 1,744 ms = 860 ms of
encode + 705 ms of visual tokens + the text). Where it does (prompt eval at least encode + visual
tokens), the time to first token is the prompt eval and the LLM's prefill is the prompt eval less
the encode; where it does not (an image first), they are encode + prompt eval and the prompt eval.
The first token is the prompt's last logits, picked by the sampler in well under a millisecond.
So the split is lsd-edge's bench's: vision / prefill / (first token). Peak memory is the process's
resident set, polled.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lsd_edge.errors import BenchError
from lsd_edge.runtime.memory import run_measured

ENCODE = re.compile(r"(?:mtmd batch encoding done|image slice encoded) in (\d+(?:\.\d+)?) ms")
IMAGE_DECODE = re.compile(r"image decoded \(batch \d+/\d+\) in (\d+(?:\.\d+)?) ms")
PROMPT_EVAL = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
EVAL = re.compile(r"\seval time =\s*([\d.]+) ms /\s*(\d+) runs")
LOAD = re.compile(r"\sload time =\s*([\d.]+) ms")


@dataclass(frozen=True)
class MtmdTimings:
    """What one llama-mtmd-cli run printed about its own speed (ms, tokens)."""

    encode_ms: float  # vision tower + projector of the image
    image_decode_ms: float  # the visual tokens through the LLM (part of prompt_eval_ms)
    prompt_eval_ms: float  # llama_perf's: the prompt through the LLM, the encode too where it spans it
    prompt_tokens: int
    eval_ms: float  # the tokens after the first, one at a time
    eval_tokens: int
    load_ms: float | None

    @property
    def encode_in_prompt_eval(self) -> bool:
        """Whether llama_perf's prompt eval spans the image encode (see the module's docstring)."""
        return self.prompt_eval_ms >= self.encode_ms + self.image_decode_ms

    @property
    def prefill_ms(self) -> float:
        """The prompt (visual tokens and text) through the LLM, without the encode."""
        return self.prompt_eval_ms - self.encode_ms if self.encode_in_prompt_eval else self.prompt_eval_ms

    @property
    def ttft_ms(self) -> float:
        return self.encode_ms + self.prefill_ms

    @property
    def prefill_tokens_per_s(self) -> float:
        """The LLM's prefill: prompt tokens (visual ones included) per second of prefill."""
        return 1000 * self.prompt_tokens / self.prefill_ms if self.prefill_ms > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000 * self.eval_tokens / self.eval_ms if self.eval_ms > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "encode_in_prompt_eval": self.encode_in_prompt_eval,
            "prefill_ms": self.prefill_ms,
            "ttft_ms": self.ttft_ms,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


def parse_mtmd(log: str, what: str = "llama-mtmd-cli") -> MtmdTimings:
    """The timings in a llama-mtmd-cli log (stdout and stderr together), or a one-line BenchError
    naming the first one missing."""
    encode = [float(m) for m in ENCODE.findall(log)]
    if not encode:
        raise BenchError(
            f"{what}: no image encode time in its output ('mtmd batch encoding done in N ms'); "
            "was it given --image, and is it llama.cpp's llama-mtmd-cli?"
        )
    prompt, evals = PROMPT_EVAL.findall(log), EVAL.findall(log)
    if not prompt or not evals:
        raise BenchError(
            f"{what}: no llama_perf_context_print timings (prompt eval / eval time) in its output; "
            "did it finish its answer (it prints them with --perf -v)?"
        )
    load = LOAD.findall(log)
    return MtmdTimings(
        encode_ms=sum(encode),
        image_decode_ms=sum(float(m) for m in IMAGE_DECODE.findall(log)),
        prompt_eval_ms=float(prompt[-1][0]),
        prompt_tokens=int(prompt[-1][1]),
        eval_ms=float(evals[-1][0]),
        eval_tokens=int(evals[-1][1]),
        load_ms=float(load[-1]) if load else None,
    )


@dataclass(frozen=True)
class MtmdRun:
    """One llama-mtmd-cli run: which files, what it printed about its speed, what it cost."""

    llm: str
    mmproj: str
    image: str
    question: str
    threads: int
    new_tokens: int
    timings: MtmdTimings
    peak_rss_mb: float
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "timings"} | self.timings.as_dict()


def mtmd_command(
    binary: Path, llm: Path, mmproj: Path, image: Path, question: str, threads: int, new_tokens: int, ctx: int
) -> list[str]:
    """One greedy answer of `new_tokens` tokens (end-of-generation tokens never picked)."""
    return [
        str(binary), "-m", str(llm), "--mmproj", str(mmproj), "--image", str(image), "-p", question,
        "-n", str(new_tokens), "--temp", "0", "--ignore-eos", "-t", str(threads), "-c", str(ctx),
        "--perf", "-v",
    ]  # fmt: skip


def run_mtmd(
    binary: Path,
    llm: Path,
    mmproj: Path,
    image: Path,
    question: str,
    threads: int,
    new_tokens: int = 32,
    ctx: int = 2048,
) -> MtmdRun:
    """Run llama-mtmd-cli once and read its timings; BenchError (one line) if it fails or prints none."""
    for flag, path in (
        ("--llama-mtmd-cli", binary),
        ("--gguf", llm),
        ("--mmproj", mmproj),
        ("--image", image),
    ):
        if not Path(path).is_file():
            raise BenchError(f"{flag} {path}: no such file")
    cmd = mtmd_command(binary, llm, mmproj, image, question, threads, new_tokens, ctx)
    t0 = time.perf_counter()
    try:
        run = run_measured(cmd)
    except OSError as e:
        raise BenchError(f"{binary}: cannot run it ({e.strerror}); give llama.cpp's llama-mtmd-cli") from None
    wall = time.perf_counter() - t0
    log = run.stdout + "\n" + run.stderr
    if run.returncode != 0:
        lines = [s for s in run.stderr.strip().splitlines() if s.strip()]
        why = lines[-1][:300] if lines else f"exit status {run.returncode}"
        raise BenchError(f"{binary} failed on {llm} with {mmproj}: {why}")
    timings = parse_mtmd(log, str(binary))
    return MtmdRun(
        str(llm), str(mmproj), str(image), question, threads, new_tokens, timings, run.peak_mb, wall
    )
