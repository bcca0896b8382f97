"""SinDDM sampling (paper Alg. 2), at any size, with guidance and image injection.

Coarse to fine: at s = 0 plain DDPM from pure noise over all T steps; at s >= 1 the
previous sample is upsampled (bilinear) to x~^s, noised to T[s] and denoised with the
deblurring DDIM update (sigma = 0):

    x_mix_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)               (Alg. 2 line 6)
    x0_hat    = (x_mix_hat - gamma_t x~) / (1 - gamma_t)             (line 7)
    x_mix'    = gamma_{t-1} x~ + (1 - gamma_{t-1}) x0_hat           (line 8)
    x_{t-1}   = sqrt(a_{t-1}) x_mix' + sqrt(1 - a_{t-1}) (x_t - sqrt(a_t) x_mix_hat) / sqrt(1 - a_t)

with gamma clamped to [0, 0.55] and the estimates clamped to [-1, 1] as in the official
sampler (its off-by-one kept: noise at T[s], first denoising call at T[s] - 1).  When a
guidance needs it (CLIP), every scale uses the stochastic DDPM posterior instead
(paper Sec. 3, "except when applying text-guidance").  Guidance edits x0_hat between
line 7 and line 8 (Dhariwal & Nichol style), see :mod:`core.sinddm.guidance`.

Sizes: scale s is (int(H_s m_h), int(W_s m_w)) for per-axis multipliers (m_h, m_w), as
the official ``--scale_mul``; asking for an output (H, W) sets m = (H/H_N-1, W/W_N-1)
and the finest scale to exactly (H, W).  Sample k of a call uses seed + k, so a sample
does not depend on how many others are drawn with it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from ..diffusion import ddpm_step, predict_x0, prev_alpha_bar, q_sample
from ..fit import OnStep, poll
from ..seeds import derive_seed
from .artifact import SinDDM
from .guidance import Guidance
from .pyramid import resize_to, upsample

MIN_SAMPLE_SIDE = 8


def output_sizes(model: SinDDM, scale_mul: tuple[float, float] = (1.0, 1.0),
                 size: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """(H, W) of every scale for multipliers (m_h, m_w), or for a final output ``size``."""
    sizes = model.pyramid.spec.sizes
    if size is not None:
        h, w = int(size[0]), int(size[1])
        mh, mw = h / sizes[-1][0], w / sizes[-1][1]
    else:
        mh, mw = float(scale_mul[0]), float(scale_mul[1])
    out = [(int(sh * mh), int(sw * mw)) for sh, sw in sizes]
    if size is not None:
        out[-1] = (h, w)
    for s, (sh, sw) in enumerate(out):
        if min(sh, sw) < MIN_SAMPLE_SIDE:
            raise ValueError(
                f"size: scale {s} would be {sw}x{sh} px; the output is too small for this model "
                f"(each scale needs at least {MIN_SAMPLE_SIDE} px; ask for a larger output)"
            )
    return out


class _Noise:
    """Per-sample noise streams: sample k draws from its own generator seeded seed + k."""

    def __init__(self, seed: int, count: int, device: torch.device):
        self.gens = [torch.Generator().manual_seed(derive_seed(seed, k)) for k in range(count)]
        self.device = device

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens]).to(self.device)


class _Sampler:
    def __init__(self, model: SinDDM, device: torch.device, guidance: Sequence[Guidance],
                 on_step: OnStep | None, should_stop: Callable[[], bool] | None, total_steps: int):
        net = model.net
        if next(net.parameters()).device != device or net.training:
            net = copy.deepcopy(net).to(device).eval()  # never move or mutate the caller's model
        self.net = net
        self.sch = model.schedule
        self.ab = model.schedule.alphas_cumprod.to(device)
        self.guidance = list(guidance)
        self.ddpm = any(g.needs_ddpm for g in self.guidance)
        self.on_step, self.should_stop = on_step, should_stop
        self.total, self.done = max(total_steps, 1), 0
        self.device = device

    def _tick(self, s: int, t: int) -> None:
        self.done += 1
        poll(self.should_stop, "SinDDM sampling", self.done - 1)
        if self.on_step is not None:
            self.on_step(self.done, self.total, {"scale": s, "t": t})

    def _guide(self, x0: torch.Tensor, s: int, t: int) -> torch.Tensor:
        for g in self.guidance:
            x0 = g.apply(x0, s, t, self)
        return x0

    def eps(self, x: torch.Tensor, t: int, s: int) -> torch.Tensor:
        b = x.shape[0]
        return self.net(x, torch.full((b,), t, device=x.device), torch.full((b,), s, device=x.device))

    def coarsest(self, shape, noise: _Noise) -> torch.Tensor:
        """s = 0: DDPM ancestral sampling over all T steps from N(0, I)."""
        x = noise(shape[1:])
        for t in range(self.sch.num_timesteps - 1, -1, -1):
            x0 = predict_x0(x, self.eps(x, t, 0), self.ab[t])
            x0 = self._guide(x0, 0, t).clamp(-1, 1)
            x = ddpm_step(x, None, self.ab[t], prev_alpha_bar(self.ab, t - 1, 1.0), noise(shape[1:]) if t > 0 else None,
                          x0=x0)
            self._tick(0, t)
        return x

    def refine(self, x_tilde: torch.Tensor, s: int, t_start: int, noise: _Noise, zero_gamma: bool = False):
        """s >= 1: noise x~ to t_start, then t_start denoising steps (Alg. 2 lines 5-12)."""
        for g in self.guidance:
            x_tilde = g.prepare(x_tilde, s, t_start, self)
        x = q_sample(x_tilde, self.ab[t_start], noise(x_tilde.shape[1:]))  # t_start < T (checked by the schedule)
        if t_start == 0:  # the official sampler runs no step then
            return x
        for t in range(t_start - 1, -1, -1):
            eps = self.eps(x, t, s)
            x_mix_hat = predict_x0(x, eps, self.ab[t])
            if self.ddpm:
                x0 = self._guide(x_mix_hat.clamp(-1, 1), s, t).clamp(-1, 1)
                x = ddpm_step(x, None, self.ab[t], prev_alpha_bar(self.ab, t - 1, 1.0),
                              noise(x.shape[1:]) if t > 0 else None, x0=x0)
            else:
                g_t = 0.0 if zero_gamma else self.sch.gamma_sample(s, t)
                g_prev = 0.0 if zero_gamma else self.sch.gamma_sample(s, t - 1)
                x0 = (x_mix_hat - g_t * x_tilde) / (1 - g_t)
                x0 = self._guide(x0, s, t)
                x_mix_prev = (g_prev * x_tilde + (1 - g_prev) * x0).clamp(-1, 1) if t > 0 else x0.clamp(-1, 1)
                if t > 0:
                    x_mix_hat = x_mix_hat.clamp(-1, 1)
                    direction = (x - self.ab[t].sqrt() * x_mix_hat) / (1 - self.ab[t]).sqrt()
                    x = self.ab[t - 1].sqrt() * x_mix_prev + (1 - self.ab[t - 1]).sqrt() * direction
                    x = x.float()
                else:
                    x = x_mix_prev
            self._tick(s, t)
        return x


@torch.no_grad()
def sample(
    model: SinDDM,
    count: int = 1,
    seed: int = 0,
    scale_mul: tuple[float, float] = (1.0, 1.0),
    size: tuple[int, int] | None = None,
    guidance: Sequence[Guidance] = (),
    start_steps: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    on_step: OnStep | None = None,
    should_stop: Callable[[], bool] | None = None,
    scales: int | None = None,
) -> torch.Tensor:
    """Draw ``count`` samples [count, 3, H, W] in [0, 1] (paper Alg. 2).

    ``start_steps`` overrides T[1..N-1] (the official ``--sample_t_list``); ``scales``
    stops after that many scales (a coarse preview).
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    device = torch.device(device)
    sizes = output_sizes(model, scale_mul, size)
    sched = model.schedule_with(start_steps)
    n = model.pyramid.spec.n_scales if scales is None else max(1, min(scales, model.pyramid.spec.n_scales))
    total = sched.num_timesteps + sum(sched.start_steps[1:n])
    smp = _Sampler(model.with_schedule(sched), device, guidance, on_step, should_stop, total)
    noise = _Noise(seed, count, device)
    for g in smp.guidance:
        g.begin(sizes, count, device, model.input_scale)
    try:
        x = smp.coarsest((count, 3, *sizes[0]), noise)
        for s in range(1, n):
            for g in smp.guidance:
                g.begin_scale(s, sizes[s])
            x = smp.refine(upsample(x, sizes[s]), s, sched.start_steps[s], noise)
    finally:
        for g in smp.guidance:
            g.end()
    return ((x + 1) / 2).clamp(0, 1).cpu()


