"""The training-scheme ablation of METHOD.md: several stage chains, one teacher, one initial student.

A scheme is a chain of stage kinds, `pt-sft` or `dpt-sft-dft`. Each stage of a scheme takes its
settings (data, lr, steps, batch) from the recipe's stage of the same kind, or from its twin
(pt <-> dpt, sft <-> dft) with the distillation terms switched on or off, so schemes differ only in
what the method changes and every scheme gets equal steps per stage. Switches after the chain change
every stage of the scheme: `:no-TERM` turns a distillation term off, `:on-policy` makes each DFT
stage on-policy (the recipe's DFT `on_policy` settings, or the defaults with answers as long as
eval's `max_new_tokens`), so `dpt-sft-dft,dpt-sft-dft:on-policy` compares the two on one seed.

A student with its own tokenizer (`student.tokenizer`, `--set student.tokenizer=word`) is distilled
across the two vocabularies; a scheme's `:uld` or `:gold` switch picks the loss that does it
(`loss.cross_tokenizer`), e.g. `dpt-sft-dft:ce,dpt-sft-dft:uld,dpt-sft-dft:gold`: the plain CE
baseline (`:ce`, every distillation term off) beside ULD and GOLD on the same teacher, student, stages
and steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lsd_edge.errors import LsdEdgeError
from lsd_edge.files import write_json
from lsd_edge.progress import QuietReporter, Reporter
from lsd_edge.recipe.distill import OnPolicyConfig
from lsd_edge.recipe.schema import DEFAULT_DISTILL_WEIGHTS, DISTILL_TERMS, Recipe, StageConfig
from lsd_edge.train.pipeline import DistillOptions, distill
from lsd_edge.workspace import Workspace

TWIN = {"pt": "dpt", "dpt": "pt", "sft": "dft", "dft": "sft"}


def stage_template(recipe: Recipe, kind: str) -> StageConfig:
    """The recipe's stage of this kind, or its twin turned into this kind."""
    for st in recipe.stages:
        if st.kind == kind:
            return st
    for st in recipe.stages:
        if st.kind == TWIN[kind]:
            data = st.model_dump(mode="json")
            data["kind"] = kind
            distills = kind in ("dpt", "dft")
            for term in DISTILL_TERMS:
                data["loss"][term] = DEFAULT_DISTILL_WEIGHTS[term] if distills else 0.0
            return StageConfig.model_validate(data)
    raise LsdEdgeError(
        f"scheme stage '{kind}': the recipe has no {kind} or {TWIN[kind]} stage to take settings from"
    )


ON_POLICY = "on-policy"
CROSS_TOKENIZER = ("uld", "gold")


def terms_off(scheme: str, switches: list[str]) -> list[str]:
    """The distillation terms a scheme's `:no-TERM` switches turn off (`:ce` all of them; `:on-policy`,
    `:uld` and `:gold` are not terms)."""
    off = []
    for sw in switches:
        if sw in CROSS_TOKENIZER or sw == ON_POLICY:
            continue
        if sw == "ce":  # the plain CE baseline on the same stages and steps
            off += list(DISTILL_TERMS)
            continue
        term = sw.removeprefix("no-")
        if not sw.startswith("no-") or term not in DISTILL_TERMS:
            raise LsdEdgeError(
                f"scheme '{scheme}': '{sw}' is not a switch; turn a term off with :no-TERM, TERM one of "
                f"{', '.join(DISTILL_TERMS)} (e.g. dpt-sft-dft:no-visual_kl), make DFT on-policy with "
                f":{ON_POLICY}, or pick the cross-tokenizer loss with :uld or :gold"
            )
        off.append(term)
    return off


def on_policy_dft(recipe: Recipe, scheme: str, st: StageConfig) -> StageConfig:
    """A DFT stage made on-policy: its own `on_policy`, else the defaults with answers as long as
    eval's (`eval.max_new_tokens`); checked as the recipe's stages are."""
    op = st.on_policy or OnPolicyConfig(max_new_tokens=recipe.eval.max_new_tokens)
    try:
        return StageConfig.model_validate({**st.model_dump(mode="json"), "on_policy": op.model_dump()})
    except ValidationError as e:
        why = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise LsdEdgeError(f"scheme '{scheme}', stage '{st.name}': {why}") from None


