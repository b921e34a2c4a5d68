"""The recipe's `[export.gguf]` section: bounds of the GGUF export's parity gate for the quant
exported, each replacing the one measured for it (`lsd_edge.export.gguf.pipeline.QUANT_BOUNDS`) where
given. A module of its own so that schema.py stays one screenful per concern; strict and frozen as
every recipe section is."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Share = Annotated[float, Field(ge=0, le=1)]


class GgufGateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_rel_logit_diff: Annotated[float, Field(gt=0)] | None = None
    min_first_token_agreement: Share | None = None
    min_greedy_agreement: Share | None = None
    max_accuracy_drop: Annotated[float, Field(ge=0)] | None = None
