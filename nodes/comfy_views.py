"""The seam over ComfyUI's MODEL / CLIP / VAE, with views that coexist on one loaded MODEL.

:class:`ComfySD` is a :class:`core.seam.LatentDiffusion`.  Its views
(:meth:`ComfySD.views`) are built by :func:`install_views`: one clone of the MODEL whose
adapted layers get a *dispatching* weight wrapper (``ModelPatcher.add_weight_wrapper``)
or, for output-side functions (LoRA, per-sample modulation), a dispatching object
patch of the layer's ``forward``.  The dispatchers read which view is active from a
shared :class:`core.views.ViewSet`, so the clone is loaded once (one
``load_models_gpu`` call, no ``memory_required`` that would evict other models) and
switching between the base and its views inside one sampling step costs nothing but
the adapted layers' per-call work.  The same clone is what the GUIDER base
(:mod:`nodes.comfy_guider`) hands to ComfyUI's sampling.

Features (:class:`core.seam.Features`) travel in ``transformer_options["sie_features"]``;
:class:`InputMapPatch`, an ``input_block_patch``, adds ``input_map`` after input block 0
(the UNet's first convolution, before the skip is stored, as the diffusers back end
does after ``conv_in``).

:func:`install_call_rule` puts a per-call rule on such a clone for ComfyUI's own samplers: a
``model_function_wrapper`` hands every denoiser call (:class:`DenoiserCall`) to the rule, which
may evaluate the base and its view, each with per-call features (the rectifier: an unmodulated
pass, then a pass modulated by what that pass predicted).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from ..core.seam import Features, ViewSpec, WeightFunction, pack_cond, unpack_cond
from ..core.views import View, ViewSet, view_tuple

FEATURES_KEY = "sie_features"


class InputMapPatch:
    """``input_block_patch``: h + features.input_map(h, crop_box) after input block 0."""

    def __call__(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        f: Features | None = transformer_options.get(FEATURES_KEY)
        if f is None or f.input_map is None or transformer_options.get("block") != ("input", 0):
            return h
        return h + f.input_map(h, f.crop_box).to(h.dtype)

    def to(self, *args, **kwargs) -> "InputMapPatch":  # ComfyUI moves model patches with the model
        return self


class FixedInputMap:
    """``input_block_patch``: h + input_map(h, None) after input block 0, at every call (a feature the
    MODEL always carries, e.g. SINE's F(v) of the whole grid resized to h)."""

    def __init__(self, input_map):
        self.map = input_map

    def __call__(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        if transformer_options.get("block") != ("input", 0):
            return h
        return h + self.map(h, None).to(h.dtype)

    def to(self, *args, **kwargs) -> "FixedInputMap":  # ComfyUI moves model patches with the model
        return self


def with_features(model_options: dict, features: Features | None) -> dict:
    """A copy of ``model_options`` whose transformer options carry ``features`` and the input-map patch."""
    opts = dict(model_options)
    to = dict(opts.get("transformer_options", {}))
    if features is not None:
        to[FEATURES_KEY] = features
        if features.input_map is not None:
            patches = {k: list(v) for k, v in to.get("patches", {}).items()}
            if not any(isinstance(p, InputMapPatch) for p in patches.get("input_block_patch", [])):
                patches.setdefault("input_block_patch", []).append(InputMapPatch())
            to["patches"] = patches
    opts["transformer_options"] = to
    return opts


class _WeightDispatch:
    """Weight wrapper: the active view's weight functions (and this call's modulation) on W.

    ``detach``: compute with a detached per-call copy (training: ComfyUI loads weights
    inside inference mode and with requires_grad set; a wrapped layer then computes with
    an ordinary tensor that autograd may save and that collects no gradient)."""

    def __init__(self, viewset: ViewSet, name: str | None, detach: bool):
        self.viewset, self.name, self.detach = viewset, name, detach

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach() if self.detach else weight
        if self.name is None:
            return w
        for fn in self.viewset.functions(self.name):
            if not hasattr(fn, "output_delta"):
                w = fn(w)
        return w

    def move_to(self, device=None) -> int:
        """ComfyUI moves weight functions with the model; returns the bytes moved."""
        moved = 0
        if device is None:
            return 0
        for spec in self.viewset.specs:
            fn = spec.weight_functions.get(self.name) if self.name else None
            if isinstance(fn, torch.nn.Module):
                fn.to(device)
                moved += sum(p.numel() * p.element_size() for p in fn.parameters())
        return moved


class _OutputDispatch:
    """Object patch for a layer's ``forward``: y = forward(x) + sum of the active output deltas."""

    def __init__(self, layer: torch.nn.Module, viewset: ViewSet, name: str):
        self.forward, self.layer, self.viewset, self.name = layer.forward, layer, viewset, name

    def __call__(self, x, *args, **kwargs):
        y = self.forward(x, *args, **kwargs)
        for fn in self.viewset.functions(self.name):
            if hasattr(fn, "output_delta"):
                y = y + fn.output_delta(self.layer, x)
        return y


def install_views(model, specs: Sequence[ViewSpec], gradient_checkpointing: bool = False,
                  differentiable: bool = False) -> tuple[object, ViewSet]:
    """(a clone of ``model`` carrying the dispatchers, the view set); nothing is loaded yet."""
    dm = model.model.diffusion_model
    params = dict(dm.named_parameters())
    viewset = ViewSet(specs)
    names = set().union(*(s.names() for s in specs)) if specs else set()
    unknown = sorted(names - set(params))
    if unknown:
        raise KeyError(f"no such UNet parameters: {unknown[:3]}")
    modulated = set().union(*(s.modulates for s in specs)) if specs else set()
    clone = model.clone()
    modules = dict(dm.named_modules())
    for name in (params if differentiable else sorted(names)):
        path, leaf = name.rsplit(".", 1)
        owner = modules[path]
        if not hasattr(owner, "weight_function"):
            raise RuntimeError(f"cannot adapt {name}: its layer ({type(owner).__name__}) is not a ComfyUI op")
        fns = [s.weight_functions.get(name) for s in specs]
        if leaf == "weight" and (name in modulated or any(hasattr(f, "output_delta") for f in fns)):
            clone.add_object_patch(f"diffusion_model.{path}.forward", _OutputDispatch(owner, viewset, name))
        clone.add_weight_wrapper(f"diffusion_model.{name}", _WeightDispatch(viewset, name if name in names else None,
                                                                            differentiable))
    if gradient_checkpointing:
        for path, module in _blocks(dm):
            clone.add_object_patch(f"diffusion_model.{path}.forward", _checkpointed(module.forward))
    return clone, viewset


class DenoiserCall:
    """One call of ComfyUI's denoiser (a ``model_function_wrapper`` call) as a per-call rule sees it.

    ``x`` is ComfyUI's input in its sigma parameterisation, ``sigma`` [B] its noise levels,
    ``t`` [B] the matching discrete timesteps (``model_sampling.timestep``), ``cond_or_uncond``
    which conditioning each chunk of the batch belongs to (the batch is ``len(cond_or_uncond)``
    equal chunks).  :meth:`run` evaluates the denoiser, returning ComfyUI's denoised output (the
    x0 estimate in model space), with a view of the set active."""

    def __init__(self, wrapper: "CallRuleWrapper", apply_model, args: dict):
        self._wrapper, self._apply, self._args = wrapper, apply_model, args
        self.x: torch.Tensor = args["input"]
        self.sigma: torch.Tensor = args["timestep"]
        self.cond_or_uncond: list = list(args.get("cond_or_uncond") or [])
        self.t: torch.Tensor = wrapper.model_sampling.timestep(self.sigma)

    def run(self, view: int = 0, features: Features | None = None) -> torch.Tensor:
        """The denoised output with view ``view`` active (0: the MODEL as given) and per-call
        ``features``; a wrapper that was on the MODEL before runs inside, as the apply function."""
        with self._wrapper.viewset.activate(view, features):
            inner = self._wrapper.inner
            if inner is not None:
                return inner(self._apply, self._args)
            return self._apply(self._args["input"], self._args["timestep"], **self._args["c"])


class CallRuleWrapper:
    """``model_function_wrapper`` that hands every denoiser call to ``rule(call)`` (a
    :class:`DenoiserCall`), which returns the denoised output to use.  ``to`` and ``models``
    (what ComfyUI asks of a wrapper when it moves or loads the model) go to the rule and to the
    wrapper that was there before; a copy (ComfyUI deep-copies model options when it clones a
    MODEL) shares the rule and the view set, which the clone's layer dispatchers read."""

    def __init__(self, viewset: ViewSet, rule, model_sampling, inner=None):
        self.viewset, self.rule, self.model_sampling, self.inner = viewset, rule, model_sampling, inner

    def __call__(self, apply_model, args: dict) -> torch.Tensor:
        return self.rule(DenoiserCall(self, apply_model, args))

    def to(self, *args, **kwargs) -> "CallRuleWrapper":
        if hasattr(self.rule, "to"):
            self.rule.to(*args, **kwargs)
        if self.inner is not None and hasattr(self.inner, "to"):
            self.inner = self.inner.to(*args, **kwargs)
        return self

    def models(self) -> list:
        return list(self.inner.models()) if self.inner is not None and hasattr(self.inner, "models") else []

    def __deepcopy__(self, memo) -> "CallRuleWrapper":
        import copy

        return CallRuleWrapper(self.viewset, self.rule, self.model_sampling, copy.deepcopy(self.inner, memo))


def install_call_rule(model, spec: ViewSpec, rule) -> object:
    """A clone of ``model`` whose every denoiser call goes through ``rule`` (:class:`CallRuleWrapper`),
    with ``spec`` as view 1 (e.g. ``ViewSpec(modulates=names)`` for a per-call modulation).  Works with
    any ComfyUI sampler, denoise < 1 included; the input MODEL is left as it was.

    ValueError when a layer of ``spec`` already has a per-call dispatcher (a MODEL that went
    through this before): a second dispatcher would replace the first, whose rule would then
    silently lose its effect."""
    patches = getattr(model, "object_patches", {})
    taken = sorted(n for n in spec.names() if isinstance(
        patches.get(f"diffusion_model.{n.rsplit('.', 1)[0]}.forward"), _OutputDispatch))
    if taken:
        raise ValueError(f"this MODEL already carries per-call modulation on {len(taken)} of these layers "
                         f"(e.g. {taken[0]})")
    clone, viewset = install_views(model, [spec])
    inner = clone.model_options.get("model_function_wrapper")
    clone.set_model_unet_function_wrapper(CallRuleWrapper(viewset, rule, clone.get_model_object("model_sampling"),
                                                          inner))
    return clone


SDXL_ADM = 2816  # SDXL's added conditioning: the 1280-wide pooled vector and six 256-wide size embeddings
SDXL_POOLED = 1280


def context_dim(model) -> int:
    """The width of a MODEL's text conditioning (768 on SD 1.x, 2048 on SDXL; 0 when it has none)."""
    return int(model.model.model_config.unet_config.get("context_dim") or 0)


class ComfySD:
    """:class:`core.seam.LatentDiffusion` over a ComfyUI MODEL (ModelPatcher), CLIP and VAE.

    ``eps`` runs through ``BaseModel.apply_model`` with the patcher's
    ``transformer_options``, so weight patches, weight wrappers and model patches set on
    the MODEL apply.  The variance-preserving x_t of the seam is converted to ComfyUI's
    sigma parameterisation (x = x_t / sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) /
    alpha_bar)) and the denoised output back to epsilon.  ``encode`` crops images to a
    multiple of 8 as ComfyUI's VAE does.
    """

    def __init__(self, model, clip=None, vae=None, loaded: bool = False):
        import comfy.model_management

        self.model, self.clip, self.vae = model, clip, vae
        self._mm = comfy.model_management
        ms = model.get_model_object("model_sampling")
        sigmas = ms.sigmas.detach().to("cpu", torch.float64)
        self._alphas_cumprod = 1.0 / (sigmas**2 + 1.0)
        self._loaded = loaded
        self._decoder: torch.nn.Module | None = None  # decode_differentiable's private VAE copy

    def _load(self) -> None:
        if not self._loaded:
            self._mm.load_models_gpu([self.model])
            self._loaded = True

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    @property
    def device(self) -> torch.device:
        return self.model.load_device

    @property
    def context_dim(self) -> int:
        return context_dim(self.model)

    @property
    def pooled_dim(self) -> int:
        """1280 for an SDXL MODEL (its ``cond`` is packed, :func:`core.seam.pack_cond`), 0 for SD 1.x."""
        adm = self.model.model.model_config.unet_config.get("adm_in_channels")
        return SDXL_POOLED if adm == SDXL_ADM else 0

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
            features: Features | None = None) -> torch.Tensor:
        if features is not None and features.modulation:
            raise ValueError("a per-call modulation needs a view: use model.views(ViewSpec(modulates=...))")
        self._load()
        return self._forward(x_t, t, cond, features)

    def _forward(self, x_t, t, cond, features) -> torch.Tensor:
        a = self._alphas_cumprod.to(x_t.device)[t.long().to(x_t.device)]  # [B] float64
        sigma = ((1 - a) / a).sqrt().to(torch.float32)
        x = x_t / a.sqrt().to(x_t.dtype).view(-1, 1, 1, 1)
        opts = with_features(self.model.model_options, features)["transformer_options"]
        extra = {}
        if cond is not None and cond.shape[0] == 1 and x.shape[0] > 1:  # one conditioning for the whole batch
            cond = cond.expand(x.shape[0], -1, -1)
        if self.pooled_dim:
            cond, extra["y"] = self._added_conditioning(cond, x)
        den = self.model.model.apply_model(x, sigma, c_crossattn=cond, transformer_options=opts, **extra)
        return ((x - den) / sigma.view(-1, 1, 1, 1)).to(x_t.dtype)

    def _added_conditioning(self, cond: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: (context [B, N, D], y [B, 2816]) from a packed ``cond``; y is ComfyUI's own
        ``encode_adm`` of the pooled vector with the size conditioning its samplers give a CONDITIONING
        without sizes: the latent's pixel size, uncropped (what :class:`core.sd.backend.DiffusersSDXL`
        reads from the latent too)."""
        context, pooled = unpack_cond(cond, self.pooled_dim)
        h, w = x.shape[-2] * 8, x.shape[-1] * 8
        pooled = pooled.expand(x.shape[0], -1) if pooled.shape[0] == 1 else pooled
        y = self.model.model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0,
                                        target_width=w, target_height=h)
        return context, y.to(x.device, x.dtype)

    def trainable_module(self) -> torch.nn.Module:
        return self.model.model.diffusion_model

    def unet_parameters(self) -> dict[str, torch.Tensor]:
        return dict(self.model.model.diffusion_model.named_parameters())

    @contextmanager
    def views(self, *specs: ViewSpec, gradient_checkpointing: bool = False,
              differentiable: bool = False) -> Iterator[tuple[View, ...]]:
        """``(base, view_1, ...)`` on one clone of the MODEL, loaded once (see the module docstring).
        ``differentiable`` (training) loads it the way the training nodes always did: fully,
        asking ComfyUI to free every other model for activations and optimiser state.

        The clone is unloaded at the end of the block, so trainable tensors the wrappers hold
        are freed and the shared layers lose the dispatchers."""
        import comfy.model_management

        clone, viewset = install_views(self.model, specs, gradient_checkpointing, differentiable)
        if differentiable:  # training: free everything else for activations and optimiser state
            comfy.model_management.load_models_gpu([clone], memory_required=1e20, force_full_load=True)
        else:  # sampling-time views: load like any model, evicting nothing else
            comfy.model_management.load_models_gpu([clone])
        owner = ComfySD(clone, self.clip, self.vae, loaded=True)
        try:
            yield view_tuple(owner, viewset, owner._forward)
        finally:
            _unload(clone, self.model.model.diffusion_model)

    @contextmanager
    def adapted(self, weight_functions: Mapping[str, WeightFunction],
                gradient_checkpointing: bool = False) -> Iterator[View]:
        """One differentiable view, active for the whole block.  *Every* weight gets a
        wrapper that computes with a detached per-call copy (see :class:`_WeightDispatch`)."""
        with self.views(ViewSpec(dict(weight_functions)), gradient_checkpointing=gradient_checkpointing,
                        differentiable=True) as (_, v):
            with v.activated():
                yield v

    def text_parameters(self) -> dict[str, torch.Tensor]:
        if self.pooled_dim:
            raise ValueError("the pack trains SD 1.x's text encoder, not SDXL's two; leave the text encoder "
                             "untrained on SDXL (the UNet is fine-tuned alone)")
        return _text_parameters(self.clip)

    def text_adapted(self, weight_functions: Mapping[str, WeightFunction]):
        if self.clip is None:
            raise ValueError("this ComfySD has no CLIP")
        return text_adapted(self.clip, weight_functions)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ValueError("this ComfySD has no VAE")
        raw = self.vae.encode(image.movedim(1, -1)[..., :3])
        return self.model.model.process_latent_in(raw.to(self.device)).float()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ValueError("this ComfySD has no VAE")
        img = self.vae.decode(self.model.model.process_latent_out(latent))
        return img.reshape(-1, *img.shape[-3:]).movedim(-1, 1).float()

    def decode_differentiable(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE decode that autograd can differentiate through: model-space latent [B, 4, h, w] ->
        image [B, 3, 8h, 8w] in [0, 1], on the latent's device (the rectifier's CLIP loss on x0_hat).

        Same maths as :meth:`decode` (``process_latent_out``, the first-stage model's ``decode``,
        then the VAE's output mapping, clamp((x + 1) / 2) for image VAEs), but on a private copy
        of the first-stage model: ComfyUI creates the VAE's weights inside the prompt's inference
        mode, and autograd may not save inference tensors for backward.  The copy's tensors are
        ordinary ones (cloned outside inference mode), frozen, made on the first call and kept by
        this ComfySD (one copy per node run); the encoder is left out of it."""
        if self.vae is None:
            raise ValueError("this ComfySD has no VAE")
        decoder = self._decoder_copy()
        param = next(decoder.parameters())
        z = self.model.model.process_latent_out(latent)
        img = decoder.decode(z.to(param.device, param.dtype)).float()
        out = self.vae.process_output(img) if hasattr(self.vae, "process_output") else ((img + 1) / 2).clamp(0, 1)
        return out.to(latent.device)

    def _decoder_copy(self) -> torch.nn.Module:
        if self._decoder is None:
            import copy

            first = self.vae.first_stage_model
            if hasattr(self.vae, "patcher"):  # weights on the VAE's device, as ComfyUI's own decode has them
                self._mm.load_models_gpu([self.vae.patcher])
            encoder = getattr(first, "encoder", None)
            memo = {id(encoder): None} if isinstance(encoder, torch.nn.Module) else {}  # decode never uses it
            with torch.inference_mode(False):
                decoder = copy.deepcopy(first, memo)
                device = getattr(self.vae, "device", None) or next(first.parameters()).device
                self._decoder = decoder.to(device).eval().requires_grad_(False)
        return self._decoder

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        if self.clip is None:
            raise ValueError("this ComfySD has no CLIP")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not self.pooled_dim:
            conds = [self.clip.encode_from_tokens(self.clip.tokenize(p)) for p in prompts]
            return torch.cat(conds, 0).float()
        packed = []
        for p in prompts:  # SDXL: the context and the pooled vector, packed
            cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(p), return_pooled=True)
            packed.append(pack_cond(cond.float(), pooled.float().to(cond.device)))
        return torch.cat(packed, 0)


