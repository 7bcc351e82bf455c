"""The import contract between Postlane's parts (docs/architecture.md, "Layers").

A *part* is a subpackage or a top-level module of ``postlane``. Every import counts: at module
level, inside functions (lazy) and under ``if TYPE_CHECKING`` - a design dependency is one
whichever way Python loads it. Read with ``ast``, so the check costs milliseconds and imports
nothing.

The contract: the parts stand in ordered layers (``LAYERS``, top first); a part imports only parts
of lower layers, never one of its own layer or above, so the part graph has no cycle. ``DEBT``
listed the imports that still broke it, each with why; the list could only shrink (an entry
whose import is gone fails the test, so it is struck off). Issue 21 paid the last entry: it is
empty and stays so.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "postlane"

LAYERS: list[set[str]] = [
    {"cli"},                                        # commands: the `postlane` entry point
    {"harness"},                                    # bench, demo, sink, kill test: never imported
    {"admin"},                                      # running a node: init, backup, upgrade, service
    {"node"},                                       # the composition root: wires every part
    {"workers"},                                    # SMTP intake in worker processes
    {"startup"},                                    # reading a config with the checks of all parts
    {"api"},                                        # HTTP API and dashboard
    {"reputation"},                                 # DMARC/Postmaster/SNDS views, alerts
    {"operations"},                                 # operator actions, on the record
    {"monitor"},                                    # metrics, alerts, SLA tracking
    {"feedback"},                                   # DSN, ARF, suppression, VERP, unsubscribe
    {"scheduler"},                                  # lanes, slots, retries: drives the relay
    {"relay"},                                      # one SMTP transaction per call, outcomes
    {"edge"},                                       # SMTP server: hands messages to intake
    {"policy"},                                     # intake: classify, stamp, sign, store
    {"audit"},                                      # the audit store and the recorder that feeds it
    {"spool"},                                      # the durable queue and evidence outbox
    {"accounting"},                                 # records and their CSV/JSONL files
    {"config"},                                     # data and validation of data
    {"address", "schema", "secretfile", "childproc", "health", "logsetup",  # leaf helpers
     "streams", "maildate"},
]

DEBT: dict[tuple[str, str], str] = {
    # (importer, imported): why it is still there. Empty since issue 21 paid the last entry
    # (policy -> edge: the address parser, the users store and the disk guard moved below).
}


def _part(module: str) -> str | None:
    names = module.split(".")
    return names[1] if names[0] == "postlane" and len(names) > 1 else None


def part_imports() -> dict[str, dict[str, list[str]]]:
    """importer part -> imported part -> ["module:line", ...] over every .py file."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(ROOT.rglob("*.py")):
        names = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = names[:-1] if names[-1] != "__init__" else names[:-1]
        if names[-1] == "__init__":
            names = names[:-1]
        module = ".".join(names)
        source = _part(module)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (package[:len(package) - node.level + 1] if node.level
                        else (node.module or "").split("."))
                if node.level and node.module:
                    base = base + node.module.split(".")
                stem = ".".join(base)
                targets = ([f"{stem}.{a.name}" for a in node.names] if stem == "postlane"
                           else [stem])
            else:
                continue
            for target in targets:
                part = _part(target)
                if part and source and part != source:
                    edges[source][part].append(f"{module}:{node.lineno}")
    return edges


def cycles(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:  # put back: a limit raised for good let later tests' deep inputs (a mail nesting
        # 3,000 MIME parts, test_dmarc) parse instead of being refused as too deep
        for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(out, key=len, reverse=True)


def _rank() -> dict[str, int]:
    return {part: -i for i, layer in enumerate(LAYERS) for part in layer}


def violations(edges: dict[str, dict[str, list[str]]]) -> dict[tuple[str, str], list[str]]:
    """Imports of a part of the same or a higher layer."""
    rank = _rank()
    return {(a, b): where for a, targets in edges.items() for b, where in targets.items()
            if rank[b] >= rank[a]}


def test_every_part_has_a_layer() -> None:
    parts = {p.stem for p in ROOT.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert not parts - {"data"} - set(_rank()), sorted(parts - {"data"} - set(_rank()))


def test_no_import_against_the_layers() -> None:
    found = violations(part_imports())
    new = {edge: where for edge, where in found.items() if edge not in DEBT}
    assert not new, "imports against the layers (docs/architecture.md, Layers):\n" + "\n".join(
        f"  {a} -> {b}: {', '.join(where)}" for (a, b), where in sorted(new.items()))
    paid = sorted(set(DEBT) - set(found))
    assert not paid, f"paid off, strike from DEBT: {paid}"


def test_no_debt() -> None:
    """The debt is paid: every import follows the layers, and none may be excused again."""
    assert DEBT == {}


def test_no_cycles_between_parts() -> None:
    """The part graph, every import counted, has no cycle (the layers imply it; this says it
    directly, and names the parts of any cycle that appears)."""
    assert cycles(part_imports()) == []


WIRING = ["node.py", "admin/service.py", "workers/pool.py", "workers/process.py"]
"""The composition root and the code that runs it: they hand parts what they use (constructor
arguments, methods of the part), never set a part's attribute (docs/architecture.md, Wiring)."""


def _reaches_into_part(target: ast.expr) -> bool:
    """``self.part.attr = ...`` or ``node.part[.attr] = ...`` (``self.x = ...`` and the
    config's data, ``cfg.x.y = ...``, are fine)."""
    if not isinstance(target, ast.Attribute):
        return False
    root: ast.expr = target.value
    depth = 1
    while isinstance(root, ast.Attribute):
        root, depth = root.value, depth + 1
    name = root.id if isinstance(root, ast.Name) else ""
    return name == "node" or (name == "self" and depth > 1)


def test_the_wiring_assigns_no_attribute_of_a_part() -> None:
    found = []
    for rel in WIRING:
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            targets = (node.targets if isinstance(node, ast.Assign) else
                       [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else [])
            for target in targets:
                for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if _reaches_into_part(t):
                        found.append(f"{rel}:{node.lineno}: {ast.unparse(t)}")
    assert not found, "give the part a constructor argument or a method:\n" + "\n".join(found)


if __name__ == "__main__":  # python tests/test_layers.py: the graph, its cycles, the debt
    graph = part_imports()
    comps = cycles(graph)
    print(f"{len(set(graph) | {w for ws in graph.values() for w in ws})} parts;"
          f" cycles: {[len(c) for c in comps]}")
    for comp in comps:
        print("  ", " ".join(comp))
    for (a, b), where in sorted(violations(graph).items()):
        print(f"{a} -> {b}: {', '.join(where)}")
