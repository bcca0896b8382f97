"""Helpers shared by the tests."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_comfy_api_standin() -> bool:
    """Put tests/standin on sys.path when no real ``comfy_api`` can be imported; True if it did."""
    import importlib.util

    if importlib.util.find_spec("comfy_api") is not None:
        return False
    sys.path.append(str(ROOT / "tests" / "standin"))
    return True


def load_pack(name: str = "sie_pack"):
    """Import the repository as a package the way ComfyUI loads a custom node folder."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    use_comfy_api_standin()
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
