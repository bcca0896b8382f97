"""ComfyUI node classes of the pack, collected into the classic registration mappings.

Each node module under this package exports ``NODES``: a list of node classes on ComfyUI's
typed node API (``comfy_api.latest.io.ComfyNode``: ``define_schema`` gives the node id,
display name, category, description, inputs and outputs; the classmethod ``execute``
computes).  A class may add ``REQUIRES``: the optional Python packages (import names)
the node needs.

The classes are registered through the classic ``NODE_CLASS_MAPPINGS``, which both
supported ComfyUI versions read for typed nodes too (and which ComfyUI prefers over a
``comfy_entrypoint`` when a pack has both): one registration path for every version.

A node whose optional package is missing is left out, with one log line per missing
package naming it and the nodes it disables; a node module that fails to import is
logged and skipped.  Neither ever makes the pack fail to import.  Importing this
package imports torch, ComfyUI's ``comfy_api`` and the node modules, and nothing else:
no network, no files written.  A ComfyUI without ``comfy_api.latest`` (older than the
supported range) gets one error line saying to update it.
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


def _has_typed_api() -> bool:
    try:
        importlib.import_module("comfy_api.latest")
    except ImportError:
        return False
    return True


def collect(modules: tuple[str, ...] = NODE_MODULES, available=_available) -> tuple[dict, dict]:
    """(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS) for the nodes whose packages are present."""
    if not _has_typed_api():
        log.error("comfyui-single-image-edit: this ComfyUI has no typed node API (comfy_api.latest); the pack's nodes "
                  "need ComfyUI 0.3.64 or newer: update ComfyUI")
        return {}, {}
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
            schema = cls.define_schema()
            lacking = [p for p in getattr(cls, "REQUIRES", ()) if not available(p)]
            if lacking:
                for p in lacking:
                    missing.setdefault(p, []).append(schema.node_id)
                continue
            classes[schema.node_id] = cls
            names[schema.node_id] = schema.display_name
    for package, node_ids in sorted(missing.items()):
        log.warning(
            "comfyui-single-image-edit: optional package '%s' is not installed (pip install %s); disabled nodes: %s",
            package, PIP_NAMES.get(package, package), ", ".join(node_ids),
        )
    return classes, names


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = collect()
