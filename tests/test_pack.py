"""The pack as ComfyUI sees it: registration, optional dependencies, import side effects, layering."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import ROOT, load_pack

FORBIDDEN_IN_CORE = {"comfy", "comfy_extras", "comfy_execution", "comfy_api", "comfy_api_nodes", "folder_paths",
                     "server", "nodes", "execution", "latent_preview", "node_helpers"}


def test_layout_is_the_documented_one():
    for name in ("__init__.py", "nodes", "core", "workflows", "tests", "pyproject.toml", "README.md",
                 "requirements.txt", ".ci/run", "benchmarks", "LICENSE"):
        assert (ROOT / name).exists(), name


def test_pack_registers_prefixed_nodes():
    pack = load_pack()
    assert pack.NODE_CLASS_MAPPINGS, "no nodes registered"
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("SIE_") and cls.define_schema().node_id == node_id


def test_a_comfyui_without_the_typed_node_api_gets_one_line_saying_to_update():
    """A ComfyUI older than the typed node API (no comfy_api.latest): the pack imports, registers nothing and
    says once what to do, with no traceback."""
    script = textwrap.dedent(f"""
        import importlib.util, logging, sys
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        sys.modules["comfy_api"] = None  # as in a ComfyUI that has no such package
        spec = importlib.util.spec_from_file_location("sie_pack", {str(ROOT / '__init__.py')!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        m = importlib.util.module_from_spec(spec); sys.modules["sie_pack"] = m; spec.loader.exec_module(m)
        print("registered", len(m.NODE_CLASS_MAPPINGS))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "registered 0"
    ours = [line for line in out.stderr.splitlines() if "comfyui-single-image-edit" in line]
    assert len(ours) == 1 and ours[0].startswith("ERROR") and "ComfyUI 0.3.64 or newer" in ours[0], out.stderr
    assert "Traceback" not in out.stderr


def test_missing_optional_package_disables_only_its_nodes(caplog):
    pack = load_pack()
    collect = sys.modules[pack.__name__ + ".nodes"].collect
    with caplog.at_level(logging.WARNING, logger="comfyui-single-image-edit"):
        classes, names = collect(available=lambda p: p != "open_clip")
    needing = {k for k, c in pack.NODE_CLASS_MAPPINGS.items() if "open_clip" in getattr(c, "REQUIRES", ())}
    assert needing, "expected some nodes to need open_clip"
    assert set(classes) == set(pack.NODE_CLASS_MAPPINGS) - needing
    lines = [r.getMessage() for r in caplog.records if "open_clip" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "pip install open_clip_torch" in lines[0] and all(n in lines[0] for n in needing)


def test_broken_node_module_does_not_break_the_pack(caplog):
    pack = load_pack()
    collect = sys.modules[pack.__name__ + ".nodes"].collect
    with caplog.at_level(logging.ERROR, logger="comfyui-single-image-edit"):
        classes, _ = collect(modules=("sinddm", "no_such_module"))
    assert "SIE_SinDDMTrain" in classes
    assert any("no_such_module" in r.getMessage() for r in caplog.records)


def test_import_has_no_side_effects():
    """Importing the pack opens no socket, starts no process and writes no file.

    torch, torchvision, numpy and PIL are imported before the audit hook: ComfyUI has
    loaded them before any pack (torch's own import probes ldconfig and makes a cache
    folder; that is not the pack's doing).
    """
    script = textwrap.dedent(f"""
        import sys, importlib.util
        import torch, torchvision, numpy, PIL.Image  # already loaded in any ComfyUI process
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import helpers; helpers.use_comfy_api_standin()  # ComfyUI's typed node API, or the tests' stand-in
        import comfy_api.latest  # loaded by ComfyUI before any pack
        events = []
        def hook(event, args):
            if event == "open" and isinstance(args[0], (str, bytes)) and args[1] and any(c in str(args[1]) for c in "wax+"):
                events.append(("write", str(args[0])))
            elif event in ("socket.connect", "socket.bind", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn"):
                events.append((event, str(args[:2])))
            elif event in ("os.mkdir", "os.rename", "os.remove", "shutil.rmtree"):
                events.append((event, str(args[0])))
        sys.addaudithook(hook)
        spec = importlib.util.spec_from_file_location("sie_pack", {str(ROOT / '__init__.py')!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        m = importlib.util.module_from_spec(spec); sys.modules["sie_pack"] = m; spec.loader.exec_module(m)
        for cls in m.NODE_CLASS_MAPPINGS.values():
            cls.INPUT_TYPES()
        print(len(m.NODE_CLASS_MAPPINGS))
        print(repr(events))
    """)
    env = {"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    count, events = out.stdout.strip().splitlines()[-2:]
    assert int(count) > 0
    assert events == "[]", events


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level))
    return out


def test_core_never_imports_comfyui_or_nodes():
    offenders = []
    for path in sorted((ROOT / "core").rglob("*.py")):
        depth = len(path.relative_to(ROOT).parts) - 1  # package levels from the file up to "core"
        for name, level in _imports(path):
            top = name.split(".")[0]
            if level == 0 and top in FORBIDDEN_IN_CORE:
                offenders.append(f"{path.relative_to(ROOT)}: import {name}")
            if level > depth:
                offenders.append(f"{path.relative_to(ROOT)}: relative import leaves core (level {level})")
    assert not offenders, offenders


def test_core_isolation_check_catches_violations(tmp_path):
    """The check above must fail on the patterns it forbids (guards against a vacuous test)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import comfy.model_management\nfrom folder_paths import x\nfrom ..nodes import y\n")
    names = _imports(bad)
    assert ("comfy.model_management", 0) in names and ("folder_paths", 0) in names and ("nodes", 2) in names


BRIDGE = {"comfy_bridge.py", "comfy_views.py", "comfy_guider.py"}  # the bridge, split by concern
DECLARATION_API = {"comfy_api.latest"}  # the typed node API's io: how every node module declares its nodes


def test_nodes_only_touch_comfy_through_the_bridge():
    offenders = []
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        if path.name in BRIDGE:
            continue
        for name, level in _imports(path):
            if level == 0 and name.split(".")[0] in FORBIDDEN_IN_CORE and name not in DECLARATION_API:
                offenders.append(f"{path.name}: import {name}")
    assert not offenders, offenders


def test_requirements_have_lower_bounds_only_and_match_pyproject():
    import tomllib

    reqs = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [r for r in reqs if r]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert sorted(reqs) == sorted(project["project"]["dependencies"])
    for r in reqs:
        name = r.split(">")[0].split("=")[0].split("<")[0].strip().lower()
        assert name not in ("torch", "torchvision", "torchaudio")
        assert ">=" in r and "<" not in r and "==" not in r, r
    comfy = project["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert key in comfy
    json.dumps(comfy)


# Frontend modules that every supported frontend (1.27 ... 1.58) serves as public shims; 1.58 warns on
# the others ("internal module") and has dropped some (extensions/core/clipspace.js, uploadImage.js).
PUBLIC_FRONTEND_MODULES = {"../../scripts/app.js", "../../scripts/api.js"}


def test_web_directory_holds_only_extension_modules():
    """``WEB_DIRECTORY`` exists, and everything in it is a browser extension module (the frontend imports
    every ``.js`` file there), importing only the frontend's public modules."""
    import re

    pack = load_pack()
    web = (ROOT / pack.WEB_DIRECTORY).resolve()
    assert web.is_dir() and web.parent == ROOT, web
    files = sorted(p for p in web.rglob("*") if p.is_file())
    assert files, "WEB_DIRECTORY is empty"
    for path in files:
        assert path.suffix == ".js" and "test" not in path.name, f"not an extension module: {path}"
        source = path.read_text()
        imports = set(re.findall(r"""^\s*import\s[^'"]*['"]([^'"]+)['"]""", source, re.M))
        assert imports <= PUBLIC_FRONTEND_MODULES, f"{path.name} imports {sorted(imports - PUBLIC_FRONTEND_MODULES)}"
        assert "app.registerExtension(" in source, f"{path.name} registers no extension"
