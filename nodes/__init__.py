"""ComfyUI node classes of the pack, collected into the classic registration mappings.

Each node module under this package exports ``NODES``: a list of classic (V1) node
classes that carry three extra class attributes,

* ``NODE_ID``      the registered id (``SIE_...``),
* ``DISPLAY_NAME`` the name shown in the node menu,
* ``REQUIRES``     the optional Python packages (import names) the node needs.

A node whose optional package is missing is left out, with one log line per missing
package naming it and the nodes it disables; a node module that fails to import is
logged and skipped.  Neither ever makes the pack fail to import.  Importing this
package imports torch and the node modules, and nothing else: no ComfyUI module, no
network, no files written.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

log = logging.getLogger("comfyui-single-image-edit")

NODE_MODULES = ("sinddm", "sinddm_guidance", "training", "imagic", "sine", "sine_train", "sam", "layerdiffusion", "rectifier")

# import name -> what to pip install
PIP_NAMES = {"open_clip": "open_clip_torch", "segment_anything": "segment-anything", "diffusers": "diffusers"}


def _available(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def collect(modules: tuple[str, ...] = NODE_MODULES, available=_available) -> tuple[dict, dict]:
    """(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS) for the nodes whose packages are present."""
    classes: dict[str, type] = {}
    names: dict[str, str] = {}
    missing: dict[str, list[str]] = {}
    for mod_name in modules:
        try:
            mod = importlib.import_module(f"{__name__}.{mod_name}")
        except Exception as e:  # a broken module must not take the others down
            log.error("comfyui-single-image-edit: could not import nodes/%s.py (%s: %s); its nodes are disabled",
                      mod_name, type(e).__name__, e)
            continue
        for cls in mod.NODES:
            lacking = [p for p in getattr(cls, "REQUIRES", ()) if not available(p)]
            if lacking:
                for p in lacking:
                    missing.setdefault(p, []).append(cls.NODE_ID)
                continue
            classes[cls.NODE_ID] = cls
            names[cls.NODE_ID] = cls.DISPLAY_NAME
    for package, node_ids in sorted(missing.items()):
        log.warning(
            "comfyui-single-image-edit: optional package '%s' is not installed (pip install %s); disabled nodes: %s",
            package, PIP_NAMES.get(package, package), ", ".join(node_ids),
        )
    return classes, names


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = collect()
