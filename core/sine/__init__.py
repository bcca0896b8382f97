"""SINE (Zhang et al., CVPR 2023, "SINE: SINgle Image Editing with Text-to-Image Diffusion Models").

SINE fine-tunes Stable Diffusion on one image and edits it with *model-based classifier-free
guidance* (paper eq. 3: the fine-tuned model's prediction is mixed into the pretrained model's
CFG for the first K steps).  Its *patch-based fine-tuning* (paper §3.3) trains on random crops of
the image, each tagged with F(v), a 2-D sinusoidal positional map of the crop's area v that is
added to the UNet's first input block; sampling gives the map of the whole image, so the edit can
be made at any resolution and aspect ratio.

This package holds only the method's maths (nodes come later).  So far:

* :mod:`.positional`: F(v), the positional map (grid, crop to a box, :class:`PositionalMap` for
  :class:`core.seam.Features`);
* :mod:`.patches`: the patch sampler of patch-based fine-tuning (:class:`PatchSampler`);
* :mod:`.finetune`: fine-tuning on one image, whole or by patches with F(v) (:func:`finetune_sine`);
* :mod:`.edit`: DDIM with model-based guidance through two views (:func:`edit`);
* :mod:`.artifact`: the ``sie.sine`` file; ``python -m core.sine finetune|edit`` is the CLI.

Model-based guidance (eq. 3) itself lives in :func:`core.guidance.model_guidance`.
"""

from .artifact import load_sine, save_sine
from .edit import edit
from .finetune import SineFineTuneConfig, SineFineTuneResult, finetune_sine, first_block_channels
from .patches import PatchConfig, PatchSampler
from .positional import (
    GRID_SIZE,
    MODEL_CHANNELS,
    PositionalMap,
    crop_map,
    positional_grid,
    sinusoidal_table,
)

__all__ = ["GRID_SIZE", "MODEL_CHANNELS", "PatchConfig", "PatchSampler", "PositionalMap", "SineFineTuneConfig",
           "SineFineTuneResult", "crop_map", "edit", "finetune_sine", "first_block_channels", "load_sine",
           "positional_grid", "save_sine", "sinusoidal_table"]
