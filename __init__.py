"""comfyui-single-image-edit: single-image diffusion editing methods as ComfyUI nodes.

Imagic, SINE, SinDDM, LayerDiffusion (layered editing with SAM masks) and the
High-Fidelity rectifier.  This file is what ComfyUI imports from
``custom_nodes/<this folder>``; it only collects the node classes (classic
``NODE_CLASS_MAPPINGS`` API, which old and new ComfyUI versions both load).  Importing
it does no network access, no downloads, no pip and writes no files.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
