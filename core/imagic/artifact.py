"""Imagic's fine-tuning result and file: the engine's :mod:`core.trained` (``sie.trained``), which
LayerDiffusion's stage 2 writes too."""

from ..trained import EMBEDDING_KEY, FORMAT, PRECISIONS, VERSION, Trained, load_trained, save_trained

__all__ = ["EMBEDDING_KEY", "FORMAT", "PRECISIONS", "VERSION", "Trained", "load_trained", "save_trained"]
