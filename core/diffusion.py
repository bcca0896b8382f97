"""Discrete-time Gaussian diffusion maths shared by every method of the pack.

Pure functions on tensors: noise schedules, the forward process q(x_t | x_0), the
Tweedie estimate of x_0 from a noise prediction, the DDIM update (with its eta) and
the DDPM posterior.  Notation follows Ho et al. 2020 ("DDPM") and Song et al. 2021
("DDIM"): beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s.

Every function that takes ``alpha_bar`` accepts a Python float, a 0-d tensor or a
tensor of shape [B] (one value per sample); values are broadcast over the remaining
dimensions of ``x``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Spacing = Literal["leading", "trailing", "linspace"]


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------
def scaled_linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Stable Diffusion's "scaled linear" schedule: sqrt(beta) is linear in t.

    beta_t = (sqrt(beta_start) + t / (T-1) * (sqrt(beta_end) - sqrt(beta_start)))^2,
    t = 0..T-1 (latent-diffusion code, ``make_beta_schedule("linear")``).  Returns
    float64 [T].
    """
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, eq. 17.

    alpha_bar(t) = f(t) / f(0) with f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2, and
    beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), max_beta).  Returns float64 [T].
    """
    T = num_train_timesteps
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((steps / T) + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(0, max_beta)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (DDPM, notation above eq. 4)."""
    return torch.cumprod(1.0 - betas, dim=0)


def sd_alphas_cumprod() -> torch.Tensor:
    """alpha_bar of Stable Diffusion 1.x (scaled linear, T=1000), float64 [1000]."""
    return alphas_cumprod(scaled_linear_betas())


def noise_to_signal(alpha_bar: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t): the noise-to-signal ratio.

    This is also the sigma of the variance-exploding parameterisation used by
    k-diffusion and ComfyUI (x = x_0 + sigma * eps).
    """
    return ((1 - alpha_bar) / alpha_bar).sqrt()


# --------------------------------------------------------------------------------------
# Forward process and Tweedie
# --------------------------------------------------------------------------------------
def _bcast(a: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Turn a scalar or a per-sample [B] tensor into a tensor broadcastable to x."""
    a = torch.as_tensor(a, device=x.device)
    a = a.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if a.ndim == 0:
        return a
    return a.reshape(a.shape[0], *([1] * (x.ndim - 1)))


