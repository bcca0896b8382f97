"""Views that coexist on one torch module: the diffusers back ends' side of :class:`core.seam.ViewSpec`.

A *view set* installs, for every weight any of its views adapts, one dispatching
``torch.nn.utils.parametrize`` parametrization (or, for functions with
``output_delta``, one forward hook on the layer).  The dispatchers ask the view set
which view is active: the base (nothing active) computes with the stored weights, a
view with its own functions, plus the per-call :attr:`Features.modulation`.  Switching
views is therefore setting an index: no weight copy, no reload.  Parametrizations are
recomputed whenever the weight is read, so gradient checkpointing sees the same view
during backward as long as backward runs inside :meth:`View.activated`.

Uninstalling restores the module exactly (``leave_parametrized=False``): the stored
weights are never written.

    with model.views(ViewSpec(loras)) as (base, tuned):
        e0 = base.eps(x, t, c)           # pretrained
        e1 = tuned.eps(x, t, c)          # adapted, same step, same module
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from .seam import NO_FEATURES, Features, ViewSpec, WeightFunction


class ViewSet:
    """The shared state of one ``views()`` block: the specs and which one is active."""

    def __init__(self, specs: Sequence[ViewSpec]):
        self.specs = [ViewSpec()] + list(specs)  # index 0: the base
        self.active = 0
        self.call: Features = NO_FEATURES

    @contextmanager
    def activate(self, index: int, features: Features | None = None) -> Iterator[None]:
        prev = self.active, self.call
        self.active, self.call = index, features or NO_FEATURES
        try:
            yield
        finally:
            self.active, self.call = prev

    def functions(self, name: str) -> list[WeightFunction]:
        """The weight functions that apply to ``name`` right now (view's, then per-call)."""
        out = []
        fn = self.specs[self.active].weight_functions.get(name)
        if fn is not None:
            out.append(fn)
        if self.call.modulation and name in self.call.modulation:
            if name not in self.specs[self.active].modulates:
                raise KeyError(f"per-call modulation of {name}: list it in ViewSpec.modulates")
            out.append(self.call.modulation[name])
        return out


class View:
    """A :class:`core.seam.Denoiser` (and LatentDiffusion, when the owner is one) that
    computes with its view set's weights during its own calls."""

    def __init__(self, owner, viewset: ViewSet, index: int, forward: Callable):
        self.owner, self.viewset, self.index, self._forward = owner, viewset, index, forward

    @property
    def spec(self) -> ViewSpec:
        return self.viewset.specs[self.index]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.owner.alphas_cumprod

    @property
    def device(self) -> torch.device:
        return self.owner.device

    def features(self, features: Features | None) -> Features:
        f = (self.spec.features or NO_FEATURES).merged(features)
        extra = sorted(set(f.modulation or {}) - set(self.spec.modulates))
        if extra:  # a name without a dispatcher would be silently ignored
            raise KeyError(f"per-call modulation of {extra[:3]}: list these names in ViewSpec.modulates")
        return f

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
            features: Features | None = None) -> torch.Tensor:
        f = self.features(features)
        with self.viewset.activate(self.index, f):
            return self._forward(x_t, t, cond, f)

    @contextmanager
    def activated(self, features: Features | None = None) -> Iterator["View"]:
        """Keep this view active across a whole forward *and backward* (training with
        gradient checkpointing recomputes inside backward)."""
        with self.viewset.activate(self.index, self.features(features)):
            yield self

    def unet_parameters(self) -> dict[str, torch.Tensor]:
        return self.owner.unet_parameters()

    def views(self, *specs, **kw):
        return self.owner.views(*specs, **kw)

    def adapted(self, weight_functions, gradient_checkpointing: bool = False):
        return self.owner.adapted(weight_functions, gradient_checkpointing)

    def __getattr__(self, name):  # encode / decode / encode_text / context_dim ... of the owner
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.owner, name)


class _Dispatch(nn.Module):
    """Parametrization W -> fns(W) for the view set's currently active functions."""

    def __init__(self, viewset: ViewSet, name: str):
        super().__init__()
        self.viewset, self.name = viewset, name

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for fn in self.viewset.functions(self.name):
            if not hasattr(fn, "output_delta"):
                weight = fn(weight)
        return weight


def _output_dispatch(viewset: ViewSet, name: str):
    def hook(module, args, output):
        for fn in viewset.functions(name):
            if hasattr(fn, "output_delta"):
                output = output + fn.output_delta(module, args[0])
        return output

    return hook


