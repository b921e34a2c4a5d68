"""`lsd-edge bench-loss`: the plain vs the chunked logit loss, forward + backward, peak memory and time.

Student and teacher hidden states at N positions with their lm_head weights (by default a 896-wide
student and a 2048-wide teacher over a 151936-row vocabulary, Qwen2-0.5B-like) give the response KL
and its gradients to the student's hidden states and lm_head: once from whole (N, V) logits, once
`chunk` positions at a time. Peak memory is what one forward + backward adds on top of its inputs:
on CUDA torch's peak allocation; elsewhere the peak of the tensor storages the block's operations
created and still hold (`LiveTensors`). The process's resident set is not used: an allocator that kept
what the first path freed serves the second path from it, which then reads as adding nothing.
"""

from __future__ import annotations

import gc
import statistics
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lsd_edge.distill import losses
from lsd_edge.errors import LsdEdgeError
from lsd_edge.progress import QuietReporter, Reporter

KINDS = ("forward", "reverse", "jsd", "skew")


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensor storages created by the operations run inside the block and alive at once:
    `live` now, `peak` the most. Every operation's output storage is counted once, until it is freed
    (autograd's saved tensors and gradients included, since they come from operations too)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen.add(id(storage))
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, id(storage), nbytes)
        return out


class PeakMemory:
    """`with PeakMemory(device) as m: ...`, then `m.mb`: the peak added inside the block, in MiB (torch's
    allocator on CUDA, `LiveTensors` elsewhere)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = 0.0
        self._live = LiveTensors()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = max(0, torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._live.__exit__(*exc)
            self.mb = self._live.peak / 2**20


@dataclass
class LossBench:
    plain: dict[str, float]  # peak_mb, ms
    chunked: dict[str, float]
    max_rel_diff: float  # over the loss and both gradients: max |chunked - plain| / max |plain|
    settings: dict[str, Any]
    device: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _loss_paths(hs, ws, ht, wt, tokens: int, chunk: int, kl: dict):
    """The two ways to the same response KL and its gradients: whole logits, and chunked."""

    def plain() -> torch.Tensor:
        logits = F.linear(hs, ws)  # (N, V)
        with torch.no_grad():
            t_logits = F.linear(ht, wt)
        loss = losses.kd_sum(logits, t_logits, **kl) / tokens
        loss.backward()
        return loss.detach()

    def chunked() -> torch.Tensor:
        _, kd = losses.chunked_logit_sums(hs, ws, teacher=losses.DenseTargets(ht, wt), chunk=chunk, **kl)
        loss = kd / tokens
        loss.backward()
        return loss.detach()

    return {"plain": plain, "chunked": chunked}


def _check(vocab, tokens, student_hidden, teacher_hidden, chunk, kind, temperature, repeats, device) -> None:
    if kind not in KINDS:
        raise LsdEdgeError(f"--kind {kind}: not a KL kind; use one of {', '.join(KINDS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise LsdEdgeError("--device cuda: CUDA is not available here; use cpu or auto")
    if min(vocab, tokens, student_hidden, teacher_hidden, chunk, repeats) < 1 or temperature <= 0:
        raise LsdEdgeError("bench-loss: sizes, --chunk and --repeats must be positive, --temperature > 0")


def bench_loss(
    vocab: int = 151936,
    tokens: int = 4096,
    student_hidden: int = 896,
    teacher_hidden: int = 2048,
    chunk: int = 256,
    kind: str = "forward",
    temperature: float = 1.0,
    repeats: int = 3,
    device: str = "auto",
    seed: int = 0,
    reporter: Reporter | None = None,
) -> LossBench:
    """Time and peak memory of the response KL's forward + backward, plain and chunked, alternated."""
    _check(vocab, tokens, student_hidden, teacher_hidden, chunk, kind, temperature, repeats, device)
    reporter = reporter or QuietReporter()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(tokens, student_hidden, generator=g).to(dev).requires_grad_(True)
    ws = (torch.randn(vocab, student_hidden, generator=g) / student_hidden**0.5).to(dev).requires_grad_(True)
    ht = torch.randn(tokens, teacher_hidden, generator=g).to(dev)
    wt = (torch.randn(vocab, teacher_hidden, generator=g) * 2 / teacher_hidden**0.5).to(dev)
    paths = _loss_paths(hs, ws, ht, wt, tokens, chunk, dict(kind=kind, temperature=temperature))
    times: dict[str, list[float]] = {name: [] for name in paths}
    peaks: dict[str, float] = dict.fromkeys(paths, 0.0)
    results: dict[str, tuple[torch.Tensor, ...]] = {}
    reporter.task("bench-loss", 2 * (repeats + 1))
    for r in range(repeats + 1):  # round 0 warms up (and gives the values compared)
        for name, fn in paths.items():
            hs.grad = ws.grad = None
            with PeakMemory(dev) as mem:
                t0 = time.perf_counter()
                loss = fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                dt = time.perf_counter() - t0
            peaks[name] = max(peaks[name], mem.mb)
            if r == 0:
                results[name] = (loss, hs.grad.detach().clone(), ws.grad.detach().clone())
            else:
                times[name].append(dt * 1000)
            reporter.advance(1, f"{name} {dt * 1000:,.0f} ms")
    reporter.done()
    diff = max(_rel(c, p) for c, p in zip(results["chunked"], results["plain"], strict=True))
    settings = dict(vocab=vocab, tokens=tokens, student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    settings.update(
        chunk=chunk, kind=kind, temperature=temperature, repeats=repeats, threads=torch.get_num_threads()
    )
    return LossBench(
        plain={"peak_mb": round(peaks["plain"], 1), "ms": round(statistics.median(times["plain"]), 1)},
        chunked={"peak_mb": round(peaks["chunked"], 1), "ms": round(statistics.median(times["chunked"]), 1)},
        max_rel_diff=diff,
        settings=settings,
        device=str(dev),
    )
