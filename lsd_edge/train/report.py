"""A finished run's report (report.json: teacher and student accuracy, size, parameters, every stage)
and its loss curves (loss_curve.png, one panel per stage, from log.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lsd_edge.data.questions import first_questions
from lsd_edge.distill.objective import TERMS
from lsd_edge.distill.teacher_cache import TeacherCache
from lsd_edge.models.card import CardFacts
from lsd_edge.models.groups import count_params
from lsd_edge.models.info import dir_size_mb
from lsd_edge.recipe.schema import StageConfig


def offline_facts(stage: StageConfig, teacher, dataset_path: Path) -> dict[str, Any]:
    """For a stage's metrics: where its teacher targets and its data came from."""
    out: dict[str, Any] = {}
    if isinstance(teacher, TeacherCache) and stage.distills:
        out["teacher_cache"] = {"path": str(teacher.folder), "top_k": teacher.top_k}
    if stage.regenerate:
        out["regenerated_data"] = str(dataset_path)
    return out


def accuracy_of(metrics: dict[str, Any]) -> float | None:
    return (metrics.get("eval") or {}).get("accuracy")


def build_report(
    *,
    name: str,
    root: Path,
    teacher_info: dict[str, Any],
    teacher_metrics: dict[str, Any],
    teacher_dir: Path | None,
    student,
    student_dir: Path,
    stage_reports: list[dict[str, Any]],
    seconds: float,
    device: str,
) -> dict[str, Any]:
    """`teacher_dir` is the trained teacher's folder (its size on disk is reported), None for a
    loaded teacher (its size in memory is)."""
    t_size = dir_size_mb(teacher_dir) if teacher_dir is not None else teacher_info["size_mb"]
    return {
        "recipe": name,
        "output_dir": str(root),
        "teacher": {
            "accuracy": accuracy_of(teacher_metrics) if teacher_metrics else None,
            "params": teacher_info["params"],
            "size_mb": round(t_size, 3),
        },
        "student": {
            "accuracy": accuracy_of(stage_reports[-1]),
            "params": count_params(student)["total"],
            "size_mb": round(dir_size_mb(student_dir), 3),
            "path": str(student_dir),
        },
        "stages": [
            {
                "name": m.get("stage"),
                "kind": m.get("kind"),
                "accuracy": accuracy_of(m),
                "steps": m.get("steps"),
                "seconds": m.get("seconds"),
                "last_losses": m.get("last_losses"),
                "bad_samples": m.get("bad_samples"),
            }
            for m in stage_reports
        ],
        "seconds": round(seconds, 1),
        "device": device,
    }


def plot_losses(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    stages: list[str] = []
    for r in rows:
        if r["stage"] not in stages:
            stages.append(r["stage"])
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for ax, st in zip(axes[0], stages, strict=True):
        sr = [r for r in rows if r["stage"] == st]
        for term in ("loss",) + TERMS:
            ys = [r[term] for r in sr if term in r]
            if ys:
                ax.plot([r["step"] for r in sr if term in r], ys, label=term, lw=1)
        ax.set_title(st)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def card_facts(recipe, report: dict[str, Any], student_dir: Path, export_dir: Path) -> CardFacts:
    """What the student's model card says, from the recipe and the finished run's report."""
    t, s = recipe.teacher, recipe.student
    teacher = (
        t.path or f"a tiny LLaVA teacher trained by the recipe ({', '.join(st.name for st in t.stages)})"
    )
    data = {}
    for name in ("pretrain", "instruct", "eval"):
        ds = getattr(recipe.data, name)
        if ds is not None:
            data[name] = str(recipe.data.resolve(ds)[0])
    facts = CardFacts(
        name=f"{recipe.run.name} student",
        pytorch_dir=str(student_dir),
        export_dir=str(export_dir),
        teacher=teacher,
        student_llm=s.llm,
        recipe=report["recipe"],
        stages=[{k: st.get(k) for k in ("name", "kind", "steps", "accuracy")} for st in report["stages"]],
        data=data,
        teacher_accuracy=report["teacher"]["accuracy"],
        student_accuracy=report["student"]["accuracy"],
        params=report["student"]["params"],
        teacher_params=report["teacher"]["params"],
    )
    if recipe.data.eval is not None:
        path, images = recipe.data.resolve(recipe.data.eval)
        found = first_questions(path, images, limit=1) if path.is_file() else []
        if found:
            facts.example = (str(found[0].image), found[0].question)
    return facts
