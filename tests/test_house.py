"""House rules, checked: no import cycle among oppu modules, the store loads no torch, no module
over 400 lines, no function over 80, no private name imported across modules, every module opens
with a docstring."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "oppu"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> tuple[set[str], list[tuple[str, str]]]:
    """(oppu modules imported anywhere in the file, [(module, private name) imported from it])."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found, private = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            for a in node.names:
                found.add(f"{base}.{a.name}")
                if a.name.startswith("_") and base.startswith("oppu"):
                    private.append((base, a.name))
    return {m for m in found if m in mods and m != name}, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative enough for ~100 nodes)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_and_no_private_import():
    mods = _modules()
    graph, private = {}, []
    for name, path in mods.items():
        graph[name], priv = _imports(name, path, mods)
        private += [(name, m, n) for m, n in priv]
    assert len(graph) > 50  # the checker sees the package
    assert _cycles(graph) == []
    assert private == []


def test_cycle_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_files_and_functions_are_small_and_documented():
    long_files, long_fns, undocumented = [], [], []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > 400:
            long_files.append(f"{path.relative_to(ROOT)}:{text.count(chr(10))}")
        tree = ast.parse(text)
        if text.strip() and not ast.get_docstring(tree):
            undocumented.append(name)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_fns.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert long_files == [] and long_fns == [] and undocumented == []


def test_importing_the_store_loads_no_torch():
    r = subprocess.run([sys.executable, "-c", "import oppu.store, sys; assert 'torch' not in sys.modules"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
