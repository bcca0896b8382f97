"""LayerDiffusion nodes (Li, Huang, Ding, Li; SIGGRAPH Asia 2023 TC) — not the unrelated "LayerDiffuse".

The method's stages run through the pack's shared nodes, so Imagic, SINE and LayerDiffusion keep one
optimiser and one fine-tune node:

* stage 1 (eq. 2): *Optimize Text Embedding* (:mod:`nodes.training`) with ``conditioning_b`` (T_b) and
  ``mask`` (the input image's object mask) optimises e_a and e_b jointly under the mask
  (:class:`core.layerdiffusion.recipe.LayerRecipe`, routing in :mod:`core.layerdiffusion.routing`; by
  default one prediction with [e_a, e_b] under M, as eq. 2 is written; the ``separate_reference``
  reading also takes its ``reference_image`` and ``reference_mask``); its first output is e^_a;
* eq. 3: ComfyUI's own *ConditioningAverage* (to = e^_a, from = e^_b, strength = alpha) computes
  exactly alpha e^_a + (1 - alpha) e^_b (checked bit for bit in core.layerdiffusion.interpolate);
* stage 2 (eqs. 4-6): *Fine-Tune Model* with ``mask`` (the photo's object mask), ``reference_image``
  and ``reference_mask`` (M_r) at e_opt, and ``target_mask`` (the object mask of O_t) when the recipe
  takes M_t from the target as the paper does (the same recipe);
* stage 3 (eq. 8): ``SIE_IterativeGuidance``, a GUIDER alternating e^_a and e_opt by step index.

``SIE_LayerRecipe`` carries the choices the paper leaves open (which image each loss uses, how
[e_a, e_b] enters the UNet, where M_t comes from, the mask rule) and the loss weights.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..core.layerdiffusion import start_parity_for
from ..core.layerdiffusion.guidance import OBJECT, alternating_choice
from ..core.layerdiffusion.embedding import READINGS
from ..core.layerdiffusion.finetune import OBJECT_MASKS
from ..core.layerdiffusion.masks import REDUCTIONS, RULES
from ..core.layerdiffusion.recipe import LayerRecipe
from .common import CATEGORY_ROOT, NodeInputError
from .training import register_default_recipe

CATEGORY = f"{CATEGORY_ROOT}/layerdiffusion"
NOT_LAYERDIFFUSE = "(LayerDiffusion, Li et al. 2023: layered editing; not the LayerDiffuse transparency project.)"


class LayerRecipeNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_LayerRecipe", display_name="LayerDiffusion: Recipe", category=CATEGORY,
            description=("LayerDiffusion settings for the shared optimiser and fine-tune nodes. Paper: lambda_1 = 2 "
                         "(3 for small objects), lambda_2 = 1. Stage 1 by default is eq. 2 as written (one "
                         "prediction with [e_a, e_b] under the photo's object mask). The paper leaves open which "
                         "image each fine-tuning loss noises; object_mask 'target' takes M_t from the SD-generated "
                         "target O_t as the paper writes. The choices are documented in core/layerdiffusion and the "
                         "README. "
                         + NOT_LAYERDIFFUSE),
            inputs=[
                io.Float.Input("lambda_obj", default=2.0, min=0.0, max=100.0, step=0.1,
                               tooltip="lambda_1, weight of the object loss under M_t (paper: 2; 3 for small "
                                       "objects)."),
                io.Float.Input("lambda_bg", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="lambda_2, weight of the background loss under 1 - M_r (paper: 1)."),
                io.Combo.Input("object_source", options=["image", "reference"], default="image",
                               tooltip="The image the object loss noises (default: the input)."),
                io.Combo.Input("background_source", options=["reference", "image"], default="reference",
                               tooltip="The image the background loss noises (default: the reference)."),
                io.Combo.Input("reading", options=list(READINGS), default="concat",
                               tooltip="Stage 1, how [e_a, e_b] enters the UNet: concat (eq. 2 as written) = one "
                                       "prediction with both as 154 tokens under the photo's mask M; separate = "
                                       "e_a under M and e_b under 1 - M of the photo, each alone (e_b learns the "
                                       "old background); separate_reference = e_a under M of the photo, e_b under "
                                       "1 - reference_mask of the reference (connect both to Optimize Text "
                                       "Embedding); shared = both alone under M."),
                io.Combo.Input("reduction", options=list(REDUCTIONS), default="image",
                               tooltip="Masked loss normalisation: image = sum over the mask / all elements (the "
                                       "equations as written); mask = mean over the mask."),
                io.Combo.Input("mask_rule", options=list(RULES), default="area",
                               tooltip="Masks onto the 8x smaller latent grid: area (a cell is object when at "
                                       "least half its pixels are), nearest, or soft (fractions)."),
                io.Combo.Input("object_mask", options=list(OBJECT_MASKS), optional=True, default="image",
                               tooltip="Where the object loss's mask M_t comes from: image = the object mask of "
                                       "the image the object loss noises (Fine-Tune Model's mask; our choice: the "
                                       "mask sits on the subject it selects); target = the object mask of the "
                                       "SD-generated target O_t (Fine-Tune Model's target_mask; the paper's M_t)."),
            ],
            outputs=[
                io.Custom("SIE_RECIPE").Output(display_name="recipe",
                                               tooltip="Connect to the 'recipe' input of Optimize Text Embedding "
                                                       "and Fine-Tune Model."),
            ],
        )

    @classmethod
    def execute(cls, lambda_obj, lambda_bg, object_source, background_source, reading, reduction, mask_rule,
                object_mask="image"):
        if float(lambda_obj) == 0 and float(lambda_bg) == 0:
            raise NodeInputError("lambda_obj", "both loss weights are 0: nothing would be trained",
                                 "use the paper's lambda_obj 2, lambda_bg 1")
        for name, value, choices in (("reading", reading, READINGS), ("object_mask", object_mask, OBJECT_MASKS)):
            if value not in choices:
                raise NodeInputError(name, f"unknown choice {value!r}", f"use one of {', '.join(choices)}")
        return io.NodeOutput(LayerRecipe(float(lambda_obj), float(lambda_bg), object_source, background_source, reading,
                                             reduction, mask_rule, object_mask))


# the shared training nodes run LayerDiffusion's recipe, with its defaults, when none is connected but its
# inputs are (saved graphs without a recipe node)
register_default_recipe(LayerRecipe, {"embedding": ("conditioning_b", "mask"),
                                      "finetune": ("mask", "reference_image", "target_mask")})


# --------------------------------------------------------------------------------------
PARITIES = {"auto": None, "even": 0, "odd": 1}


def _iterative_guider_class():
    from .comfy_guider import view_guider_class

    class IterativeGuider(view_guider_class()):
        """Eq. 8: step i uses e^_a when (i - p) is even, e_opt otherwise; CFG against the negative in each."""

        def __init__(self, model, w: float, start_parity: int | None):
            super().__init__(model, (), what="LayerDiffusion: Iterative Guidance", strict_steps=True)
            self.set_cfg(w)
            self.start_parity = start_parity
            self.trace: list[int] = []  # which embedding each step used (0: e^_a, 1: e_opt)

        def combine(self, s):
            sigmas = s.model_options.get("transformer_options", {}).get("sample_sigmas")
            steps = len(sigmas) - 1 if sigmas is not None else 0
            k = alternating_choice(s.index, start_parity_for(steps, self.start_parity))
            self.trace.append(k)
            name = "object_positive" if k == OBJECT else "positive"
            c, u = s.predict(0, [name, "negative"])
            return s.cfg(c, u, self.cfg, cond=name)

    return IterativeGuider


class IterativeGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_IterativeGuidance", display_name="LayerDiffusion: Iterative Guidance", category=CATEGORY,
            description=("LayerDiffusion eq. 8: the denoising steps alternate between the object embedding e^_a and "
                         "the interpolated e_opt, with classifier-free guidance against the negative in each. "
                         "Alternation is by step index: SD's DDIM timesteps (981, 961, ..., 1) are all odd, so the "
                         "paper's literal t % 2 would never pick e^_a. auto: the paper's count (t = S - i even), "
                         "i.e. with 50 steps the first step uses e^_a and the last e_opt. Paper: 50 steps. "
                         + NOT_LAYERDIFFUSE),
            inputs=[
                io.Model.Input("model",
                               tooltip="The fine-tuned MODEL (Fine-Tune Model with the LayerDiffusion recipe)."),
                io.Conditioning.Input("object_positive",
                                      tooltip="e^_a: the optimised object embedding (Optimize Text Embedding's "
                                              "first output)."),
                io.Conditioning.Input("positive",
                                      tooltip="e_opt: the interpolated embedding (ConditioningAverage of e^_a and "
                                              "e^_b at alpha 0.7)."),
                io.Conditioning.Input("negative", tooltip="The unconditional / negative text (usually empty)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale inside each step (1: none)."),
                io.Combo.Input("start_parity", options=list(PARITIES), default="auto",
                               tooltip="Which step indices use e^_a: auto (the paper's count), even (0, 2, ...) "
                                       "or odd (1, 3, ...)."),
            ],
            outputs=[
                io.Guider.Output(display_name="guider",
                                 tooltip="A GUIDER for SamplerCustomAdvanced (samplers with one evaluation per "
                                         "step: euler, ddim, dpmpp_2m, ...)."),
            ],
        )

    @classmethod
    def execute(cls, model, object_positive, positive, negative, cfg, start_parity):
        if not hasattr(model, "clone"):
            raise NodeInputError("model", f"expected a MODEL, got {type(model).__name__}", "connect a MODEL")
        if start_parity not in PARITIES:
            raise NodeInputError("start_parity", f"unknown choice {start_parity!r}", "use auto, even or odd")
        if not float(cfg) >= 0:
            raise NodeInputError("cfg", f"cfg = {cfg} is negative", "use a guidance scale >= 0 (7.5)")
        for name, c in (("object_positive", object_positive), ("positive", positive), ("negative", negative)):
            if not isinstance(c, list) or not c:
                raise NodeInputError(name, "expected a CONDITIONING", "connect a CONDITIONING")
        guider = _iterative_guider_class()(model, float(cfg), PARITIES[start_parity])
        guider.inner_set_conds({"object_positive": object_positive, "positive": positive, "negative": negative})
        return io.NodeOutput(guider)


NODES = [LayerRecipeNode, IterativeGuidance]