def resolve_scale(model: SinDDM, scale: int | None) -> int:
    """A scale index: None is the finest, negative counts from the finest (-1 = N-1, -2 = N-2, ...)."""
    n = model.pyramid.spec.n_scales
    if scale is None:
        return n - 1
    s = int(scale) + n if int(scale) < 0 else int(scale)
    if not 0 <= s < n:
        raise ValueError(f"scale: {scale} is not a scale of this model (it has {n}: 0..{n - 1}, or -1..-{n})")
    return s


def _sizes_from(model: SinDDM, size: tuple[int, int], first: int) -> list[tuple[int, int]]:
    """Every scale's (H, W) for a final output ``size``, scaled like the training pyramid; the
    scales from ``first`` on must be at least MIN_SAMPLE_SIDE."""
    sizes = model.pyramid.spec.sizes
    h, w = int(size[0]), int(size[1])
    mh, mw = h / sizes[-1][0], w / sizes[-1][1]
    out = [(int(sh * mh), int(sw * mw)) for sh, sw in sizes]
    out[-1] = (h, w)
    for s in range(first, len(out)):
        if min(out[s]) < MIN_SAMPLE_SIDE:
            raise ValueError(f"scale: at scale {s} the {w}x{h} image would be {out[s][1]}x{out[s][0]} px "
                             f"(at least {MIN_SAMPLE_SIDE} per side needed); start at a finer scale")
    return out


