"""maye_pl's parts import each other one way only, and no file grows past 500 lines.

Every import of every module is read from its source (``ast``, function-level imports included:
a deferred import is still a dependency; ``if TYPE_CHECKING:`` blocks excluded: annotations only,
never run), so a cycle cannot come back unnoticed:

- Between parts (a top-level module or package of maye_pl): a part imports only parts in a lower
  layer of ``LAYERS``; two parts of one layer never import each other.
- Between modules: the module graph has no cycle (within a package too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "maye_pl"
MAX_LINES = 500

LAYERS: tuple[tuple[str, ...], ...] = (
    ("_torchvision_shim",),
    ("errors", "maye_pl", "types"),  # user errors; the package root (applies the shim); the shared types
    ("rl", "rewards"),  # pure functions over tensors and strings
    ("models",),  # HF models: adapters, loading (also on the meta device), the trainer forward
    ("data", "strategies", "trajectory"),  # the data module; FSDP2 and weight streaming; the loss's inputs
    ("rollout", "evaluation"),  # engines and the rollout pipeline; metrics and the evaluation scheme
    ("checkpoints", "console", "export", "hparams", "optim", "preemption"),
    ("policy_module",),  # what the LightningModules share
    ("module", "sft"),  # the LightningModules
    ("demo",),  # the CPU demo's assets (the SFT warm start is trained by the CLI's function it is given)
    ("cli",),
    ("__main__",),
)
"""maye_pl's parts from the bottom up."""
LAYER = {part: index for index, layer in enumerate(LAYERS) for part in layer}


def module_name(path: Path) -> str:
    """``maye_pl/rollout/base.py`` -> ``maye_pl.rollout.base``; a package's ``__init__`` is the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The maye_pl modules ``name`` imports anywhere in its source (``from pkg import sub`` counts
    as importing ``pkg.sub`` when that is a module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if test is not None and ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                pending.extend(child.orelse)
                continue
            pending.append(child)


def part_of(module: str) -> str:
    """The top-level part a module belongs to (``maye_pl.rollout.base`` -> ``rollout``)."""
    return module.split(".")[1] if "." in module else module


GRAPH = {name: imported_modules(name) for name in MODULES}


def test_every_part_has_a_layer():
    unplaced = sorted({part_of(name) for name in MODULES} - LAYER.keys())
    assert not unplaced, f"add {unplaced} to a layer of LAYERS in tests/test_layering.py"


def test_parts_import_only_lower_layers():
    wrong = sorted(
        f"{name} imports {target} ({part_of(name)} is layer {LAYER[part_of(name)]}, "
        f"{part_of(target)} layer {LAYER[part_of(target)]})"
        for name, targets in GRAPH.items()
        for target in targets
        if part_of(target) != part_of(name) and LAYER[part_of(target)] >= LAYER[part_of(name)]
    )
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    # a -> b -> c -> a is one cycle; d -> a hangs off it.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_file_over_500_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (limit {MAX_LINES}); split it along its jobs"
