"""The recipe's sections on what follows training: `[export]` (the ONNX export and its gate, and
`[export.gguf]`, the GGUF gate's bounds), `[eval]` and `[bench]`. Strict and frozen, as every recipe
section is (`lsd_edge.recipe.schema` holds the rest and the whole `Recipe`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lsd_edge.recipe.types import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Strict

Share = Annotated[float, Field(ge=0, le=1)]


class GgufGateConfig(Strict):
    """Bounds of the GGUF export's parity gate for the quant exported, each replacing the one measured
    for it (`lsd_edge.export.gguf.pipeline.QUANT_BOUNDS`) where given."""

    max_rel_logit_diff: Annotated[float, Field(gt=0)] | None = None
    min_first_token_agreement: Share | None = None
    min_greedy_agreement: Share | None = None
    max_accuracy_drop: Annotated[float, Field(ge=0)] | None = None
    min_answer_agreement: Share | None = None


class ExportConfig(Strict):
    quantize: Literal["none", "int8", "int4", "fp16"] = "int8"
    target: Literal["cpu", "cuda"] = "cpu"
    opset: Annotated[int, Field(ge=17, le=23)] = 18
    parity_samples: PositiveInt = 16
    max_rel_logit_diff: PositiveFloat = 1e-3
    max_accuracy_drop: NonNegFloat = 0.02
    # the quantized variant's own bounds against PyTorch (None: the ones measured for the variant,
    # lsd_edge.export.onnx.pipeline.VARIANT_BOUNDS)
    max_variant_rel_logit_diff: PositiveFloat | None = None
    min_variant_greedy_agreement: Share | None = None
    # auto: onnxruntime-genai's model builder where it supports the LLM (GroupQueryAttention, in-place
    # KV cache), else lsd-edge's traced decoder; builder: that or an error; traced: lsd-edge's own
    decoder: Literal["auto", "builder", "traced"] = "auto"
    gguf: GgufGateConfig = GgufGateConfig()


class EvalConfig(Strict):
    max_samples: PositiveInt | None = None
    max_new_tokens: PositiveInt = 8
    batch_size: PositiveInt = 64


class BenchConfig(Strict):
    """`lsd-edge bench` defaults: prompts per repeat, new tokens per generation (EOS ignored)."""

    prompts: PositiveInt = 8
    max_new_tokens: PositiveInt = 128
    repeats: PositiveInt = 3
    warmup: NonNegInt = 1
