"""The dependency rules of core/ARCHITECTURE.md, read from the source (every import, at module level
or inside a function):

* core never imports ComfyUI or nodes (also in test_pack.py);
* a method package (core/imagic, core/sine, core/sinddm, core/layerdiffusion, core/rectifier)
  never imports another method's package: what two methods share lives in the engine
  (core/*.py, core/sd);
* no import cycle among core's modules at module level;
* a node module never imports another method's node module (NODE_EXCEPTIONS is empty and stays so);
* the shared training nodes (nodes/training.py) import no method: they only call the recipe;
* each paper's equations are defined in its own package, once (EQUATIONS), and the engine's
  guidance module keeps only what every method shares.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("imagic", "sine", "sinddm", "layerdiffusion", "rectifier")

# node module -> node modules of other methods it imports: none since the shared training nodes moved to
# nodes/training.py and call recipes (issue 20); the set may only stay empty
NODE_EXCEPTIONS: set[tuple[str, str]] = set()

# an equation's function -> the one module that defines it (no other module of the pack defines that name)
EQUATIONS = {
    "model_guidance": "core.sine.guidance",  # SINE eq. 3, single and multi-model
    "model_guidance_active": "core.sine.guidance",
    "alternating_choice": "core.layerdiffusion.guidance",  # LayerDiffusion eq. 8's step rule
    "rectified_call": "core.rectifier.rule",  # the rectifier's eqs. 1-2 per call
    "modulation": "core.rectifier.rule",
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


def test_the_shared_training_nodes_import_no_method():
    path = ROOT / "nodes" / "training.py"
    bad = sorted(n for n in imports(path) if method_of(n) or (n.startswith("nodes.") and n.split(".")[1] in
                 {"imagic", "sine", "sine_train", "sinddm", "sinddm_guidance", "layerdiffusion", "rectifier", "sam"}))
    assert not bad, f"nodes/training.py imports a method: {bad}"


def defined_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_each_equation_is_defined_once_in_its_papers_package():
    where: dict[str, list[str]] = {}
    for folder in ("core", "nodes"):
        for path in py_files(folder):
            for name in defined_functions(path) & set(EQUATIONS):
                where.setdefault(name, []).append(module_name(path))
    wrong = {name: found for name, found in where.items() if found != [EQUATIONS[name]]}
    assert not wrong, f"equations defined elsewhere or twice: {wrong}"
    assert set(where) == set(EQUATIONS), f"not found: {set(EQUATIONS) - set(where)}"


def layer_of(name: str) -> str | None:
    """The layer of core/ARCHITECTURE.md's picture a module belongs to (None: a package name alone)."""
    parts = name.split(".")
    if len(parts) == 1:
        return None
    if parts[0] == "core":
        if parts[1] in ("sd", "pixel"):
            return "backends"
        if parts[1] in METHODS:
            return "methods"
        return "client" if parts[1] == "client" else "engine"
    if parts[1] in ("comfy_bridge", "comfy_views", "comfy_guider", "common", "resume"):
        return "bridge"
    return "training" if parts[1] == "training" else "method_nodes"


def test_the_architecture_picture_is_every_import_between_layers():
    text = (ROOT / "core" / "ARCHITECTURE.md").read_text()
    block = text.split("```mermaid", 1)[1].split("```", 1)[0]
    drawn = set()
    for line in block.splitlines():
        if "-->" in line:
            a, b = (side.strip().split("[")[0].strip() for side in line.split("-->"))
            drawn.add((a, b))
    actual: dict[tuple[str, str], str] = {}
    for folder in ("core", "nodes"):
        for path in py_files(folder):
            if path.name == "__init__.py" and path.parent.name == "nodes":
                continue  # the registry imports every node module by name
            mine = layer_of(module_name(path))
            for name in imports(path):
                other = layer_of(name)
                if other and mine and other != mine:
                    actual.setdefault((mine, other), f"{module_name(path)} imports {name}")
    undrawn = {edge: why for edge, why in actual.items() if edge not in drawn}
    assert not undrawn, f"imports between layers the picture does not draw: {undrawn}"
    unused = drawn - set(actual)
    assert not unused, f"arrows in the picture with no import behind them: {sorted(unused)}"
