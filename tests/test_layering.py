"""The package's shape: one installed namespace, layers that depend one way, no import cycles.

merge (tensors, recipes, checkpoints) <- fitness (lm-eval scoring, the zoo) <- search (the rest).
Imports inside functions count too: a cycle through a lazy import is still a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("merge", "fitness", "search")  # each may import only the layers before it


def _modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out["evomerge." + ".".join(parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {i for i in _imports(p) if i in modules} for m, p in modules.items()}


def test_code_imports_only_the_evomerge_namespace():
    """No module imports the repository folders as top-level packages (`merge`, `search`,
    `fitness`): an installed copy has only `evomerge`."""
    for module, path in _modules().items():
        bad = {i for i in _imports(path) if i.split(".")[0] in LAYERS}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_layers_depend_one_way():
    for module, imported in _graph().items():
        layer = LAYERS.index(module.split(".")[1])
        for target in imported:
            assert LAYERS.index(target.split(".")[1]) <= layer, f"{module} imports {target}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checks_would_fail(tmp_path, monkeypatch):
    """The checks above can fail: a planted cycle and a planted upward import are found."""
    import pytest

    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "merge" / "a.py").write_text("from evomerge.search.b import x\n")
    (tmp_path / "search" / "b.py").write_text("def f():\n    from evomerge.merge.a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="imports evomerge.search.b"):
        test_layers_depend_one_way()
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()


# Inside the layers, their folders in order: each may import its own layer's top-level modules
# (merge's: only those named), the folders before it, and itself.
SUB_LAYERS = {
    "merge": ("ops", "io"),
    "search": ("spaces", "run", "loop", "watch", "outputs", "cli"),
}
# what merge's folders may read at merge's top: the leaves, not the recipe or the engine
MERGE_BASE = {"errors", "lazy", "parallel", "architecture"}


def _folder(module: str) -> tuple[str, str | None, str]:
    """(layer, folder or None for the layer's top-level modules, module name)."""
    parts = module.split(".")[1:]
    layer = parts[0]
    if len(parts) > 2 and parts[1] in SUB_LAYERS.get(layer, ()):
        return layer, parts[1], parts[2]
    if len(parts) == 2 and parts[1] in SUB_LAYERS.get(layer, ()):
        return layer, parts[1], "__init__"
    return layer, None, parts[-1]


def test_folders_depend_in_their_order():
    """search/spaces < run < loop < watch < outputs < cli, and merge/ops and merge/io beside
    each other on merge's leaves only; the layers' top-level modules (the shared vocabulary)
    never import a folder, except merge's recipe and engine, which join ops and io."""
    for module, imported in _graph().items():
        layer, folder, _ = _folder(module)
        order = SUB_LAYERS.get(layer)
        if order is None:
            continue
        for target in imported:
            t_layer, t_folder, t_name = _folder(target)
            if t_layer != layer or t_folder == folder or target.count(".") == 1:
                continue  # `from evomerge.merge import x` counts as its module x
            where = f"{module} imports {target}"
            if folder is None:  # a top-level module
                assert layer == "merge", where  # search's shared modules import no folder
                continue
            if t_folder is None:
                assert layer == "search" or t_name in MERGE_BASE, where
                continue
            assert layer == "search", where  # merge's ops and io never import each other
            assert order.index(t_folder) < order.index(folder), where


def test_the_map_in_architecture_names_every_folder():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for layer, folders in SUB_LAYERS.items():
        on_disk = {p.name for p in (ROOT / layer).iterdir() if (p / "__init__.py").is_file()}
        assert on_disk - {"zoo"} == set(folders), layer
        for folder in folders:
            assert f"{layer}/{folder}/" in text, f"{layer}/{folder}/ missing from the map"
