"""Measure the efficiency options on a recipe (default: the embedded one), in one command.

    PYTHONPATH=. OMP_NUM_THREADS=1 python docs/efficiency/measure_tiny.py --out /tmp/effrun \
        [--recipe recipes/tiny.toml] [--data-root DIR] [--teacher DIR] [--set KEY=VALUE ...]

`--set` overrides go to every run (e.g. `stages[2].max_steps=60` for a short measurement); the
figures in README's Efficiency section name the ones they used.

`--teacher` copies a teacher this recipe already trained (its teacher.json fingerprint must match,
i.e. same teacher/data/seed/eval settings, `--data-root` included) instead of training it again.

1. The recipe as it is (online teacher) into OUT/online: teacher, DPT, SFT, DFT.
2. From that run's teacher, DPT and SFT, the DFT stage again, back to back and alternating so that
   machine noise falls on both sides: online, cached top-64, online, cached top-8. Each cached DFT
   first makes its cache (timed apart) and then trains with no teacher in memory.
3. From the same teacher and DPT: SFT and DFT on teacher-regenerated SFT answers (LLaVADI).

Writes OUT/efficiency.json and prints it: step times, accuracies, cache sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from lsd_edge.files import read_json, write_json
from lsd_edge.progress import QuietReporter
from lsd_edge.recipe.load import load_recipe
from lsd_edge.train.pipeline import DistillOptions, distill


def _stage(root: Path, name: str) -> dict:
    m = read_json(root / name / "metrics.json")
    return {
        "steps": m["steps"],
        "seconds": m["seconds"],
        "step_ms": round(1000 * m["seconds"] / m["steps"], 1),
        "accuracy": m["eval"]["accuracy"],
    }


def _from(base: Path, root: Path, folders: list[str]) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for f in folders:
        shutil.copytree(base / f, root / f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/tiny.toml")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data-root", help="data.root (default OUT/data)")
    ap.add_argument("--teacher", type=Path, help="a teacher folder made by this recipe, to copy")
    ap.add_argument("--set", action="append", default=[], help="a recipe override for every run")
    args = ap.parse_args()
    out: Path = args.out
    data = ["data.root=" + (args.data_root or str(out / "data"))] + args.set
    if args.teacher and not (out / "online" / "teacher").exists():
        shutil.copytree(args.teacher, out / "online" / "teacher")

    def run(name: str, extra: list[str]) -> Path:
        root = out / name
        r = load_recipe(args.recipe, data + [f"run.output_dir={root}"] + extra)
        t0 = time.perf_counter()
        distill(r, DistillOptions(resume=True), QuietReporter())
        print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
        return root

    base = run("online", [])
    result: dict = {
        "recipe": args.recipe,
        "overrides": args.set,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "online": {"dft": _stage(base, "dft")},
    }
    dft = len(load_recipe(args.recipe).stages) - 1
    plan = [
        ("online-2", []),
        ("cache-64", [f"stages[{dft}].teacher_cache=auto", f"stages[{dft}].teacher_cache_top_k=64"]),
        ("online-3", []),
        ("cache-8", [f"stages[{dft}].teacher_cache=auto", f"stages[{dft}].teacher_cache_top_k=8"]),
    ]
    for name, extra in plan:
        _from(base, out / name, ["teacher", "dpt", "sft"])
        root = run(name, extra)
        row = {"dft": _stage(root, "dft")}
        if (root / "teacher-cache").exists():
            mf = read_json(root / "teacher-cache" / "dft" / "manifest.json")
            row["cache"] = {
                k: mf[k] for k in ("top_k", "bytes", "bytes_per_position", "positions", "seconds")
            }
        result[name] = row
    sft = next(i for i, s in enumerate(load_recipe(args.recipe).stages) if s.kind == "sft")
    _from(base, out / "regen-sft", ["teacher", "dpt"])
    root = run("regen-sft", [f"stages[{sft}].regenerate=true", f"stages[{sft}].regenerate_max_new_tokens=8"])
    result["regen-sft"] = {
        "sft": _stage(root, "sft"),
        "dft": _stage(root, "dft"),
        "regenerated": read_json(root / "regenerated" / "sft" / "manifest.json"),
    }
    result["online"]["sft"] = _stage(base, "sft")
    result["teacher_accuracy"] = read_json(base / "report.json")["teacher"]["accuracy"]

    online = [result[n]["dft"]["step_ms"] for n in ("online-2", "online-3")]
    summary = {"online_dft_step_ms": online}
    for n in ("cache-64", "cache-8"):
        c = result[n]["dft"]
        summary[n] = {
            "step_ms": c["step_ms"],
            "speedup_vs_online_mean": round(sum(online) / len(online) / c["step_ms"], 2),
            "accuracy_points_vs_online": round(
                100
                * (c["accuracy"] - sum(result[o]["dft"]["accuracy"] for o in ("online-2", "online-3")) / 2),
                2,
            ),
        }
    summary["regen_sft_accuracy_points"] = {
        "after_sft": round(
            100 * (result["regen-sft"]["sft"]["accuracy"] - result["online"]["sft"]["accuracy"]), 2
        ),
        "after_dft": round(
            100 * (result["regen-sft"]["dft"]["accuracy"] - result["online"]["dft"]["accuracy"]), 2
        ),
    }
    result["summary"] = summary
    write_json(out / "efficiency.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