def scheme_stages(recipe: Recipe, scheme: str) -> list[StageConfig]:
    """A scheme's stages: kinds joined by '-', then `:no-TERM` switches that set a distillation term's
    weight to 0 in every stage (e.g. `dpt-sft-dft:no-visual_kl:no-relation`; `:ce` all of them), and `:uld` or `:gold`,
    the loss a student with another tokenizer is distilled with (`loss.cross_tokenizer`), which also
    keeps only the projector pair of `loss.latent_pairs` (text positions of two tokenizers do not
    pair one to one)."""
    chain, *switches = scheme.lower().split(":")
    off = terms_off(scheme, switches)
    if ON_POLICY in switches and "dft" not in chain.split("-"):
        raise LsdEdgeError(f"scheme '{scheme}': :{ON_POLICY} changes DFT stages, and the chain has none")
    cross = [sw for sw in switches if sw in CROSS_TOKENIZER]
    kinds = chain.split("-")
    bad = [k for k in kinds if k not in TWIN]
    if not kinds or bad:
        raise LsdEdgeError(
            f"scheme '{scheme}': stages must be pt, dpt, sft or dft joined by '-', e.g. dpt-sft-dft"
        )
    stages, used = [], {}
    for kind in kinds:
        used[kind] = used.get(kind, 0) + 1
        name = kind if used[kind] == 1 else f"{kind}{used[kind]}"
        st = stage_template(recipe, kind)
        loss = st.loss.model_copy(update=dict.fromkeys(off, 0.0))
        if cross:
            pairs = [p for p in loss.latent_pairs if p == ("projector", "projector")]
            update = {"cross_tokenizer": cross[-1], "latent_pairs": pairs}
            loss = loss.model_copy(update=update if pairs else {**update, "latent": 0.0})
        st = st.model_copy(update={"name": name, "loss": loss})
        if kind == "dft" and ON_POLICY in switches:
            st = on_policy_dft(recipe, scheme, st)
        stages.append(st)
    return stages


def ablate(
    recipe: Recipe, schemes: list[str], output: Path | None = None, reporter: Reporter | None = None
) -> dict[str, Any]:
    reporter = reporter or QuietReporter()
    if not schemes:
        raise LsdEdgeError("--schemes: name at least one scheme, e.g. pt-sft,dpt-sft-dft")
    if len(set(schemes)) != len(schemes):
        raise LsdEdgeError("--schemes: a scheme is named twice")
    plans = {s: scheme_stages(recipe, s) for s in schemes}  # every scheme checked before any training
    ws = Workspace(recipe.output_dir)
    output = Path(output) if output is not None else ws.ablate
    teacher_dir = ws.teacher
    rows: dict[str, Any] = {}
    teacher: dict[str, Any] = {}
    for scheme, stages in plans.items():
        reporter.message(f"[bold]scheme {scheme}[/bold]: {' -> '.join(s.name for s in stages)}")
        run = recipe.run.model_copy(update={"output_dir": str(output / scheme)})
        r = recipe.model_copy(update={"run": run, "stages": stages})
        report = distill(
            r,
            DistillOptions(resume=True, teacher_dir=teacher_dir, stages=stages, evaluate_stages=False),
            reporter,
        )
        rows[scheme] = {
            "accuracy": report["student"]["accuracy"],
            "steps": sum(s["steps"] for s in report["stages"]),
            "stages": [
                {"name": s["name"], "steps": s["steps"], "seconds": s.get("seconds")}
                for s in report["stages"]
            ],
            "path": report["student"]["path"],
        }
        teacher = report["teacher"]
    result = {
        "recipe": recipe.run.name,
        "schemes": rows,
        "teacher": teacher,
        "chart": str(output / "ablation.png"),
    }
    plot_ablation(result, output / "ablation.png")
    write_json(output / "ablation.json", result)
    return result


def plot_ablation(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["schemes"])
    accs = [100 * result["schemes"][n]["accuracy"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.2))
    bars = ax.bar(names, accs, color="#4c72b0")
    for b, a in zip(bars, accs, strict=True):
        ax.annotate(f"{a:.1f}", (b.get_x() + b.get_width() / 2, a), ha="center", va="bottom", fontsize=8)
    if result["teacher"].get("accuracy") is not None:
        ax.axhline(100 * result["teacher"]["accuracy"], color="#c44e52", ls="--", label="teacher")
        ax.legend(fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_title(f"training schemes: {result['recipe']}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
