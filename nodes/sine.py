"""SINE nodes (Zhang et al., CVPR 2023): the positional map F(v) on a MODEL, and model-based guidance (eq. 3).

* ``SIE_PositionalMap``: MODEL -> MODEL whose first input block gets F(v), the whole
  positional grid resized to the latent size (sampling at any resolution and aspect
  ratio).  A patch-trained MODEL must never be sampled without it.
* ``SIE_ModelGuidance``: a GUIDER for SamplerCustomAdvanced mixing the pretrained and the
  fine-tuned predictions by eq. 3 for t > K and plain CFG on the pretrained model for
  t <= K; the fine-tuned pass runs only where eq. 3 needs it, with F(v) only on it, and
  no fine-tuned unconditional pass.  Eq. 3 depends on t alone, so any sampler works (heun,
  dpmpp_sde... evaluate several times per step; each evaluation gets eq. 3 at its own t).
  Extra fine-tuned MODELs give the multi-model form (official ``DDIMMultiSampler``): a second
  one on the node (the node's K), and any number chained through ``SIE_SineAddModel``, each
  with its own weight b_i and its own K_i.

Both MODELs are views of one loaded model (``nodes.comfy_views``): one load per run.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass

from comfy_api.latest import io

from ..core.sine.guidance import model_guidance, model_guidance_active
from ..core.sine.positional import MODEL_CHANNELS, PositionalMap
from .common import CATEGORY_ROOT, NodeInputError, parse_numbers
from .comfy_views import FixedInputMap

CATEGORY = f"{CATEGORY_ROOT}/sine"
MODELS = "SIE_SINE_MODELS"  # a chain of fine-tuned models for multi-model guidance (tuple of GuideModel)


class SinePositionalPatch(FixedInputMap):
    """``input_block_patch`` adding F(v) (the whole grid resized to h) after input block 0."""

    def __init__(self, mode: str = "bilinear", channels: int = MODEL_CHANNELS):
        super().__init__(PositionalMap(channels=channels, mode=mode))
        self.mode, self.channels = mode, channels


def positional_patches(model) -> list[FixedInputMap]:
    """The F(v) patches a MODEL carries."""
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    return [p for p in patches.get("input_block_patch", [])
            if isinstance(p, FixedInputMap) and isinstance(p.map, PositionalMap)]


def model_channels(model) -> int:
    return int(model.model.model_config.unet_config.get("model_channels") or MODEL_CHANNELS)


class PositionalMapNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_PositionalMap", display_name="SINE: Positional Map F(v)", category=CATEGORY,
            description="SINE (Sec. 3.3): a model fine-tuned on patches learned where each patch sits through "
                        "the positional map F(v) added after the UNet's first block. Sample such a model only "
                        "with the map: the whole 128x128 grid is resized to the latent size, so any resolution "
                        "and aspect ratio works.",
            inputs=[
                io.Model.Input("model", tooltip="The patch-trained (fine-tuned) SD 1.x or SDXL MODEL."),
                io.Combo.Input("mode", options=["bilinear", "nearest"], default="bilinear",
                               tooltip="How the grid is resized to the latent size (the official code: bilinear, "
                                       "align_corners=True)."),
            ],
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="A clone of the MODEL whose first input block gets F(v) (the input MODEL "
                                        "is unchanged)."),
            ],
        )

    @classmethod
    def execute(cls, model, mode):
        if not hasattr(model, "clone") or not hasattr(model, "model_options"):
            raise NodeInputError("model", f"expected a MODEL, got {type(model).__name__}", "connect a MODEL")
        from .comfy_bridge import SUPPORTED_FAMILIES, sd_problem

        problem = sd_problem(model)
        if problem:
            raise NodeInputError("model", f"this is {problem}; F(v) is defined for the first block of a "
                                 f"{SUPPORTED_FAMILIES} UNet", "connect an SD 1.x or SDXL MODEL fine-tuned on patches")
        if mode not in ("bilinear", "nearest"):
            raise NodeInputError("mode", f"unknown mode {mode!r}", "use bilinear or nearest")
        if positional_patches(model):
            raise NodeInputError("model", "this MODEL already carries the positional map",
                                 "connect the MODEL before the first SINE: Positional Map node")
        out = model.clone()
        out.set_model_input_block_patch(SinePositionalPatch(mode, model_channels(model)))
        return io.NodeOutput(out)


def _model_guider_class():
    from .comfy_guider import view_guider_class

    class ModelGuider(view_guider_class()):
        """SINE eq. 3 on views: view 0 the pretrained MODEL, views 1.. the fine-tuned ones."""

        def __init__(self, model, finetuned: list, weights: list[float], w: float, Ks: list[int]):
            from .comfy_views import view_spec_from_patched

            specs = []
            for ft in finetuned:
                spec = view_spec_from_patched(model, ft)
                maps = positional_patches(ft)
                if maps:
                    from ..core.seam import Features, ViewSpec

                    spec = ViewSpec(spec.weight_functions, Features(input_map=maps[0].map))
                specs.append(spec)
            # eq. 3 depends on t alone: no step-index rule, every sampler is fine
            super().__init__(model, specs, what="SINE: Model-Based Guidance", step_rule=False)
            self.weights, self.Ks = list(weights), [int(k) for k in Ks]
            self.K = self.Ks[0]
            self.set_cfg(w)
            self.calls = {"finetuned": 0, "models": [0] * len(self.weights), "evaluations": 0}

        def combine(self, s):
            c, u = s.predict(0, ["positive", "negative"])
            self.calls["evaluations"] += 1
            fts = []
            for i, k in enumerate(self.Ks):  # each fine-tuned model only where its eq. 3 term is on (t > K_i)
                if model_guidance_active(s.t, k):
                    fts.append(s.predict(i + 1, [f"finetune_positive_{i}"])[0])
                    self.calls["models"][i] += 1
                else:
                    fts.append(None)
            if any(f is not None for f in fts):
                self.calls["finetuned"] += 1
                c = model_guidance(u, c, fts, self.weights, 1.0, s.t, self.Ks)
            return s.cfg(c, u, self.cfg)

    return ModelGuider


class ModelGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_ModelGuidance", display_name="SINE: Model-Based Guidance", category=CATEGORY,
            description="SINE eq. 3: for t > K, w (v e(z_t, c) + (1 - v) e^(z_t, c^)) + (1 - w) e(z_t); for t <= "
                        "K plain CFG on the pretrained model. e is the pretrained MODEL at the target text c, e^ "
                        "the fine-tuned MODEL at the fine-tune text c^ (with F(v) if it carries the positional "
                        "map). Paper: v = 0.7, K = 400. The fine-tuned model runs only for t > K and never "
                        "unconditionally. Both MODELs must come from the same checkpoint (the fine-tuned one a "
                        "patched clone, e.g. from Fine-Tune or Load LoRA). Several fine-tuned models (official "
                        "multi-model guidance, e.g. content + style): a second one here, and any number chained "
                        "through SINE: Add Fine-Tuned Model into more_models, each with its own weight b_i and "
                        "K_i: u + w((1 - sum b_i) c + sum b_i c^_i - u) over the models with t > K_i. The first "
                        "model gets 1 - v - the others' weights.",
            inputs=[
                io.Model.Input("model", tooltip="The pretrained SD 1.x or SDXL MODEL."),
                io.Model.Input("finetuned_model",
                               tooltip="The fine-tuned MODEL (a patched clone of the pretrained one); through "
                                       "SINE: Positional Map if it was trained on patches."),
                io.Conditioning.Input("positive", tooltip="The target text c, through the pretrained CLIP."),
                io.Conditioning.Input("finetune_positive",
                                      tooltip="The fine-tune text c^ (e.g. 'a photo of a sks dog'), through the "
                                              "fine-tuned CLIP when there is one."),
                io.Conditioning.Input("negative", tooltip="The unconditional / negative text (usually empty)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale w (official scripts: 7.5-10)."),
                io.Float.Input("v", default=0.7, min=0.0, max=1.0, step=0.01,
                               tooltip="Weight of the pretrained prediction for t > K (paper: 0.7); the "
                                       "fine-tuned models share 1 - v."),
                io.Int.Input("K", default=400, min=0, max=999,
                             tooltip="Model-based guidance for timesteps t > K (paper: 400; 0: every step but t = "
                                     "0, 999: never, i.e. plain CFG)."),
                io.Model.Input("finetuned_model_2", optional=True,
                               tooltip="A second fine-tuned MODEL (multi-model guidance, e.g. content and style)."),
                io.Conditioning.Input("finetune_positive_2", optional=True,
                                      tooltip="The second model's fine-tune text."),
                io.Float.Input("weight_2", optional=True, default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The second model's weight b_2 (taken out of 1 - v; the first fine-tuned "
                                       "model gets 1 - v - b_2). It uses the node's K."),
                io.Custom(MODELS).Input("more_models", optional=True,
                                        tooltip="Any number of further fine-tuned models, each with its own "
                                                "weight and K, from a chain of SINE: Add Fine-Tuned Model nodes "
                                                "(their weights are also taken out of 1 - v)."),
            ],
            outputs=[
                io.Guider.Output(display_name="guider",
                                 tooltip="A GUIDER for SamplerCustomAdvanced, with any sampler (eq. 3 depends "
                                         "only on t, so samplers that evaluate several times per step, heun or "
                                         "dpmpp_sde, are fine too)."),
            ],
        )

    @classmethod
    def execute(cls, model, finetuned_model, positive, finetune_positive, negative, cfg, v, K,
                finetuned_model_2=None, finetune_positive_2=None, weight_2=0.0, more_models=None):
        return io.NodeOutput(model_guider(model, finetuned_model, positive, finetune_positive, negative, cfg, v, K,
                                              finetuned_model_2, finetune_positive_2, weight_2, more_models))



@dataclass(frozen=True)
class GuideModel:
    """One fine-tuned model of multi-model guidance: MODEL, its c^, its weight b and its K."""

    model: object
    conditioning: object
    weight: float
    K: int


class AddFineTunedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SineAddModel", display_name="SINE: Add Fine-Tuned Model", category=CATEGORY,
            description="Adds one fine-tuned model to SINE's multi-model guidance (the official "
                        "DDIMMultiSampler, e.g. the paper's style transfer with a content and a style model): "
                        "its prediction at its own c^ enters eq. 3 with weight b for t > K, its own K (official "
                        "range_t_min per model). Chain as many as needed.",
            inputs=[
                io.Model.Input("finetuned_model",
                               tooltip="A fine-tuned MODEL (a patched clone of the pretrained one; through SINE: "
                                       "Positional Map if it was trained on patches)."),
                io.Conditioning.Input("finetune_positive",
                                      tooltip="Its fine-tune text c^ (through its fine-tuned CLIP when it has "
                                              "one)."),
                io.Float.Input("weight", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Its weight b in eq. 3 (official multi-model example: 0.4 and 0.5)."),
                io.Int.Input("K", default=400, min=0, max=999,
                             tooltip="It guides for timesteps t > K (official example: 400)."),
                io.Custom(MODELS).Input("models", optional=True,
                                        tooltip="The chain so far (from another Add Fine-Tuned Model)."),
            ],
            outputs=[
                io.Custom(MODELS).Output(display_name="models",
                                         tooltip="The chain so far plus this model: connect to more_models of "
                                                 "Model-Based Guidance (or of the next Add Fine-Tuned Model)."),
            ],
        )

    @classmethod
    def execute(cls, finetuned_model, finetune_positive, weight, K, models=None):
        if not hasattr(finetuned_model, "is_clone"):
            raise NodeInputError("finetuned_model", f"expected a MODEL, got {type(finetuned_model).__name__}",
                                 "connect a MODEL")
        if not isinstance(finetune_positive, list):
            raise NodeInputError("finetune_positive", "expected a CONDITIONING", "connect CLIP Text Encode")
        if not 0.0 <= float(weight) <= 1.0:
            raise NodeInputError("weight", f"weight = {weight} is outside [0, 1]", "use 0..1")
        if not 0 <= int(K) <= 999:
            raise NodeInputError("K", f"K = {K} is outside [0, 999] (SD's timesteps)", "use 0..999 (paper: 400)")
        if models is not None and not (isinstance(models, tuple) and all(isinstance(m, GuideModel) for m in models)):
            raise NodeInputError("models", "expected the output of SINE: Add Fine-Tuned Model",
                                 "connect another Add Fine-Tuned Model, or nothing")
        return io.NodeOutput((*(models or ()), GuideModel(finetuned_model, finetune_positive, float(weight), int(K))))


def check_finetuned(model, finetuned, name: str) -> None:
    if not hasattr(finetuned, "is_clone"):
        raise NodeInputError(name, f"expected a MODEL, got {type(finetuned).__name__}", "connect a MODEL")
    if model.is_clone(finetuned):
        return
    arch = [type(getattr(getattr(m, "model", None), "model_config", m)).__name__ for m in (model, finetuned)]
    what = f"a {arch[1]} model while the pretrained MODEL is {arch[0]}" if arch[0] != arch[1] else \
        "not a patched clone of the pretrained MODEL (another checkpoint file?)"
    raise NodeInputError(name, f"it is {what}", "fine-tune (or load the LoRA onto) the same MODEL that goes into "
                                                "'model'")


def check_guidance_values(v: float, K: int, cfg: float) -> None:
    if not 0.0 <= float(v) <= 1.0:
        raise NodeInputError("v", f"v = {v} is outside [0, 1]", "use a weight in [0, 1] (paper: 0.7)")
    if not 0 <= int(K) <= 999:
        raise NodeInputError("K", f"K = {K} is outside [0, 999] (SD's timesteps)", "use 0..999 (paper: 400)")
    if not float(cfg) >= 0.0:
        raise NodeInputError("cfg", f"cfg = {cfg} is negative", "use a guidance scale >= 0 (paper: 7.5)")


def model_guider(model, finetuned_model, positive, finetune_positive, negative, cfg, v, K,
                 finetuned_model_2=None, finetune_positive_2=None, weight_2=0.0, more_models=None):
    """The SINE GUIDER (eq. 3) after checking every input."""
    if not hasattr(model, "is_clone"):
        raise NodeInputError("model", f"expected a MODEL, got {type(model).__name__}", "connect a MODEL")
    check_finetuned(model, finetuned_model, "finetuned_model")
    check_guidance_values(v, K, cfg)
    finetuned, conds, weights, Ks = [finetuned_model], [finetune_positive], [1.0 - float(v)], [int(K)]
    if finetuned_model_2 is not None:
        if finetune_positive_2 is None:
            raise NodeInputError("finetune_positive_2", "a second fine-tuned MODEL needs its fine-tune text",
                                 "connect its CONDITIONING")
        check_finetuned(model, finetuned_model_2, "finetuned_model_2")
        if not 0.0 <= float(weight_2) <= 1.0:
            raise NodeInputError("weight_2", f"weight_2 = {weight_2} is outside [0, 1]", "use 0..1 - v")
        weights[0] -= float(weight_2)
        if weights[0] < -1e-9:
            raise NodeInputError("weight_2", f"v + weight_2 = {float(v) + float(weight_2):.2f} exceeds 1",
                                 "lower weight_2 or v: the fine-tuned models share 1 - v")
        weights[0] = max(weights[0], 0.0)
        finetuned.append(finetuned_model_2)
        conds.append(finetune_positive_2)
        weights.append(float(weight_2))
        Ks.append(int(K))
    if more_models is not None:
        if not (isinstance(more_models, tuple) and all(isinstance(m, GuideModel) for m in more_models)):
            raise NodeInputError("more_models", "expected the output of SINE: Add Fine-Tuned Model",
                                 "connect a chain of Add Fine-Tuned Model nodes, or nothing")
        for m in more_models:
            check_finetuned(model, m.model, "more_models")
            finetuned.append(m.model)
            conds.append(m.conditioning)
            weights.append(m.weight)
            Ks.append(m.K)
        weights[0] -= sum(m.weight for m in more_models)
        if weights[0] < -1e-9:
            raise NodeInputError("more_models", f"v + the other models' weights = {1.0 - weights[0]:.2f} exceeds 1",
                                 "lower the chained weights (or weight_2, or v): the fine-tuned models share 1 - v")
        weights[0] = max(weights[0], 0.0)
    guider = _model_guider_class()(model, finetuned, weights, float(cfg), Ks)
    named = {"positive": positive, "negative": negative}
    named.update({f"finetune_positive_{i}": c for i, c in enumerate(conds)})
    guider.inner_set_conds(named)
    return guider


class GuidanceSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_GuidanceSweep", display_name="SINE: Guidance Sweep (K x v)", category=CATEGORY,
            description="Samples SINE model-based guidance (eq. 3) once per pair of K and v from one noise, as "
                        "the paper's Figs. 7, 8 and 19-21, so the trade-off between fidelity to the image (low "
                        "v, low K) and to the edit text can be picked by eye. Uses ComfyUI's samplers (any of "
                        "them: eq. 3 depends only on t).",
            inputs=[
                io.Model.Input("model", tooltip="The pretrained SD 1.x or SDXL MODEL."),
                io.Model.Input("finetuned_model",
                               tooltip="The fine-tuned MODEL (through SINE: Positional Map if it was trained on "
                                       "patches)."),
                io.Conditioning.Input("positive", tooltip="The target text c (pretrained CLIP)."),
                io.Conditioning.Input("finetune_positive",
                                      tooltip="The fine-tune text c^ (fine-tuned CLIP if any)."),
                io.Conditioning.Input("negative", tooltip="The unconditional / negative text (usually empty)."),
                io.Latent.Input("latent_image",
                                tooltip="Size of the outputs (Empty Latent Image; any size); only the first "
                                        "latent of a batch is used."),
                io.String.Input("K_values", default="200, 400, 600",
                                tooltip="Comma-separated K (0..999): model-based guidance for t > K."),
                io.String.Input("v_values", default="0.5, 0.6, 0.7, 0.8",
                                tooltip="Comma-separated v (0..1): the pretrained weight for t > K."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="One seed (one noise) for every pair."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="Sampling steps (official: DDIM 100)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale w."),
                io.Combo.Input("sampler_name", options=_sampler_names(), default="ddim",
                               tooltip="ComfyUI sampler (any; the paper: DDIM)."),
                io.Combo.Input("scheduler", options=_scheduler_names(), default="ddim_uniform",
                               tooltip="ComfyUI scheduler."),
                io.Custom(MODELS).Input("more_models", optional=True,
                                        tooltip="Further fine-tuned models (SINE: Add Fine-Tuned Model chain) "
                                                "with their own weights and K, the same in every pair; the swept "
                                                "K and v are the first model's."),
            ],
            outputs=[
                io.Latent.Output(display_name="latents",
                                 tooltip="One latent per (K, v), K-major (row by row: the first K with every v, "
                                         "then the next K), all from the same noise; decode with VAE Decode."),
                io.String.Output(display_name="labels", tooltip="The (K, v) of each latent, in order."),
            ],
        )

    @classmethod
    def execute(cls, model, finetuned_model, positive, finetune_positive, negative, latent_image, K_values, v_values,
                seed, steps, cfg, sampler_name, scheduler, more_models=None):
        from . import comfy_bridge as bridge

        Ks = parse_numbers(K_values, "K_values", int, 0, 999, "200, 400, 600")
        vs = parse_numbers(v_values, "v_values", float, 0.0, 1.0, "0.5, 0.7, 0.9")
        if int(steps) < 1:
            raise NodeInputError("steps", f"steps = {steps}", "use at least 1 step")
        if not isinstance(latent_image, dict) or "samples" not in latent_image:
            raise NodeInputError("latent_image", "expected a LATENT", "connect Empty Latent Image")
        first = {"samples": latent_image["samples"][:1]}
        noise = bridge.prepare_noise(first["samples"], int(seed))
        pairs = [(k, v) for k in Ks for v in vs]
        total = len(pairs) * int(steps)
        progress = bridge.Progress(total)
        outs = []
        for n, (k, v) in enumerate(pairs):
            guider = model_guider(model, finetuned_model, positive, finetune_positive, negative, cfg, v, k,
                                  more_models=more_models)

            def callback(step, x0, x, count, n=n):
                progress(n * int(steps) + step + 1, total)

            outs.append(bridge.guider_sample(guider, first, int(seed), int(steps), sampler_name, scheduler, noise,
                                             callback))
        labels = "\n".join(f"{i}: K={k} v={v:g}" for i, (k, v) in enumerate(pairs))
        return io.NodeOutput({"samples": torch.cat(outs)}, labels)


def _sampler_names():
    from .comfy_bridge import sampler_names

    return sampler_names()


def _scheduler_names():
    from .comfy_bridge import scheduler_names

    return scheduler_names()


NODES = [PositionalMapNode, ModelGuidance, GuidanceSweep, AddFineTunedModel]
