"""What a logit term across two vocabularies costs against a KL over one: forward and backward of the
response term on random logits at real vocabulary sizes, one torch thread, best of three.

    python scripts/cross_vocab_cost.py                    # 256 positions, SmolLM2's 49,152 under Qwen's 151,936
    python scripts/cross_vocab_cost.py --positions 64 --student-vocab 128256

Prints one Markdown row per loss: forward KL with the teacher's vocabulary on both sides, then ULD
and GOLD (`lsd_edge.distill.cross_vocab`) with the student's vocabulary under the teacher's
(`--shared` tokens matched by GOLD). ULD sorts both distributions at every position, so it costs a
sort of each vocabulary where a KL costs a pass over it.
"""

from __future__ import annotations

import argparse
import time

import torch

from lsd_edge.distill import losses
from lsd_edge.distill.cross_vocab import VocabMap, cross_vocab_sum


def best_of(fn, rounds: int = 3) -> float:
    """Seconds of the fastest of `rounds` forward + backward passes of the scalar `fn()`."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--student-vocab", type=int, default=49152)
    ap.add_argument("--teacher-vocab", type=int, default=151936)
    ap.add_argument("--shared", type=int, default=30000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, vs, vt = args.positions, args.student_vocab, args.teacher_vocab
    teacher = torch.randn(n, vt)
    same = torch.randn(n, vt, requires_grad=True)
    other = torch.randn(n, vs, requires_grad=True)
    shared = torch.arange(min(args.shared, vs))
    kl = best_of(lambda: losses.kd_sum(same, teacher))
    print(
        f"| loss ({n} positions) | seconds | x KL |\n|---|---:|---:|\n| forward KL, {vt} rows | {kl:.2f} | 1.0 |"
    )
    for mode in ("uld", "gold"):
        vmap = VocabMap(mode, vt, shared, shared)
        s = best_of(lambda vmap=vmap: cross_vocab_sum(other, teacher, vmap))
        print(f"| {mode}, {vs} rows under {vt} | {s:.2f} | {s / kl:.1f} |")


if __name__ == "__main__":
    main()
