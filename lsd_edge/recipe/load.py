"""Reading a recipe: TOML with `tomllib`, `--set` overrides, and every problem reported at once.

`load_recipe(path, overrides)` names each problem under the TOML key path the user wrote
(`stages[2].lr`) and refuses unknown keys, so a typo never passes silently; `cross_check` then
finds the problems that involve several sections (a stage's data set, the teacher's stages).
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lsd_edge.errors import LsdEdgeError, RecipeError
from lsd_edge.recipe.schema import Recipe


def cross_check(recipe: Recipe) -> list[str]:
    """Problems that involve more than one section, each under the key to change."""
    problems = []
    for i, st in enumerate(recipe.stages):
        if getattr(recipe.data, st.data or "", None) is None:
            problems.append(f"stages[{i}].data: '{st.data}' needs a [data.{st.data}] section")
    for i, st in enumerate(recipe.teacher.stages):
        if getattr(recipe.data, st.data or "", None) is None:
            problems.append(f"teacher.stages[{i}].data: '{st.data}' needs a [data.{st.data}] section")
        if st.distills:
            problems.append(f"teacher.stages[{i}].kind: the teacher trains with pt/sft stages only")
        if st.regenerate:
            problems.append(f"teacher.stages[{i}].regenerate: the teacher trains on the reference answers")
    if recipe.teacher.stages and recipe.teacher.tiny is None:
        problems.append("teacher.stages: only a [teacher.tiny] teacher is trained by the recipe")
    if recipe.teacher.tiny is not None and not recipe.teacher.stages:
        problems.append("teacher.stages: a [teacher.tiny] teacher needs [[teacher.stages]] to train it")
    if recipe.teacher.tiny is not None and recipe.teacher.tiny.vision == "teacher":
        problems.append("teacher.tiny.vision: the teacher needs its own vision sizes, not 'teacher'")
    if recipe.student.vision not in (None, "teacher") and recipe.student.llm is None:
        if recipe.student.tiny is not None and recipe.student.tiny.vision != "teacher":
            problems.append(
                "student.vision: a folder and [student.tiny.vision] sizes both give the student a tower; keep one"
            )
        else:
            problems.append("student.vision: only used with student.llm (composing a model from parts)")
    problems += _vision_choice_problems(recipe)
    for i, st in enumerate(recipe.stages):
        for j, pair in enumerate(st.loss.latent_pairs):
            if (pair[0] == "projector") != (pair[1] == "projector"):
                problems.append(
                    f"stages[{i}].loss.latent_pairs[{j}]: pair 'projector' with 'projector', layers with layers"
                )
    return problems


def vision_choice_problems(
    image_size: int | None,
    vision_layers: int | None,
    tower: tuple[int, int, int, int],
    where: str = "the teacher's tower",
) -> list[str]:
    """What is wrong with `student.image_size` / `student.vision_layers` on a tower of
    (image size, patch size, layers, LLaVA feature layer)."""
    tower_size, patch, layers, feature_layer = tower
    problems = []
    if image_size is not None and image_size % patch:
        problems.append(
            f"student.image_size {image_size} is not a multiple of {where}'s patch size {patch}; "
            f"use e.g. {max(1, image_size // patch) * patch}"
        )
    elif image_size is not None and image_size > tower_size:
        problems.append(
            f"student.image_size {image_size} is above {where}'s {tower_size} px; "
            "the student sees with fewer tokens, not more"
        )
    if vision_layers is not None and vision_layers > layers:
        problems.append(
            f"student.vision_layers {vision_layers} is out of range: {where} has 1 to {layers} layers"
        )
    elif vision_layers is not None and feature_layer < 0 and -feature_layer > vision_layers + 1:
        problems.append(
            f"student.vision_layers {vision_layers} leaves no hidden state {feature_layer} to read features "
            f"from; keep at least {-feature_layer - 1} layers"
        )
    return problems


def _vision_choice_problems(recipe: Recipe) -> list[str]:
    """`student.image_size` / `vision_layers` where the recipe can tell: not on a saved student or
    one with tower sizes of its own, and on a [teacher.tiny] teacher's tower (a loaded tower is
    checked when its config is read, `lsd_edge.models.vision`)."""
    s, t = recipe.student, recipe.teacher.tiny
    chosen = [k for k in ("image_size", "vision_layers") if getattr(s, k) is not None]
    if not chosen:
        return []
    if s.path is not None:
        return [
            f"student.{chosen[0]}: a student.path model is used as saved; cut the tower of a composed "
            "(student.llm) or [student.tiny] student instead"
        ]
    if s.tiny is not None and s.tiny.vision != "teacher":
        size = "image_size" if chosen[0] == "image_size" else "num_layers"
        return [
            f"student.{chosen[0]}: [student.tiny.vision] sizes build a tower of their own; set its {size} "
            "there, or vision = 'teacher' to cut the teacher's"
        ]
    teachers_tower = s.tiny is not None or s.vision in (None, "teacher")
    if t is None or t.vision == "teacher" or not teachers_tower:
        return []
    v = t.vision
    # a tiny teacher reads its tower's last layer (lsd_edge.models.build.tiny_llava_config)
    return vision_choice_problems(
        s.image_size, s.vision_layers, (v.image_size, v.patch_size, v.num_layers, -1)
    )


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (
            isinstance(part, str)
            and not part.startswith(("function-", "literal[", "tagged-union"))
            and part
            not in (
                "int",
                "str",
                "float",
                "bool",
                "list[...]",
                "tuple[...]",
            )
            and not re.match(r"^(int|str|float|bool|list|tuple|literal|constrained)", part)
        ):
            out += ("." if out else "") + part
    return out or "(top level)"


def _format_errors(err: ValidationError) -> list[str]:
    problems: list[str] = []
    for e in err.errors(include_url=False):
        where = _loc(tuple(e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (a typo?); remove it or check the spelling against `lsd-edge validate` output"
        elif e["type"] == "missing":
            msg = "missing; this key or section is required"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        line = f"{where}: {msg}"
        if line not in problems:
            problems.append(line)
    return problems


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")


def _split_key(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for chunk in path.split("."):
        if chunk.isdigit():
            parts.append(int(chunk))
            continue
        m = _KEY.fullmatch(chunk)
        if not m:
            raise ValueError(f"'{path}' is not a key path like stages[1].lr or run.seed")
        parts.append(m.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return parts


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Apply `a.b[1].c=value` overrides; values are TOML literals (strings may go unquoted)."""
    raw = copy.deepcopy(raw)
    problems: list[str] = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"--set {item}: expected KEY=VALUE, e.g. --set stages[0].lr=1e-4")
            continue
        key, value = item.split("=", 1)
        try:
            parts = _split_key(key.strip())
        except ValueError as e:
            problems.append(f"--set {item}: {e}")
            continue
        node: Any = raw
        ok = True
        for j, part in enumerate(parts[:-1]):
            nxt = parts[j + 1]
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    problems.append(f"--set {item}: index [{part}] is out of range")
                    ok = False
                    break
                node = node[part]
            else:
                if not isinstance(node, dict):
                    problems.append(f"--set {item}: '{part}' is not a table")
                    ok = False
                    break
                if part not in node or node[part] is None:
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
        if not ok:
            continue
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                problems.append(f"--set {item}: index [{last}] is out of range")
                continue
            node[last] = _parse_value(value.strip())
        elif isinstance(node, dict):
            node[last] = _parse_value(value.strip())
        else:
            problems.append(f"--set {item}: cannot set a key inside a non-table")
    return raw, problems


def parse_recipe(raw: dict[str, Any], source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    raw, problems = apply_overrides(raw, overrides or [])
    if problems:
        raise RecipeError(source, problems)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(source, _format_errors(err)) from None
    problems = cross_check(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), ["no such recipe file; see recipes/ for the shipped ones"])
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(str(path), [f"TOML syntax error: {e}"]) from None
    except UnicodeDecodeError:
        raise RecipeError(str(path), ["not a UTF-8 text file; a recipe is TOML"]) from None
    return parse_recipe(raw, str(path), overrides)


def folder_recipe(folder: str | Path) -> Recipe | None:
    """The recipe.toml a model folder was made with (lsd-edge checkpoints carry one), or None when it
    has none or it no longer validates (an old or foreign recipe: callers fall back to defaults)."""
    path = Path(folder) / "recipe.toml"
    if not path.is_file():
        return None
    try:
        return load_recipe(path)
    except LsdEdgeError:
        return None