@torch.no_grad()
def resume(
    model: SinDDM,
    image: torch.Tensor,
    scale: int,
    t_start: int | None = None,
    count: int = 1,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    guidance: Sequence[Guidance] = (),
    zero_gamma: bool = False,
    device: str | torch.device = "cpu",
    on_step: OnStep | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Run Alg. 2 from scale ``scale`` on, starting from ``image`` instead of a sample of the coarser scales.

    ``image`` [1, 3, h, w] in [0, 1] is resized (anti-aliased bilinear) to the scale's size and
    enters that scale where plain sampling puts x~^s, the upsampled output of scale s - 1: it
    is noised to ``t_start`` (default T[s]) and denoised, and the finer scales follow as in
    :func:`sample` with their own T[s'].  ``size`` is the final (H, W) (default the training
    size; every scale is scaled like it).  ``zero_gamma`` uses gamma = 0 at the start scale,
    for an image that is no blurry reference (paper Sec. 4: "At the injection scale, we use
    gamma_t^s = 0 for all t").  At scale 0 the denoiser is the s = 0 one, with the DDIM update.
    Returns [count, 3, H, W] in [0, 1]; sample k draws its noise from seed + k.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"image: expected one RGB image [1, 3, H, W], got {tuple(image.shape)}")
    s0 = resolve_scale(model, scale)
    n = model.pyramid.spec.n_scales
    sched = model.schedule
    T = sched.num_timesteps
    t0 = sched.start_steps[s0] if t_start is None else int(t_start)
    if not 0 <= t0 < T:
        raise ValueError(f"t_start must be in 0..{T - 1}, got {t_start}")
    sizes = _sizes_from(model, size if size is not None else model.training_size, s0)
    device = torch.device(device)
    total = t0 + sum(sched.start_steps[s0 + 1 :])
    smp = _Sampler(model, device, guidance, on_step, should_stop, total)
    x = (resize_to(image.float(), sizes[s0]).to(device) * 2 - 1).expand(count, -1, -1, -1)
    noise = _Noise(seed, count, device)
    for g in smp.guidance:
        g.begin(sizes, count, device, model.input_scale)
        g.begin_scale(s0, sizes[s0])
    try:
        x = smp.refine(x, s0, t0, noise, zero_gamma=zero_gamma)
        for s in range(s0 + 1, n):
            for g in smp.guidance:
                g.begin_scale(s, sizes[s])
            x = smp.refine(upsample(x, sizes[s]), s, sched.start_steps[s], noise)
    finally:
        for g in smp.guidance:
            g.end()
    return ((x + 1) / 2).clamp(0, 1).cpu()


def inject(
    model: SinDDM,
    image: torch.Tensor,
    t_start: int,
    count: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    guidance: Sequence[Guidance] = (),
    on_step: OnStep | None = None,
    should_stop: Callable[[], bool] | None = None,
    scale: int | None = None,
) -> torch.Tensor:
    """Denoise an image injected at scale ``scale`` (default the finest) from step ``t_start`` with gamma = 0.

    The image-to-image path of paper Sec. 4 (style transfer, harmonization: "inject a
    downsampled version of the content image into some scale s <= N - 1 and timestep
    t <= T"): ``image`` [1, 3, H, W] in [0, 1] is downsampled to that scale's size (the
    training pyramid's proportions, the finest scale at the image's own size), noised to
    ``t_start`` and run through ``t_start`` DDIM steps with gamma = 0; the finer scales then
    run as in sampling.  ``scale`` may count from the finest (-1, -2, ...).  The official
    code injects at the finest scale only.  Returns [count, 3, H, W] in [0, 1].
    """
    T = model.schedule.num_timesteps
    if not 0 < int(t_start) < T:
        raise ValueError(f"t_start must be in 1..{T - 1}, got {t_start}")
    return resume(model, image, resolve_scale(model, scale), int(t_start), count, seed, tuple(image.shape[-2:]),
                  guidance, zero_gamma=True, device=device, on_step=on_step, should_stop=should_stop)
