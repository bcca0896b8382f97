"""Imagic (Kawar et al., CVPR 2023) on Stable Diffusion 1.x: every equation of the paper in this package.

* :mod:`.embedding`: stage 1, text-embedding optimisation (eq. 2 over e);
* :mod:`.finetune`: stage 2, fine-tuning at e_opt (eq. 2 over theta; LoRA or full);
* :mod:`.interpolate`: stage 3, eq. 3 (eta may exceed 1);
* :mod:`.pipeline`: the three stages end to end; ``python -m core.imagic`` is its CLI.
"""

from ..lora import LoRAConfig
from .embedding import EmbeddingConfig, EmbeddingResult, optimize_embedding
from .finetune import DEFAULT_LR, FineTuneConfig, FineTuneResult, finetune
from .interpolate import interpolate
from ..images import load_image
from .pipeline import ImagicEdit, edit, save_edit

__all__ = ["DEFAULT_LR", "EmbeddingConfig", "EmbeddingResult", "FineTuneConfig", "FineTuneResult", "ImagicEdit",
           "LoRAConfig", "edit", "finetune", "interpolate", "load_image", "optimize_embedding", "save_edit"]