TEXT_KEY_PREFIX = "clip_l.transformer."  # an SD 1.x CLIP's state-dict prefix before the transformers names


def text_keys(clip) -> dict[str, str]:
    """{canonical text-encoder name (``text_model.``...): the CLIP state-dict key}."""
    return {k[len(TEXT_KEY_PREFIX):]: k for k, _ in clip.cond_stage_model.named_parameters()
            if k.startswith(TEXT_KEY_PREFIX + "text_model.")}


def _text_parameters(clip) -> dict[str, torch.Tensor]:
    if clip is None:
        raise ValueError("this ComfySD has no CLIP")
    own = dict(clip.cond_stage_model.named_parameters())
    keys = text_keys(clip)
    if not keys:
        raise ValueError("this CLIP is not an SD 1.x text encoder (no clip_l.transformer.text_model weights)")
    return {c: own[k] for c, k in keys.items()}


class _CopyInput:
    """Object patch for a LayerNorm's ``forward``: normalise a copy of the input.  ComfyUI's CLIP
    layers add to the residual stream in place (``x += attn(norm(x))``), which would overwrite
    the tensor the norm saved for backward; with a copy, autograd can differentiate the encoder."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, x, *args, **kwargs):
        return self.forward(x.clone(), *args, **kwargs)


class _PositionDelta:
    """Object patch for the token embedding's ``forward``: adds fn(P) - P for the position table P.
    ComfyUI's CLIP adds P by reading ``position_embedding.weight`` directly (no weight function), so
    a trained position embedding enters as this delta on the token embeddings of the 77 positions
    (in float32: a 1e-6 step survives an fp16 table)."""

    def __init__(self, token: torch.nn.Module, position: torch.nn.Module, viewset: ViewSet, name: str):
        self.forward, self.position, self.viewset, self.name = token.forward, position, viewset, name

    def __call__(self, tokens, *args, **kwargs):
        y = self.forward(tokens, *args, **kwargs)  # [B, n, D]
        fns = self.viewset.functions(self.name)
        if not fns:
            return y
        p = self.position.weight.detach().float()  # [77, D]
        w = p
        for fn in fns:
            w = fn(w)
        if y.shape[-2] != p.shape[0]:
            raise RuntimeError(f"a trained position embedding needs all {p.shape[0]} positions in one call; got "
                               f"{y.shape[-2]} (textual-inversion embeddings in the fine-tune prompt?)")
        return y + (w - p).to(y.device, y.dtype)


@contextmanager
def text_adapted(clip, weight_functions: Mapping[str, WeightFunction]) -> Iterator:
    """``encode(prompt)`` -> [1, 77, D], differentiable, through a clone of ``clip`` whose layers
    get dispatching weight wrappers (every weight computes with a per-call copy, as the UNet's
    training views do); unloaded afterwards, the shared weights untouched."""
    import comfy.model_management

    keys = text_keys(clip)
    unknown = sorted(set(weight_functions) - set(keys))
    if unknown:
        raise KeyError(f"no such text-encoder parameters: {unknown[:3]}")
    clone = clip.clone()
    viewset = ViewSet([ViewSpec(dict(weight_functions))])
    modules = dict(clip.cond_stage_model.named_modules())
    for canonical, key in keys.items():
        path, leaf = key.rsplit(".", 1)
        owner = modules[path]
        fn = weight_functions.get(canonical)
        if not hasattr(owner, "weight_function"):
            if fn is not None:
                raise RuntimeError(f"cannot adapt {canonical}: its layer ({type(owner).__name__}) is not a ComfyUI op")
            continue
        if leaf == "weight" and hasattr(fn, "output_delta"):
            clone.patcher.add_object_patch(f"{path}.forward", _OutputDispatch(owner, viewset, canonical))
        clone.patcher.add_weight_wrapper(key, _WeightDispatch(viewset, canonical if fn is not None else None, True))
    # every other ComfyUI op of the text encoder (e.g. the text projection) computes with a per-call copy too:
    # a float32 CLIP loaded inside the prompt's inference mode would otherwise hand autograd its inference
    # tensors as they are (a float16 CLIP is cast, which copies)
    wrapped = set(keys.values())
    for key, _ in clip.cond_stage_model.named_parameters():
        path, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        if key not in wrapped and leaf in ("weight", "bias") and hasattr(modules.get(path), "weight_function"):
            clone.patcher.add_weight_wrapper(key, _WeightDispatch(viewset, None, True))
    position = "text_model.embeddings.position_embedding.weight"
    if position in weight_functions:  # read directly by ComfyUI's CLIP: applied on the token embeddings
        token_path = TEXT_KEY_PREFIX + "text_model.embeddings.token_embedding"
        clone.patcher.add_object_patch(f"{token_path}.forward", _PositionDelta(
            modules[token_path], modules[keys[position].rsplit(".", 1)[0]], viewset, position))
    for path, module in modules.items():
        if isinstance(module, torch.nn.LayerNorm) and path.startswith(TEXT_KEY_PREFIX):
            clone.patcher.add_object_patch(f"{path}.forward", _CopyInput(module.forward))
    comfy.model_management.load_models_gpu([clone.patcher], force_full_load=True)
    try:
        with viewset.activate(1):

            def encode(prompt: str) -> torch.Tensor:
                return clone.encode_from_tokens(clone.tokenize(prompt)).float()

            yield encode
    finally:
        _unload(clone.patcher, clip.cond_stage_model)


class PatchFunction:
    """Weight function applying ComfyUI weight patches (``ModelPatcher.patches`` entries:
    LoRA, diff, ...) with ComfyUI's own ``comfy.lora.calculate_weight``: a view of a MODEL
    that a LoRA loader or a fine-tune node patched.

    It repeats what ``ModelPatcher.patch_weight_to_device`` does to the patched MODEL, so that
    the view predicts exactly what sampling that MODEL predicts: the patches are summed in
    ComfyUI's LoRA dtype (``lora_compute_dtype``: float16 on GPUs that prefer it since 0.8,
    float32 otherwise) and the sum is rounded to the dtype the weight is stored in
    (``stored_dtype``, e.g. bf16 with ``--bf16-unet``), then cast to the compute dtype the
    layer runs in.  Without the rounding a bf16-stored UNet's view kept the deltas the patched
    MODEL rounds away: on a random SDXL, SINE's eq. 3 against separate runs of the patched MODEL
    was off by 2.7 % (cfg 1) and 8 % (cfg 5) after one LoRA step.
    """

    def __init__(self, patches: list, key: str, stored_dtype: torch.dtype | None = None):
        self.patches, self.key, self.stored_dtype = patches, key, stored_dtype

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        import comfy.float
        import comfy.lora
        import comfy.model_management as mm
        from comfy.model_patcher import string_to_seed

        lora_dtype = getattr(mm, "lora_compute_dtype", lambda device: torch.float32)(weight.device)
        out = comfy.lora.calculate_weight(self.patches, weight.to(lora_dtype), self.key)
        if self.stored_dtype is not None:
            out = comfy.float.stochastic_rounding(out, self.stored_dtype, seed=string_to_seed(self.key))
        return out.to(weight.dtype)


def view_spec_from_patched(base, patched, features: Features | None = None) -> ViewSpec:
    """A :class:`ViewSpec` giving ``patched`` (a clone of ``base`` with extra weight patches,
    e.g. from Load LoRA or Fine-Tune) as a view of ``base``."""
    if not base.is_clone(patched):
        raise ValueError("the patched MODEL is not a clone of the base MODEL (a different checkpoint)")
    import comfy.utils

    fns = {}
    for key, plist in patched.patches.items():
        extra = plist[len(base.patches.get(key, [])):]
        if extra and key.startswith("diffusion_model."):
            stored = comfy.utils.get_attr(base.model, key).dtype
            fns[key[len("diffusion_model."):]] = PatchFunction(extra, key, stored)
    return ViewSpec(fns, features)


def _unload(clone, module: torch.nn.Module) -> None:
    """Unload a views clone now (not whenever ComfyUI next needs the memory), so that the
    tensors its wrappers hold are freed, and drop our wrappers from the shared layers
    (ComfyUI resets these lists on the next load anyway)."""
    import comfy.model_management as mm

    for i, loaded in enumerate(list(mm.current_loaded_models)):
        if loaded.model is clone:
            mm.current_loaded_models.pop(i).model_unload()
            break
    for m in module.modules():
        for attr in ("weight_function", "bias_function"):
            fns = getattr(m, attr, None)
            if fns and any(isinstance(f, _WeightDispatch) for f in fns):
                setattr(m, attr, [f for f in fns if not isinstance(f, _WeightDispatch)])


def _checkpointed(forward):
    import torch.utils.checkpoint

    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _blocks(module: torch.nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.nn.Module]]:
    """The outermost non-container sub-modules (ResBlocks, transformers, resamplers...)."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            yield from _blocks(child, path + ".")
        else:
            yield path, child
