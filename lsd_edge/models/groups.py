"""A LLaVA model's module groups (vision, projector, llm): freezing, counting, checkpointing, compiling."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

GROUPS = ("vision", "projector", "llm")


def set_trainable(model, groups: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Freeze everything, then unfreeze the named groups; returns trainable parameters per group."""
    for p in model.parameters():
        p.requires_grad_(False)
    counts = {}
    for g in groups:
        n = 0
        for p in group_modules(model)[g].parameters():
            p.requires_grad_(True)
            n += p.numel()
        counts[g] = n
    if "llm" in groups:
        for p in model.lm_head.parameters():
            p.requires_grad_(True)
    return counts


def set_activation_checkpointing(model, on: bool) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (non-reentrant,
    so a frozen LLM still passes gradients back to the projector)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.24
    disable = getattr(model, "activation_checkpointing_disable", None)
    if on:
        kwargs = {"use_reentrant": False}
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    (disable or model.gradient_checkpointing_disable)()
    # Enabling also hooked the input embeddings to require grad; disabling leaves that hook in place.
    model.disable_input_require_grads()


def decoder_layers(model) -> nn.ModuleList:
    """The repeated blocks of a LLaVA model's LLM (where compute and activations are)."""
    return model.model.language_model.layers


def compile_layers(model, backend: str = "inductor") -> None:
    """torch.compile each decoder layer in place: one graph reused by every layer (short compile), and
    parameter names unchanged, so checkpoints and resume states stay the same. Shapes are dynamic:
    batches differ in length."""
    for layer in decoder_layers(model):
        layer.compile(backend=backend, dynamic=True)


def eager():
    """A context in which compiled modules run uncompiled: generation (evaluation) would otherwise
    compile a graph per decoding shape for a few calls."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else nullcontext()


def group_modules(model) -> dict[str, nn.Module]:
    return {
        "vision": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "llm": nn.ModuleList([model.model.language_model, model.lm_head]),
    }


def count_params(model) -> dict[str, int]:
    """Parameters per group (tied weights counted once) and in total."""
    seen: set[int] = set()
    out = {}
    for g, mod in group_modules(model).items():
        n = 0
        for p in mod.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        out[g] = n
    out["total"] = sum(out.values())
    return out
