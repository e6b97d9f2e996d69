"""The code's shape, checked: the README's module table against the files, the import graph, sizes."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "diffuse_cli"


def _modules() -> dict[str, Path]:
    """'cli/app.py' -> path, for every module of the CLI and the engine."""
    return {p.relative_to(PKG).as_posix(): p for d in ("cli", "engine") for p in (PKG / d).rglob("*.py")}


def _readme_table() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Architecture") :]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return [m for row in rows for m in re.findall(r"`([\w/]+\.py)`", row)]


def test_readme_lists_every_module_once():
    listed = _readme_table()
    actual = set(_modules()) - {"engine/__init__.py", "cli/__init__.py"}
    assert sorted(m for m in listed if listed.count(m) > 1) == []
    assert sorted(set(listed) - actual) == [], "the README lists modules that do not exist"
    assert sorted(actual - set(listed)) == [], "modules missing from the README's architecture table"


def _imports(path: Path, name: str) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (top level or inside functions), as dotted names."""
    out = set()
    package = name.rsplit(".", 1)[0] if not path.name == "__init__.py" else name
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out.update(t for t in targets if t.startswith("diffuse_cli."))
    return out


def _graph() -> dict[str, set[str]]:
    names = {f"diffuse_cli.{k[:-3].replace('/', '.')}".removesuffix(".__init__"): p for k, p in _modules().items()}
    return {n: {t for t in _imports(p, n) if t in names and t != n} for n, p in names.items()}


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ importing its own modules is not a cycle worth reporting.
    edges = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(n, stack):
        state[n] = 1
        for t in edges[n]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[n] = 2

    for n in edges:
        if n not in state:
            visit(n, [n])
    assert cycles == []


def test_engine_never_imports_the_cli_typer_or_rich():
    for rel, path in _modules().items():
        if rel.startswith("engine/"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
            assert not {m.split(".")[0] for m in names} & {"typer", "rich"}, rel
            assert not re.search(r"(?<![\w.])print\(", path.read_text(encoding="utf-8")), f"{rel} prints"


def test_sizes():
    for rel, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if rel.startswith("cli/"):
            assert len(text.splitlines()) <= 300, f"{rel} has {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 100, f"{rel}:{node.lineno} {node.name} has {n} lines"


def test_help_does_not_import_torch():
    code = "import sys; from diffuse_cli.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
