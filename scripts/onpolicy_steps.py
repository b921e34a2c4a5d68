"""Time per DFT step with and without on-policy generation, from an ablation's logs.

    lsd-edge ablate recipes/tiny.toml --schemes dpt-sft-dft,dpt-sft-dft:on-policy --set run.num_threads=1
    python scripts/onpolicy_steps.py runs/tiny/ablate

Reads each scheme's log.jsonl under the ablation folder (every step's `seconds`, and in an on-policy
stage `own_answers` and `rollout_s`) and prints, per scheme, the DFT steps, their total and median
time, and for an on-policy DFT the steps that trained on the student's answers, their median time
and the part of it spent writing the answers.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def ms(values) -> str:
    return f"{1000 * statistics.median(values):.0f} ms"


def summary(log: Path, stage: str = "dft") -> str:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in rows if r["stage"] == stage]
    if not steps:
        return "no DFT step"
    line = (
        f"{len(steps)} DFT steps, {sum(r['seconds'] for r in steps):.1f} s, median "
        f"{ms(r['seconds'] for r in steps)} per step"
    )
    if "own_answers" in steps[0]:
        on = [r for r in steps if r["own_answers"]]
        off = [r for r in steps if not r["own_answers"]]
        line += f"; {len(on)} on-policy steps, median {ms(r['seconds'] for r in on)}"
        line += f" (writing the answers {ms(r['rollout_s'] for r in on)})"
        if off:
            line += f", the other steps {ms(r['seconds'] for r in off)}"
    return line


def main(folder: str) -> None:
    for log in sorted(Path(folder).glob("*/log.jsonl")):
        print(f"{log.parent.name}: {summary(log)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny/ablate")
