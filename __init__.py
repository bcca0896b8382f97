"""comfyui-single-image-edit: single-image diffusion editing methods as ComfyUI nodes.

Imagic, SINE, SinDDM, LayerDiffusion (layered editing with SAM masks) and the
High-Fidelity rectifier.  This file is what ComfyUI imports from
``custom_nodes/<this folder>``; it only collects the node classes (classic
``NODE_CLASS_MAPPINGS`` API, which old and new ComfyUI versions both load).  Importing
it does no network access, no downloads, no pip and writes no files.

``WEB_DIRECTORY`` names the frontend extension ComfyUI serves at
``/extensions/<this folder>/``: ``web/picker.js``, the click-on-the-image widgets of
Segment (SAM points / box) and SinDDM Guide: Region.  Every ``.js`` file in it is
loaded by the browser, so nothing else belongs there.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
