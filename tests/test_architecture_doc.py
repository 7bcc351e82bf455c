"""docs/architecture.md opens its "Layers" section with the layer diagram: one line per layer,
top first, naming the same parts in the same order as ``LAYERS`` in tests/test_layers.py (the
contract the import check enforces), so the page cannot drift from the code."""

from __future__ import annotations

from pathlib import Path

from tests.test_layers import LAYERS

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def diagram_layers(text: str) -> list[set[str]]:
    """The parts of each line of the first code block under "## Layers" (a leaf line names
    several, joined by " · "; an indented line continues the one above)."""
    section = text.split("\n## Layers\n", 1)[1]
    block = section.split("```", 2)[1]
    layers: list[set[str]] = []
    for line in block.strip("\n").splitlines():
        if not line or line.startswith(" "):
            continue
        names = line.split("  ", 1)[0].strip()
        layers.append({name.strip() for name in names.split("·")})
    return layers


def test_the_diagram_names_the_layers_of_the_import_check_in_order() -> None:
    assert diagram_layers(DOC.read_text(encoding="utf-8")) == LAYERS


def test_each_part_has_its_one_line_job() -> None:
    block = DOC.read_text(encoding="utf-8").split("\n## Layers\n", 1)[1].split("```", 2)[1]
    single = [line for line in block.splitlines() if line and not line.startswith(" ")
              and "·" not in line]
    assert all(len(line.split(None, 1)) == 2 for line in single), single
