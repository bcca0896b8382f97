"""Low-rank adapters (LoRA, Hu et al. 2021) as weight functions, and the delta file format.

A :class:`LoRA` is a *weight function*: given a frozen weight W it returns
W + (alpha / r) * B A (eq. 3 of the LoRA paper), with A [r, fan_in] (``down``) and
B [out, r] (``up``, zero at initialisation, so the adapted model starts as the base).
Convolution kernels are adapted through their flattened [out, in*kh*kw] view, which
is how ComfyUI applies conv LoRAs.  Because an adapter only *wraps* a weight, the base
model is never modified: the seam applies weight functions on the fly
(:meth:`core.seam.LatentDiffusion.weight_functions`).

Trained deltas are saved in ComfyUI's generic LoRA layout, keyed by the original SD
module path, so ComfyUI's own LoRA loaders read them:

* LoRA: ``diffusion_model.<module>.lora_down.weight`` [r, in(, kh, kw)],
  ``...lora_up.weight`` [out, r(, 1, 1)], ``...alpha`` (scalar);
* full fine-tune: ``diffusion_model.<module>.diff`` (delta of the weight) and
  ``...diff_b`` (delta of the bias).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "diffusion_model."
TEXT_PREFIX = "text_encoders.clip_l.transformer."
"""Key prefix of text-encoder deltas: ComfyUI's generic LoRA key for an SD 1.x CLIP, followed by
the transformers ``CLIPTextModel`` module path (``text_model.encoder.layers.0.mlp.fc1``)."""
TEXT_TRAINABLE = ("text_model.embeddings.", "text_model.encoder.layers.", "text_model.final_layer_norm.")
"""Text-encoder parameters a full fine-tune trains: every parameter of the text model (token and
position embeddings, transformer layers, final norm), as SINE's official code optimises
``cond_stage_model.parameters()``."""
TEXT_LORA = ("text_model.encoder.layers.",)
"""Where text-encoder LoRA adapters go: the transformer layers' 2-D weights (q/k/v/out projections
and MLPs); the embeddings are tables, not layers, and stay frozen under LoRA."""
ATTENTION_LEAVES = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 8.0
    targets: str = "all"  # "all": every conv/linear weight; "attention": q/k/v/out projections only

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if self.targets not in ("all", "attention"):
            raise ValueError(f"targets must be 'all' or 'attention', got {self.targets!r}")


def select_targets(shapes: Mapping[str, tuple[int, ...]], targets: str = "all") -> list[str]:
    """Canonical weight names (``...weight``, 2-D or 4-D) to adapt."""
    out = []
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) not in (2, 4):
            continue
        if targets == "attention" and not name.endswith(ATTENTION_LEAVES):
            continue
        out.append(name)
    return sorted(out)


def low_rank_output(module: nn.Module, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                    shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """scale * (up @ down) applied to ``x`` as ``module``'s weight would be, computed as up(down(x)):
    ``down`` [r, fan_in], ``up`` [out, r] (moved to ``x``'s device and dtype), ``shape`` the weight's; a
    convolution takes ``module``'s stride, padding and dilation, its up projection is a 1x1 convolution."""
    down, up = down.to(x), up.to(x)
    if len(shape) == 4:
        kh, kw = shape[2:]
        h = F.conv2d(x, down.reshape(down.shape[0], shape[1], kh, kw), None, module.stride, module.padding,
                     module.dilation)
        return F.conv2d(h, up[:, :, None, None]) * scale
    return F.linear(F.linear(x, down), up) * scale


class LoRA(nn.Module):
    """Weight function W -> W + (alpha / r) * up @ down (reshaped to W's shape)."""

    def __init__(self, shape: tuple[int, ...], rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        out_features, fan_in = shape[0], math.prod(shape[1:])
        rank = min(rank, out_features, fan_in)
        self.shape = tuple(shape)
        self.rank, self.alpha = rank, float(alpha)
        bound = 1.0 / math.sqrt(fan_in)  # kaiming-uniform(a=sqrt(5)), as nn.Linear initialises
        down = (torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros(out_features, rank))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return (self.up @ self.down).reshape(self.shape) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The same adaptation applied to activations: (delta W) x, computed as up(down(x)).

        Equal to ``module(x)`` with weight ``forward(W)`` minus ``module(x)`` with W, but
        never materialises a full-size weight or weight gradient (the saving peft's LoRA
        layers make).  ``module`` supplies a convolution's stride, padding and dilation.
        """
        return low_rank_output(module, x, self.down, self.up, self.shape, self.scale)

    def state(self, module: str, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
        """The ComfyUI generic-LoRA tensors of this adapter (``module``: canonical module path)."""
        down, up = self.down.detach().float(), self.up.detach().float()
        if len(self.shape) == 4:
            down = down.reshape(self.rank, *self.shape[1:])
            up = up.reshape(self.shape[0], self.rank, 1, 1)
        base = prefix + module
        return {f"{base}.lora_down.weight": down.contiguous(), f"{base}.lora_up.weight": up.contiguous(),
                f"{base}.alpha": torch.tensor(self.alpha)}


def make_loras(shapes: Mapping[str, tuple[int, ...]], config: LoRAConfig, seed: int = 0) -> dict[str, LoRA]:
    """One adapter per selected weight, deterministically initialised."""
    g = torch.Generator().manual_seed(seed)
    return {name: LoRA(shapes[name], config.rank, config.alpha, g) for name in select_targets(shapes, config.targets)}


def lora_state_dict(loras: Mapping[str, LoRA], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, lora in loras.items():
        out.update(lora.state(name[: -len(".weight")], prefix))
    return out


def diff_state_dict(deltas: Mapping[str, torch.Tensor], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """Full fine-tune deltas {canonical param name: delta} -> ``.diff`` / ``.diff_b`` tensors."""
    out = {}
    for name, d in deltas.items():
        module, leaf = name.rsplit(".", 1)
        key = {"weight": "diff", "bias": "diff_b"}.get(leaf)
        if key is None:
            raise ValueError(f"cannot store a delta for {name!r} (only .weight and .bias)")
        out[f"{prefix}{module}.{key}"] = d.detach().float().contiguous()
    return out


class LowRankDelta(nn.Module):
    """A trained LoRA's fixed delta, strength * (alpha / r) * up @ down, kept as its factors.

    A weight function like :class:`core.seam.DeltaFunction`, but it never holds the full-size
    delta: the views apply it to activations (:meth:`output_delta`, as during training) and
    :meth:`delta` builds the dense tensor of this one weight only when asked."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float, shape: tuple[int, ...],
                 strength: float = 1.0):
        super().__init__()
        self.register_buffer("down", down.detach().float().flatten(1))  # [r, fan_in]
        self.register_buffer("up", up.detach().float().flatten(1))  # [out, r]
        self.rank, self.alpha, self.shape, self.strength = self.down.shape[0], float(alpha), tuple(shape), float(strength)

    @property
    def scale(self) -> float:
        return self.strength * self.alpha / self.rank

    def scaled(self, strength: float) -> "LowRankDelta":
        """The same factors (shared, not copied) at ``strength``."""
        return LowRankDelta(self.down, self.up, self.alpha, self.shape, strength)

    def delta(self) -> torch.Tensor:
        """The dense delta of this weight, [out, in(, kh, kw)] float32."""
        return (self.up @ self.down).reshape(self.shape) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight)

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(delta W) x as up(down(x)), as :meth:`LoRA.output_delta`."""
        return low_rank_output(module, x, self.down, self.up, self.shape, self.scale)


class Deltas(Mapping):
    """{canonical parameter name: dense delta} of a fine-tune, without holding every dense delta.

    LoRA deltas are kept as their factors (:class:`LowRankDelta`) and built one at a time when read;
    full fine-tune deltas (``.diff``) are dense already.  :meth:`functions` gives the weight functions
    that apply them (the LoRA ones on activations, never full-size)."""

    def __init__(self, items: Mapping[str, "LowRankDelta | torch.Tensor"]):
        self.items_ = dict(items)

    def __getitem__(self, name: str) -> torch.Tensor:
        v = self.items_[name]
        return v.delta() if isinstance(v, LowRankDelta) else v

    def __iter__(self):
        return iter(self.items_)

    def __len__(self) -> int:
        return len(self.items_)

    def functions(self, strength: float = 1.0) -> dict[str, nn.Module]:
        """W -> W + strength * delta for every entry (to apply through the seam)."""
        from .seam import DeltaFunction

        return {name: v.scaled(strength) if isinstance(v, LowRankDelta) else DeltaFunction(v, strength)
                for name, v in self.items_.items()}


def delta_functions(deltas: Mapping[str, torch.Tensor], strength: float = 1.0) -> dict[str, nn.Module]:
    """The weight functions of ``deltas`` (a :class:`Deltas`, or a plain {name: dense delta})."""
    return (deltas if isinstance(deltas, Deltas) else Deltas(deltas)).functions(strength)


def delta_weights(sd: Mapping[str, torch.Tensor], prefix: str = PREFIX) -> Deltas:
    """Any delta file (LoRA or diff layout) -> {canonical param name: delta} (a :class:`Deltas`:
    LoRA entries stay factors until read).

    Used to apply a saved delta through the diffusers back end; ComfyUI reads the file
    with its own loader.
    """
    out: dict[str, LowRankDelta | torch.Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest.endswith(".lora_down.weight"):
            module = rest[: -len(".lora_down.weight")]
            up = sd[f"{prefix}{module}.lora_up.weight"]
            alpha = float(sd.get(f"{prefix}{module}.alpha", torch.tensor(float(value.shape[0]))))
            shape = (up.shape[0], *value.shape[1:])  # [out, in(, kh, kw)]
            out[module + ".weight"] = LowRankDelta(value, up, alpha, shape)
        elif rest.endswith(".diff"):
            out[rest[: -len(".diff")] + ".weight"] = value.float()
        elif rest.endswith(".diff_b"):
            out[rest[: -len(".diff_b")] + ".bias"] = value.float()
    return Deltas(out)


def check_fine_tune(mode: str, steps: int | None, lr: float | None) -> None:
    """The checks every fine-tuner's config shares: ``mode`` "lora" or "full", ``steps`` >= 1
    (None: the method's default), ``lr`` > 0 (None: the mode's default)."""
    if mode not in ("lora", "full"):
        raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")


def trainable_functions(mode: str, params: Mapping[str, torch.Tensor], config: LoRAConfig, seed: int,
                        device: torch.device | str) -> dict[str, nn.Module]:
    """The weight functions a fine-tuner trains: LoRA adapters (``mode`` "lora") or float32
    trainable copies of every parameter ("full"), on ``device``."""
    from .seam import ReplaceFunction

    if mode == "lora":
        fns = make_loras({k: tuple(v.shape) for k, v in params.items()}, config, seed)
    else:
        fns = {name: ReplaceFunction(p) for name, p in params.items()}
    for fn in fns.values():
        fn.to(device)
    return fns


@torch.no_grad()
def trained_delta(mode: str, fns: Mapping[str, nn.Module], params: Mapping[str, torch.Tensor],
                  prefix: str = PREFIX) -> tuple[dict[str, torch.Tensor], Deltas]:
    """(the delta in ComfyUI's LoRA-file layout, {canonical name: delta}) of trained weight
    functions.  LoRA: the file's tensors are the factors, and the deltas stay factors (on the
    training device; no full-size delta is built); full fine-tunes keep only the parameters
    that moved, dense, one at a time."""
    if mode == "lora":
        deltas = Deltas({name: LowRankDelta(fn.down, fn.up, fn.alpha, fn.shape) for name, fn in fns.items()})
        return {k: v.cpu() for k, v in lora_state_dict(fns, prefix).items()}, deltas
    out = {}
    for name, fn in fns.items():
        d = (fn.param.detach().float() - params[name].detach().float()).cpu()
        if bool(d.any()):
            out[name] = d
    return diff_state_dict(out, prefix), Deltas(out)


def text_trainable(params: Mapping[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """The text-encoder parameters a ``mode`` fine-tune trains: "full", all of :data:`TEXT_TRAINABLE`
    (the whole text model, embeddings included); "lora", the 2-D weights under :data:`TEXT_LORA`
    (the q/k/v/out projections and the MLPs)."""
    if mode == "lora":
        return {k: v for k, v in params.items() if k.startswith(TEXT_LORA) and k.endswith(".weight") and v.ndim == 2}
    return {k: v for k, v in params.items() if k.startswith(TEXT_TRAINABLE)}
