"""The dependency rules of core/ARCHITECTURE.md, read from the source (every import, at module level
or inside a function):

* core never imports ComfyUI or nodes (also in test_pack.py);
* a method package (core/imagic, core/sine, core/sinddm, core/layerdiffusion, core/rectifier)
  never imports another method's package: what two methods share lives in the engine
  (core/*.py, core/sd);
* no import cycle among core's modules at module level;
* a node module never imports another method's node module, except the pairs listed in
  NODE_EXCEPTIONS, which the recipe restructuring (issue 20, item 1) removes; the list may
  only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("imagic", "sine", "sinddm", "layerdiffusion", "rectifier")

# node module -> node modules of other methods it still imports (the shared training nodes live in
# nodes/imagic.py and call into SINE's and LayerDiffusion's node helpers; the rectifier borrows cond_tensor)
NODE_EXCEPTIONS = {
    ("imagic", "layerdiffusion"), ("imagic", "sine_train"), ("sine_train", "imagic"), ("rectifier", "imagic"),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute names of the pack's modules that ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # "from . import x" names a module
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {n for n in out if n.split(".")[0] in ("core", "nodes")}


def method_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "core" and parts[1] in METHODS else None


def py_files(folder: str):
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_methods_never_import_each_other():
    bad = []
    for path in py_files("core"):
        mine = method_of(module_name(path))
        for name in imports(path):
            other = method_of(name)
            if other and mine != other:
                bad.append(f"{module_name(path)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_engine_imports_no_method():
    bad = [f"{module_name(p)} imports {n}" for p in py_files("core") if method_of(module_name(p)) is None
           for n in imports(p) if method_of(n)]
    assert not bad, "\n".join(bad)


def test_core_has_no_import_cycle():
    mods = {module_name(p): p for p in py_files("core")}
    graph = {m: {n for n in imports(p, top_level_only=True) if n in mods and n != m} for m, p in mods.items()}
    # a package's __init__ importing its own modules is the usual layout, not a cycle
    graph = {m: {n for n in deps if not (m != "core" and n.startswith(m + "."))} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle.extend(stack[stack.index(n):] + [m, n] if n in stack else [m, n])
                return True
            if n not in state and visit(n, stack + [m]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if m not in state and visit(m, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_node_modules_do_not_borrow_other_methods_node_modules():
    method_nodes = {"imagic", "sine", "sine_train", "sinddm", "sinddm_guidance", "layerdiffusion", "rectifier", "sam"}
    family = {"sine_train": "sine", "sinddm_guidance": "sinddm", "sam": "layerdiffusion"}
    found = set()
    for path in py_files("nodes"):
        mine = path.stem
        if mine not in method_nodes:
            continue
        for name in imports(path):
            parts = name.split(".")
            if parts[0] == "nodes" and len(parts) > 1 and parts[1] in method_nodes:
                other = parts[1]
                if family.get(other, other) != family.get(mine, mine):
                    found.add((mine, other))
    new = found - NODE_EXCEPTIONS
    assert not new, f"node modules importing another method's node module: {sorted(new)}"
    gone = NODE_EXCEPTIONS - found
    assert not gone, f"these exceptions are gone: remove them from NODE_EXCEPTIONS: {sorted(gone)}"


def test_the_checks_see_a_borrowing(tmp_path, monkeypatch):
    """The import reader resolves relative imports, so a method borrowing another's module is seen."""
    pkg = ROOT / "core" / "sine"
    fake = pkg / "_borrow_probe.py"
    try:
        fake.write_text("def f():\n    from ..sinddm.model import SinDDMNet\n")
        assert "core.sinddm.model" in imports(fake)
        assert method_of("core.sinddm.model") == "sinddm" and method_of(module_name(fake)) == "sine"
    finally:
        fake.unlink()
