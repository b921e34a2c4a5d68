"""README figures against docs/: every number in README.md's "The embedded default" and "Results"
sections is listed in docs/figures.toml with the docs page and the command it comes from; the
command stands beside the figure in the README and verbatim in the page, and the page holds the
same number and names the machine. A figure added to the README without a source fails here."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass

import pytest

from .helpers import REPO

SECTIONS = ("The embedded default", "Results")
FIGURES = tomllib.loads((REPO / "docs" / "figures.toml").read_text())
ENTRIES = FIGURES["figure"]
KEYS = {"section", "figures", "page", "command", "machine", "moves", "note"}
# a number as prose writes one: 0.34x, 92.8%, 703,296, 7.2e-7; not the digits of int8, Q8_0,
# x86_64, 2x64 or Qwen1.5-0.5B
NUMBER = re.compile(r"(?<![\w.,])(?>\d(?:[\d,]*\d)?(?:\.\d+)?(?:e-\d+)?)(?=x?(?!\w))")


def flat(text: str) -> str:
    """Markdown as one line: line continuations, breaks and bold or italic marks gone."""
    return " ".join(re.sub(r"\\\n", " ", text).replace("**", "").split())


def prose(text: str) -> str:
    """What a reader reads as figures: no code spans (commands), no link targets."""
    return re.sub(r"\]\([^)]*\)", "]", re.sub(r"`[^`]*`", "`…`", flat(text)))


def numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in NUMBER.findall(text)}


@dataclass
class Block:
    """One README list item, or a section's text outside its lists."""

    section: str
    raw: str  # flattened, code spans kept
    text: str  # prose()
    intro: str  # the section's text outside its lists, flattened


def blocks(readme: str) -> list[Block]:
    out = []
    for part in re.split(r"^## ", readme, flags=re.M)[1:]:
        heading, _, body = part.partition("\n")
        section = next((s for s in SECTIONS if heading.startswith(s)), None)
        if section is None:
            continue
        items, rest = [], []
        for line in re.sub(r"^```.*?^```", "", body, flags=re.M | re.S).split("\n"):
            if line.startswith("- "):
                items.append([line[2:]])
            elif items and line.startswith("  "):
                items[-1].append(line)
            else:
                rest.append(line)
        intro = flat("\n".join(rest))
        for lines in [rest, *items]:
            raw = "\n".join(lines)
            out.append(Block(section, flat(raw), prose(raw), intro))
    return out


README_BLOCKS = blocks((REPO / "README.md").read_text())


def spans(text: str, needle: str) -> list[tuple[int, int]]:
    pattern = r"(?<![\w.])" + re.escape(flat(needle)) + r"(?!\w)"
    return [m.span() for m in re.finditer(pattern, text)]


def unsourced(block: Block) -> list[str]:
    """The numbers of a block that neither a listed figure (beside its command) nor a context text covers."""
    covering = list(FIGURES["context"]["texts"])
    for e in ENTRIES:
        if e["section"] == block.section and flat(e["command"]) in block.raw:
            covering += e["figures"]
    covered = [span for needle in covering for span in spans(block.text, needle)]
    return [
        m.group()
        for m in NUMBER.finditer(block.text)
        if not any(a <= m.start() and m.end() <= b for a, b in covered)
    ]


def test_the_sections_are_found():
    assert {b.section for b in README_BLOCKS} == set(SECTIONS)
    assert all(set(e) <= KEYS and e["section"] in SECTIONS for e in ENTRIES), ENTRIES


@pytest.mark.parametrize("block", README_BLOCKS, ids=lambda b: f"{b.section}: {b.text[:40]}")
def test_every_readme_figure_is_listed_with_its_command(block):
    assert not unsourced(block), f"not in docs/figures.toml beside its command: {unsourced(block)}"


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e["command"][:50])
def test_each_listed_figure_stands_in_the_readme_beside_its_command(entry):
    beside = [b for b in README_BLOCKS if b.section == entry["section"] and flat(entry["command"]) in b.raw]
    assert beside, f"command not in README section {entry['section']!r}: {entry['command']}"
    for figure in entry["figures"]:
        assert any(spans(b.text, figure) for b in beside), f"{figure} not beside {entry['command']}"
    assert any(entry["page"] in b.raw for b in beside), f"the README item does not link {entry['page']}"
    assert any(entry["machine"] in b.raw + b.intro for b in beside), entry["machine"]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e["command"][:50])
def test_each_listed_figure_is_in_its_page_with_its_command_and_machine(entry):
    page = flat((REPO / entry["page"]).read_text())
    assert flat(entry["command"]) in page, f"{entry['page']} lacks the command {entry['command']}"
    assert entry["machine"] in page, f"{entry['page']} does not name {entry['machine']}"
    for figure in entry["figures"]:
        missing = numbers(figure) - numbers(page)
        assert not missing, f"{entry['page']} lacks {sorted(missing)} of the README's {figure}"


def test_context_texts_are_in_the_readme():
    text = " ".join(b.text for b in README_BLOCKS)
    assert all(spans(text, t) for t in FIGURES["context"]["texts"]), FIGURES["context"]["texts"]


def test_a_new_figure_or_a_figure_without_its_command_is_caught():
    results = next(b for b in README_BLOCKS if b.section == "Results" and "--eval-samples 100" in b.raw)
    assert not unsourced(results)
    added = Block(results.section, results.raw, results.text + " It uses 0.24x the memory.", results.intro)
    assert unsourced(added) == ["0.24"]
    command = "`lsd-edge bench --teacher"
    moved = Block(results.section, results.raw.replace(command, "`lsd-edge benchmark"), results.text, "")
    assert "14.3" in unsourced(moved) and "28.3" in unsourced(moved)
