"""One GUIDER base for per-step rules: :func:`view_guider_class` builds ``ViewGuider``, a
``comfy.samplers.CFGGuider`` subclass (built on first use: ComfyUI is imported lazily).

A ViewGuider samples one MODEL clone that carries every view it needs
(:func:`nodes.comfy_views.install_views`), so ``SamplerCustomAdvanced`` loads the model
once per run.  At each model evaluation it hands :meth:`combine` a :class:`GuideStep`:

* ``index``: the step of the run, from ``sample_sigmas`` (:class:`core.guidance.StepClock`,
  restarted every run; a warning, once per run, when the sampler evaluates more than once
  per step).  Only rules by step index need one evaluation per step: a guider whose rule
  depends on t alone passes ``step_rule=False`` and takes any sampler silently;
* ``t``: the integer DDPM timestep the UNet sees (``model_sampling.timestep``);
* ``predict(view, conds)``: x0 predictions of one view for named conds (a batched
  ``calc_cond_batch`` call with the view active and its features in the options);
* ``cfg(cond_x0, uncond_x0, w)``: ComfyUI's own ``cfg_function``, so pre/post-CFG hooks
  and custom CFG functions still apply.

Which samplers evaluate once per step: euler, euler_ancestral, ddim (euler on the
ddim_uniform schedule), dpmpp_2m, lcm, uni_pc(_bh2).  Heun, dpm_2, dpmpp_sde, dpmpp_2s and
euler with churn evaluate between grid points: their extra evaluations are folded into
the step they belong to, and the guider warns.

    class Mix(ViewGuider):
        def combine(self, s):
            base, = s.predict(0, ["positive"]); tuned, = s.predict(1, ["positive"])
            return 0.5 * base + 0.5 * tuned
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.guidance import MultiEvaluationError, StepClock, step_index
from ..core.seam import ViewSpec
from .comfy_views import install_views, with_features

_CLASS = None
# sampler functions that evaluate the model more than once per step (k-diffusion names in ComfyUI)
MULTI_EVALUATION = {"sample_heun", "sample_heunpp2", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_sde",
                    "sample_dpmpp_sde_gpu", "sample_dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral_cfg_pp",
                    "sample_seeds_2", "sample_seeds_3", "sample_sa_solver_pece", "dpm_fast_function",
                    "dpm_adaptive_function"}


def sampler_problem(sampler) -> str | None:
    """The name of a sampler function that evaluates more than once per step, else None."""
    fn = getattr(sampler, "sampler_function", None)
    fn = getattr(fn, "func", fn)  # functools.partial
    name = getattr(fn, "__name__", "")
    return name if name in MULTI_EVALUATION else None


def multi_evaluation_error(what: str, detail: str):
    from .common import NodeInputError

    return NodeInputError("sampler", f"{what} needs one model evaluation per step; {detail}",
                          "pick euler, euler_ancestral, ddim, dpmpp_2m or lcm in KSamplerSelect")


@dataclass
class GuideStep:
    """What a per-step rule sees at one model evaluation (x0 predictions, not eps)."""

    guider: object
    x: torch.Tensor
    timestep: torch.Tensor  # sigma [B]
    model_options: dict
    index: int
    t: int
    seed: int | None

    def predict(self, view: int, conds: Sequence[str]) -> list[torch.Tensor]:
        """x0 of view ``view`` (0 = the base MODEL) at the named conds, in one batched call."""
        import comfy.samplers

        g = self.guider
        vs = g.viewset
        features = vs.specs[view].features
        opts = with_features(self.model_options, features)
        with vs.activate(view, features):
            return comfy.samplers.calc_cond_batch(g.inner_model, [g.conds.get(c) for c in conds], self.x,
                                                  self.timestep, opts)

    def cfg(self, cond_x0: torch.Tensor, uncond_x0: torch.Tensor, w: float,
            cond: str = "positive", uncond: str = "negative") -> torch.Tensor:
        import comfy.samplers

        g = self.guider
        return comfy.samplers.cfg_function(g.inner_model, cond_x0, uncond_x0, w, self.x, self.timestep,
                                           model_options=self.model_options, cond=g.conds.get(cond),
                                           uncond=g.conds.get(uncond))


def view_guider_class():
    """The ``ViewGuider`` class (a ``comfy.samplers.CFGGuider``), created once."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    import comfy.samplers

    class ViewGuider(comfy.samplers.CFGGuider):
        """CFGGuider over a MODEL clone carrying ``specs`` as coexisting views (view 0 = the base).

        Subclasses implement :meth:`combine`; conds are set with ``inner_set_conds`` under
        any names (``positive``, ``negative``, ``positive_alt``...)."""

        def __init__(self, model_patcher, specs: Sequence[ViewSpec] = (), what: str = "this guider",
                     strict_steps: bool = False, step_rule: bool = True):
            """``step_rule``: the rule uses the step index (one evaluation per step wanted: a warning,
            or with ``strict_steps`` a refusal, for samplers that evaluate more often); False: the
            rule depends on t alone, every sampler is fine and ``index`` is informative only."""
            clone, self.viewset = install_views(model_patcher, list(specs))
            super().__init__(clone)
            self.what, self.strict_steps, self.step_rule = what, strict_steps and step_rule, step_rule
            self.clock = StepClock(what, strict=self.strict_steps)

        def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
            bad = sampler_problem(sampler) if self.strict_steps else None
            if bad:
                raise multi_evaluation_error(self.what, f"{bad[len('sample_'):] if bad.startswith('sample_') else bad}"
                                                        " evaluates more than once")
            self.clock.restart()
            return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
            to = model_options.get("transformer_options", {})
            sigmas = to.get("sample_sigmas")
            try:
                if sigmas is None:
                    index = 0
                elif self.step_rule:
                    index = self.clock(sigmas, timestep[0])
                else:
                    index = step_index(sigmas, timestep[0])
            except MultiEvaluationError:
                raise multi_evaluation_error(self.what, "this sampler evaluated twice within one step") from None
            t = int(self.inner_model.model_sampling.timestep(timestep[:1])[0].round())
            return self.combine(GuideStep(self, x, timestep, model_options, index, t, seed))

        def combine(self, step: GuideStep) -> torch.Tensor:
            """Default: plain CFG on the base model (view 0)."""
            c, u = step.predict(0, ["positive", "negative"])
            return step.cfg(c, u, self.cfg)

    _CLASS = ViewGuider
    return ViewGuider