def q_sample(x0: torch.Tensor, alpha_bar: float | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (DDPM eq. 4).

    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps.
    """
    a = _bcast(alpha_bar, x0)
    return (a.sqrt() * x0 + (1 - a).sqrt() * eps).to(x0.dtype)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """Tweedie's estimate of x_0 from an epsilon prediction (DDIM eq. 9, "predicted x_0").

    x0_hat = (x_t - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t).
    """
    a = _bcast(alpha_bar, x_t)
    return ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).to(x_t.dtype)


def predict_eps(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """Invert :func:`q_sample` for eps: eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
    a = _bcast(alpha_bar, x_t)
    return ((x_t - a.sqrt() * x0) / (1 - a).sqrt()).to(x_t.dtype)


# --------------------------------------------------------------------------------------
# Reverse steps
# --------------------------------------------------------------------------------------
def ddim_sigma(alpha_bar: float | torch.Tensor, alpha_bar_prev: float | torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t(eta) of DDIM eq. 16.

    sigma_t = eta * sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_{t-1}).
    eta = 0 is the deterministic DDIM sampler, eta = 1 the DDPM posterior's standard deviation.
    """
    a = torch.as_tensor(alpha_bar, dtype=torch.float64)
    a_prev = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    return eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar: float | torch.Tensor,
    alpha_bar_prev: float | torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update x_t -> x_{t_prev} (DDIM eq. 12).

    x_prev = sqrt(alpha_bar_prev) * x0_hat
             + sqrt(1 - alpha_bar_prev - sigma_t^2) * eps
             + sigma_t * noise,
    with x0_hat from :func:`predict_x0` unless given (e.g. after guidance edited it) and
    sigma_t from :func:`ddim_sigma`.  ``noise`` is required when eta > 0.
    """
    if x0 is None:
        x0 = predict_x0(x_t, eps, alpha_bar)
    sigma = ddim_sigma(alpha_bar, alpha_bar_prev, eta)
    a_prev = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt()
    out = _bcast(a_prev.sqrt(), x_t) * x0 + _bcast(direction, x_t) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs a noise tensor")
        out = out + _bcast(sigma, x_t) * noise
    return out.to(x_t.dtype)


def ddpm_posterior(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar: float | torch.Tensor,
    alpha_bar_prev: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the DDPM posterior q(x_{t_prev} | x_t, x_0) (DDPM eqs. 6-7).

    With beta_t = 1 - alpha_bar_t / alpha_bar_prev (the effective beta between the two
    steps, so that skipped timesteps are handled as in diffusers):
      mean = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) * x_0
             + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t,
      var  = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t   ("fixed small").
    Returns (mean, variance); variance is broadcastable to x_t.
    """
    a = torch.as_tensor(alpha_bar, dtype=torch.float64)
    a_prev = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    alpha_t = a / a_prev
    beta_t = 1 - alpha_t
    coef_x0 = a_prev.sqrt() * beta_t / (1 - a)
    coef_xt = alpha_t.sqrt() * (1 - a_prev) / (1 - a)
    var = ((1 - a_prev) / (1 - a) * beta_t).clamp(min=1e-20)
    mean = _bcast(coef_x0, x_t) * x0 + _bcast(coef_xt, x_t) * x_t
    return mean.to(x_t.dtype), _bcast(var, x_t)


def ddpm_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar: float | torch.Tensor,
    alpha_bar_prev: float | torch.Tensor,
    noise: torch.Tensor | None,
    x0: torch.Tensor | None = None,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """Ancestral DDPM step (DDPM Algorithm 2, in the x_0-parameterised form of eq. 7).

    x_prev = mean(x0_hat, x_t) + sqrt(var) * noise; no noise is added when ``noise`` is
    None (the last step).  ``clip_x0`` clamps x0_hat to [-clip_x0, clip_x0] first.
    """
    if x0 is None:
        x0 = predict_x0(x_t, eps, alpha_bar)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    mean, var = ddpm_posterior(x0, x_t, alpha_bar, alpha_bar_prev)
    if noise is None:
        return mean
    return (mean + var.sqrt() * noise).to(x_t.dtype)


# --------------------------------------------------------------------------------------
# Timestep spacings
# --------------------------------------------------------------------------------------
def timesteps(
    num_train_timesteps: int, num_steps: int, spacing: Spacing = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """Descending integer timesteps for a sampler of ``num_steps`` steps.

    The three spacings of Lin et al. 2024 ("Common diffusion noise schedules and sample
    steps are flawed", Table 2), as in diffusers:
      leading:  t_i = i * (T // n) + offset, i = n-1..0  (SD 1.x uses offset 1: 981..1 for n=50)
      trailing: t_i = round(T - i * T / n) - 1            (ends at T-1)
      linspace: round(linspace(0, T-1, n)), reversed.
    """
    T, n = num_train_timesteps, num_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_steps must be in 1..{T}, got {n}")
    if spacing == "leading":
        ratio = T // n
        ts = torch.arange(n, dtype=torch.float64).mul(ratio).round() + steps_offset
        ts = ts.flip(0)
    elif spacing == "trailing":
        ts = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; use leading, trailing or linspace")
    return ts.long()


def prev_alpha_bar(
    alphas_cumprod_: torch.Tensor, t_prev: int, final_alpha_bar: float | None = None
) -> torch.Tensor:
    """alpha_bar at the next (lower) timestep; t_prev < 0 means "past the last step".

    Past the last step DDIM uses alpha_bar = 1 (``set_alpha_to_one``) or alpha_bar_0;
    pass ``final_alpha_bar`` to choose (default: alpha_bar_0, SD's setting).
    """
    if t_prev >= 0:
        return alphas_cumprod_[t_prev]
    if final_alpha_bar is None:
        return alphas_cumprod_[0]
    return torch.as_tensor(final_alpha_bar, dtype=alphas_cumprod_.dtype, device=alphas_cumprod_.device)
