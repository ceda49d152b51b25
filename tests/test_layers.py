"""The package's shape, checked on its source: layers import downwards only,
no module imports one that imports it back, and the server reaches the
runtime and the engines through their public interfaces only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent / "parrot"
#: Which top-level parts of ``parrot`` each part may import (lazily or not).
ALLOWED = {
    "semantic_vars": set(),
    "kernels": {"semantic_vars"},
    "backends": {"kernels", "semantic_vars"},
    "compression": {"backends", "semantic_vars"},
    "dataflow": {"backends", "compression", "semantic_vars"},
    "server": {"dataflow", "backends", "semantic_vars"},
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``parrot`` module ``path`` imports, at any depth (lazy imports too)."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("parrot.")}


def _graph() -> nx.DiGraph:
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = nx.DiGraph()
    for module, path in files.items():
        for target in _imports(path):
            # A package's own __init__ importing its submodules, or a module
            # importing its own package, is how packages work, not a loop.
            if target in files and target != module and not target.startswith(module + ".") \
                    and not module.startswith(target + "."):
                graph.add_edge(module, target)
    return graph


def test_layers_import_downwards_only():
    wrong = []
    for source, target in _graph().edges:
        src, dst = source.split(".")[1], target.split(".")[1]
        if src in ALLOWED and dst != src and dst in ALLOWED and dst not in ALLOWED[src]:
            wrong.append(f"{source} -> {target}")
    assert not wrong, wrong


def test_no_import_loops():
    assert list(nx.simple_cycles(_graph())) == []


def test_the_server_uses_only_the_public_runtime_and_engine_interfaces():
    internal = re.compile(r"runtime\.(graph|sessions|analyzer|prefixes|scheduler|compression|_\w+)\b")
    probing = re.compile(r"(getattr|hasattr)\((\w+\.)*(engine|engines\[\d+\]|tokenizer)\b")
    found = [f"{path.name}:{i}: {line.strip()}"
             for path in sorted((ROOT / "server").glob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if internal.search(line) or probing.search(line)]
    assert not found, found
