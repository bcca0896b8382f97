"""LayerDiffusion (Li, Huang, Ding, Li; SIGGRAPH Asia 2023 Technical Communications; arXiv 2305.18676).

Layered controlled image editing on Stable Diffusion 1.x: the input image's subject, described by an
object text T_a, is put into a new background (a reference image, described by T_b) and edited
(pose, action, attributes).  Not lllyasviel's unrelated "LayerDiffuse" transparency project.  No
official code exists: every choice the paper leaves open is made and justified in the module that
owns it, with the alternative selectable where that is cheap.

* :mod:`.masks`: pixel masks onto the latent grid (:func:`latent_mask`, one rule: area vote) and the
  masked eps-MSE of eqs. 2, 4, 5 (:func:`masked_eps_mse`);
* :mod:`.embedding`: stage 1, eq. 2, layered optimisation of e_a and e_b (:func:`optimize_layers`;
  by default one prediction f(x_t, t, [e_a, e_b]) under the one mask M, as eq. 2 is written);
* :mod:`.interpolate`: eq. 3, e_opt = alpha e^_a + (1 - alpha) e^_b (:func:`interpolate_layers`);
* :mod:`.finetune`: stage 2, eqs. 4-6, layered fine-tuning at e_opt (:func:`finetune_layered`);
* :mod:`.guidance`: stage 3, eq. 8, iterative guidance by step index (:func:`iterative_sample`);
* :mod:`.pipeline`, :mod:`.artifact`: the stages end to end and the ``sie.layerdiffusion`` file;
  ``python -m core.layerdiffusion`` is the CLI.
"""

from .artifact import LayerDiffusionFile, load_layerdiffusion, save_layerdiffusion
from .embedding import NEEDS_REFERENCE, READINGS, LayerEmbeddingConfig, LayerEmbeddings, layer_terms, optimize_layers
from .finetune import (
    DEFAULT_LR,
    OBJECT_MASKS,
    SOURCES,
    LayeredFineTuneConfig,
    LayeredFineTuneResult,
    finetune_layered,
    layered_terms,
)
from .guidance import OBJECT, OPT, GuidanceConfig, iterative_rule, iterative_sample, schedule, start_parity_for
from .interpolate import ALPHA, interpolate_layers
from .masks import REDUCTIONS, RULES, SharedDraw, background_mask, latent_mask, masked_eps_mse
from .pipeline import LayerDiffusionEdit, edit, load_image, load_mask, prepare_masks

__all__ = ["ALPHA", "DEFAULT_LR", "GuidanceConfig", "LayerDiffusionEdit", "LayerDiffusionFile",
           "LayerEmbeddingConfig", "LayerEmbeddings", "LayeredFineTuneConfig", "LayeredFineTuneResult",
           "NEEDS_REFERENCE", "OBJECT", "OBJECT_MASKS", "OPT", "READINGS", "REDUCTIONS", "RULES", "SOURCES",
           "SharedDraw", "background_mask", "edit", "finetune_layered", "interpolate_layers", "iterative_rule",
           "iterative_sample", "latent_mask", "layer_terms", "layered_terms", "load_image", "load_layerdiffusion",
           "load_mask", "masked_eps_mse", "optimize_layers", "prepare_masks", "save_layerdiffusion", "schedule",
           "start_parity_for"]
