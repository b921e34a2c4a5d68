"""A small TOML writer for resolved recipes (tables, arrays of tables, plain values)."""

from __future__ import annotations

from typing import Any


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for resolved recipes (tables, arrays of tables, plain values)."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {toml_value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            body = dumps_toml(v, name)
            out += f"\n\n[{name}]\n{body}" if body.strip() else f"\n\n[{name}]"
        else:
            for item in v:
                out += f"\n\n[[{name}]]\n{dumps_toml(item, name)}"
    return out.strip() + "\n" if not prefix else out.strip()