class ModuleViews:
    """Installs view sets on a module whose parameters have canonical names.

    ``paths``: {canonical name: the module's own parameter path}.  ``first_block``: the
    submodule whose output receives :attr:`Features.input_map` (``conv_in``).
    """

    def __init__(self, module: nn.Module, paths: Mapping[str, str], first_block: nn.Module):
        self.module, self.paths, self.first_block = module, dict(paths), first_block

    def parameter(self, canonical: str) -> torch.Tensor:
        """The stored tensor of a canonical name (also while parametrized)."""
        path, leaf = self.paths[canonical].rsplit(".", 1)
        owner = self.module.get_submodule(path)
        if parametrize.is_parametrized(owner, leaf):
            return owner.parametrizations[leaf].original
        return getattr(owner, leaf)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {c: self.parameter(c) for c in self.paths}

    @contextmanager
    def install(self, specs: Sequence[ViewSpec], gradient_checkpointing: bool = False) -> Iterator[ViewSet]:
        names = set().union(*(s.names() for s in specs)) if specs else set()
        unknown = sorted(names - set(self.paths))
        if unknown:
            raise KeyError(f"no such parameters: {unknown[:3]}")
        viewset = ViewSet(specs)
        modulated = _modulated(specs)
        done: list[tuple[nn.Module, str, nn.Module]] = []
        hooks = []
        was_ckpt = bool(getattr(self.module, "is_gradient_checkpointing", False)) if gradient_checkpointing else False
        try:
            for name in sorted(names):
                path, leaf = self.paths[name].rsplit(".", 1)
                owner = self.module.get_submodule(path)
                fns = [s.weight_functions.get(name) for s in specs]
                if leaf == "weight" and any(hasattr(f, "output_delta") for f in fns) or name in modulated:
                    hooks.append(owner.register_forward_hook(_output_dispatch(viewset, name)))
                if any(f is not None and not hasattr(f, "output_delta") for f in fns) or name in modulated:
                    dispatch = _Dispatch(viewset, name)
                    parametrize.register_parametrization(owner, leaf, dispatch, unsafe=True)
                    done.append((owner, leaf, dispatch))
            if gradient_checkpointing and hasattr(self.module, "enable_gradient_checkpointing"):
                self.module.enable_gradient_checkpointing()
            yield viewset
        finally:
            for hook in hooks:
                hook.remove()
            for owner, leaf, dispatch in reversed(done):
                _remove(owner, leaf, dispatch)
            if gradient_checkpointing and not was_ckpt and hasattr(self.module, "disable_gradient_checkpointing"):
                self.module.disable_gradient_checkpointing()

    @contextmanager
    def features(self, features: Features | None) -> Iterator[None]:
        """Apply ``features.input_map`` to the first block's output for the duration of a call."""
        if features is None or features.input_map is None:
            yield
            return
        fmap, box = features.input_map, features.crop_box

        def hook(module, args, out):
            return out + fmap(out, box).to(out.dtype)

        handle = self.first_block.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def _modulated(specs: Sequence[ViewSpec]) -> set[str]:
    return set().union(*(s.modulates for s in specs)) if specs else set()


def _remove(owner: nn.Module, leaf: str, dispatch: nn.Module) -> None:
    """Remove one dispatcher from a (possibly nested) parametrization chain."""
    plist = owner.parametrizations[leaf]
    if len(plist) == 1:
        parametrize.remove_parametrizations(owner, leaf, leave_parametrized=False)
        return
    for i, p in enumerate(plist):
        if p is dispatch:
            del plist[i]
            return


def view_tuple(owner, viewset: ViewSet, forward: Callable) -> tuple[View, ...]:
    return tuple(View(owner, viewset, i, forward) for i in range(len(viewset.specs)))


class ModuleDenoiser:
    """The seam's shared part for back ends over one torch module (diffusers UNets): the
    schedule, device, views and the exclusive ``adapted`` view.  Subclasses provide
    ``unet``, ``schedule``, ``_module_views()`` and ``_forward(x_t, t, cond, features)``."""

    unet: nn.Module
    schedule: torch.Tensor
    trains_in_place = True  # the module is this process's own: a full fine-tune may train it in place (core.inplace)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.schedule

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _module_views(self) -> ModuleViews:
        raise NotImplementedError

    def _forward(self, x_t, t, cond, features) -> torch.Tensor:
        raise NotImplementedError

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
            features: Features | None = None) -> torch.Tensor:
        if features is not None and features.modulation:
            raise ValueError("a per-call modulation needs a view: use model.views(ViewSpec(modulates=...))")
        return self._forward(x_t, t, cond, features)

    def unet_parameters(self) -> dict[str, torch.Tensor]:
        return self._module_views().parameters()

    @contextmanager
    def views(self, *specs: ViewSpec, gradient_checkpointing: bool = False,
              differentiable: bool = False) -> Iterator[tuple[View, ...]]:
        """``(base, view_1, ...)`` over this one module: dispatching parametrizations and
        output hooks, removed afterwards, the stored weights untouched."""
        with self._module_views().install(specs, gradient_checkpointing) as viewset:
            yield view_tuple(self, viewset, self._forward)

    @contextmanager
    def adapted(self, weight_functions: Mapping[str, WeightFunction],
                gradient_checkpointing: bool = False) -> Iterator[View]:
        """One view, active for the whole block (every use of this model inside is adapted)."""
        with self.views(ViewSpec(dict(weight_functions)), gradient_checkpointing=gradient_checkpointing) as (_, v):
            with v.activated():
                yield v
