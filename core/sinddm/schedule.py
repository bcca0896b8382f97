"""SinDDM's noise schedule, per-scale start steps T[s] and blur weights gamma_t^s.

* alpha_bar_t: cosine schedule (Nichol & Dhariwal eq. 17) with T = 100 steps.
* sigma_t = sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t), the noise-to-signal ratio.
* T[0] = T; for s >= 1, T[s] = the first t with sigma_t > c * L_s (paper Sec. 3: the
  noise re-injected at scale s is proportional to the detail missing from the blurry
  reference; L_s from :mod:`core.sinddm.pyramid`, c = ``loss_factor`` = 1).  Like the
  official ``np.argmax``, T[s] = 0 when no t qualifies or when already sigma_0 > c L_s.
* gamma_t^s = clamp(sigma_t / (c L_s), 0, 1) (paper App. D) is used in training
  (eq. 1 / Alg. 1); sampling clamps it to [0, 0.55] as the official sampler does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion import alphas_cumprod, cosine_betas, noise_to_signal

NUM_TIMESTEPS = 100
SAMPLE_GAMMA_MAX = 0.55


def start_steps(errors: tuple[float, ...] | list[float], sigma: torch.Tensor, loss_factor: float = 1.0) -> list[int]:
    """[T, T[1], ..., T[N-1]]: first t with sigma_t > loss_factor * L_s (0 if none)."""
    out = [len(sigma)]
    for err in errors:
        above = (sigma > loss_factor * err).nonzero()
        out.append(int(above[0]) if len(above) else 0)
    return out


@dataclass(frozen=True)
class MultiScaleSchedule:
    alphas_cumprod: torch.Tensor  # float64 [T]
    sigma: torch.Tensor  # float64 [T]
    start_steps: tuple[int, ...]  # T[s], s = 0..N-1
    gammas: torch.Tensor  # float64 [N, T]; row 0 is all zeros (no blur at the coarsest scale)

    @classmethod
    def build(cls, errors, num_timesteps: int = NUM_TIMESTEPS, loss_factor: float = 1.0,
              start_override: list[int] | tuple[int, ...] | None = None) -> "MultiScaleSchedule":
        ab = alphas_cumprod(cosine_betas(num_timesteps))
        sigma = noise_to_signal(ab)
        gam = torch.zeros(len(errors) + 1, num_timesteps, dtype=torch.float64)
        for s, err in enumerate(errors, start=1):
            gam[s] = (sigma / (loss_factor * err)).clamp(0, 1)
        steps = start_steps(errors, sigma, loss_factor)
        if start_override is not None:
            if len(start_override) != len(steps) - 1:
                raise ValueError(f"start_steps: give one value per scale above the coarsest ({len(steps) - 1}), "
                                 f"got {len(start_override)}")
            if any(not 0 <= int(v) < num_timesteps for v in start_override):
                raise ValueError(f"start_steps: values must be in 0..{num_timesteps - 1}")
            steps = [steps[0], *[int(v) for v in start_override]]
        return cls(ab, sigma, tuple(steps), gam)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def gamma_train(self, s: int, t: torch.Tensor) -> torch.Tensor:
        """gamma_t^s for training, per sample: t [B] -> [B] (float32)."""
        return self.gammas[s].to(t.device)[t].float()

    def gamma_sample(self, s: int, t: int) -> float:
        """gamma_t^s at sampling time: clamped to [0, 0.55] (official sampler)."""
        if s == 0 or t < 0:
            return 0.0
        return float(self.gammas[s, t].clamp(0, SAMPLE_GAMMA_MAX))
