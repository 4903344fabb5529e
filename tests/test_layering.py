"""Imports run downward only, wire < checkpoint < actors < api < bench < cluster, and never
in a circle.

Read from the source with ``ast``, nothing is imported (no Ray, no server): every ``import``
and ``from … import`` in a module counts, at the top or inside a function, because a lazy
import is still a dependency, and one that exists to break a circle still closes it.
``tally.client`` (the client package beside ``tally.wire`` in the producer's distribution)
counts as wire.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# lowest first: a module may import its own layer and the ones before it
LAYERS = ("wire", "checkpoint", "actors", "api", "bench", "cluster")
# the import names that are not a folder's own: tally.client is the producer's library
LAYER_OF_PACKAGE = {"client": "wire"}


def _package_dirs() -> dict[str, Path]:
    """Import name -> folder, as the two distributions' setuptools package-dir say."""
    dirs: dict[str, Path] = {}
    for pyproject in (ROOT / "pyproject.toml", ROOT / "wire" / "pyproject.toml"):
        if not pyproject.exists():
            continue
        setuptools = tomllib.loads(pyproject.read_text()).get("tool", {}).get("setuptools", {})
        for name, folder in setuptools.get("package-dir", {}).items():
            dirs[name] = (pyproject.parent / folder).resolve()
    for layer in LAYERS:  # the layout the mapping describes, should a pyproject not say it
        dirs.setdefault(f"tally.{layer}", ROOT / layer)
    return dirs


def _modules() -> dict[str, Path]:
    """Every tally module under the layered folders, by its installed import name."""
    dirs = _package_dirs()
    modules: dict[str, Path] = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            if any(part.startswith(".") or part.endswith(".egg-info") for part in path.parts):
                continue
            # the deepest mapped folder holding the file names it (wire/client/ is tally.client)
            name, folder = max(
                ((n, d) for n, d in dirs.items() if path.is_relative_to(d)),
                key=lambda item: len(item[1].parts),
            )
            rest = path.relative_to(folder).with_suffix("").parts
            if rest[-1] == "__init__":
                rest = rest[:-1]
            modules[".".join((name, *rest))] = path
    return modules


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "tally" or len(parts) < 2:
        return None
    name = LAYER_OF_PACKAGE.get(parts[1], parts[1])
    return LAYERS.index(name) if name in LAYERS else None


def _imports(module: str, path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, imported module, names imported from it) for every import in the file."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            yield node.lineno, base, [alias.name for alias in node.names]


def _targets(imported: str, names: list[str], modules: dict[str, Path]) -> set[str]:
    """The tally modules an import loads: ``from pkg import mod`` loads pkg.mod."""
    found = {f"{imported}.{n}" for n in names if f"{imported}.{n}" in modules}
    if len(found) < len(names) or not names:
        # the module itself, or its nearest known parent (tally.x.y.Name -> tally.x.y; an old
        # name such as tally.wire.client once it is a package elsewhere -> tally.wire), or,
        # with nothing of it found, the name as written: still a dependency, and its layer
        parts = imported.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        found.add(".".join(parts) if parts else imported)
    return found


def _graph() -> tuple[dict[str, Path], dict[str, dict[str, tuple[int, str]]]]:
    """The modules, and for each the tally modules it imports (-> line, import as written)."""
    modules = _modules()
    edges: dict[str, dict[str, tuple[int, str]]] = {m: {} for m in modules}
    for module, path in modules.items():
        for line, imported, names in _imports(module, path):
            if not imported.startswith("tally.") and imported != "tally":
                continue
            for target in _targets(imported, names, modules):
                if target != module:  # `from tally.x import y` inside tally.x's __init__
                    edges[module].setdefault(target, (line, imported))
    return modules, edges


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_the_layered_folders_are_found() -> None:
    modules, _ = _graph()
    for layer in LAYERS:
        assert any(_layer(m) == LAYERS.index(layer) for m in modules), layer
    assert len(modules) > 50


def test_no_module_imports_from_a_higher_layer() -> None:
    modules, edges = _graph()
    upward = []
    for module, targets in sorted(edges.items()):
        own = _layer(module)
        for target, (line, written) in sorted(targets.items()):
            theirs = _layer(target)
            if own is not None and theirs is not None and theirs > own:
                upward.append(
                    f"{_where(modules[module], line)}: {LAYERS[own]} module {module} "
                    f"imports {target} ({LAYERS[theirs]}), as `{written}`"
                )
    assert not upward, "imports run upward:\n" + "\n".join(upward)


def _cycles(edges: dict[str, dict[str, tuple[int, str]]]) -> list[list[str]]:
    """One cycle through each strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # the graph is a few hundred modules: recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)

    cycles = []
    for component in components:
        members = set(component)
        start = min(component)
        # shortest way back to start within the component (breadth first)
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            following = []
            for node in frontier:
                for nxt in sorted(edges[node]):
                    if nxt in members and nxt not in previous:
                        previous[nxt] = node
                        following.append(nxt)
            frontier = following
        path = [start]
        node = previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def test_no_import_circle() -> None:
    modules, edges = _graph()
    described = []
    for cycle in _cycles(edges):
        steps = [
            f"  {_where(modules[a], edges[a][b][0])}: {a} imports {edges[a][b][1]}"
            for a, b in zip(cycle, cycle[1:], strict=False)
        ]
        described.append(" -> ".join(cycle) + "\n" + "\n".join(steps))
    assert not described, "import circles:\n" + "\n".join(described)


def test_the_checks_see_what_they_must(tmp_path: Path) -> None:
    """The checks themselves, on made-up modules: a lazy import, a relative one, a circle."""
    source = tmp_path / "shard.py"
    source.write_text(
        "from . import memory\n"
        "from ..wire import frames\n"
        "def pin():\n"
        "    from tally.cluster.cli import main\n"
    )
    found = list(_imports("tally.actors.shard", source))
    assert found == [
        (1, "tally.actors", ["memory"]),
        (2, "tally.wire", ["frames"]),
        (4, "tally.cluster.cli", ["main"]),
    ]
    known = {"tally.actors": source, "tally.actors.memory": source, "tally.wire": source}
    assert _targets("tally.actors", ["memory"], known) == {"tally.actors.memory"}
    assert _targets("tally.wire.frames", ["Frame"], known) == {"tally.wire"}
    assert _targets("tally.client", ["TallyClient"], known) == {"tally.client"}
    assert _layer("tally.client") == _layer("tally.wire.client") == 0
    assert _layer("tally.cluster.cli") == len(LAYERS) - 1
    edges = {
        "tally.wire.a": {"tally.checkpoint.b": (1, "tally.checkpoint.b")},
        "tally.checkpoint.b": {"tally.wire.a": (2, "tally.wire.a"), "tally.x": (3, "tally.x")},
        "tally.client.c": {"tally.wire.a": (1, "tally.wire.a")},
    }
    assert _cycles(edges) == [["tally.checkpoint.b", "tally.wire.a", "tally.checkpoint.b"]]
