"""core.diffusion against diffusers' DDIMScheduler / DDPMScheduler on identical inputs.

Tolerance: diffusers works in float32 throughout; core keeps the schedule in float64
and casts at the end, so results agree to float32 rounding: atol 1e-5 on unit-scale
tensors, rtol 1e-6 on the schedule.
"""

from __future__ import annotations

import math

import pytest
import torch

from core import diffusion as D

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5


def sd_ddim(**kw):
    return diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, **kw,
    )


def test_scaled_linear_schedule_matches_diffusers():
    ref = sd_ddim().alphas_cumprod.double()
    ours = D.sd_alphas_cumprod()
    assert ours.shape == (1000,)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert ours[0] == pytest.approx(1 - 0.00085)


def test_cosine_schedule_matches_diffusers_and_paper():
    ref = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2").betas.double()
    ours = D.cosine_betas(100)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    # alpha_bar(t) = f(t+1)/f(0) with f = cos^2((t/T + s)/(1+s) pi/2) (Nichol & Dhariwal eq. 17)
    f = lambda t: math.cos((t / 100 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab = D.alphas_cumprod(ours)
    assert ab[49].item() == pytest.approx(f(50) / f(0), rel=1e-9)
    assert ours.max() <= 0.999


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 10, 50, 999])
def test_timestep_spacings_match_diffusers(spacing, n):
    s = sd_ddim(timestep_spacing=spacing)
    s.set_timesteps(n)
    ours = D.timesteps(1000, n, spacing, steps_offset=1 if spacing == "leading" else 0)
    assert ours.tolist() == s.timesteps.tolist()


def test_timesteps_rejects_bad_counts():
    with pytest.raises(ValueError, match="num_steps"):
        D.timesteps(1000, 0)
    with pytest.raises(ValueError, match="spacing"):
        D.timesteps(1000, 10, "cosine")  # type: ignore[arg-type]


def test_q_sample_and_tweedie_roundtrip_match_diffusers():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    s = sd_ddim()
    ref = s.add_noise(x0, eps, t)
    ab = D.sd_alphas_cumprod()[t]
    x_t = D.q_sample(x0, ab, eps)
    torch.testing.assert_close(x_t, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(D.predict_x0(x_t, eps, ab), x0, atol=1e-3, rtol=0)
    torch.testing.assert_close(D.predict_eps(x_t, x0, ab), eps, atol=1e-3, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_loop_matches_diffusers(eta):
    """A 10-step DDIM loop with a fixed pseudo-model gives diffusers' samples."""
    g = torch.Generator().manual_seed(1)
    x_ref = torch.randn(2, 4, 8, 8, generator=g)
    noises = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(10)]
    model = lambda x, t: torch.tanh(x) * (t / 1000.0) + 0.1  # noqa: E731  deterministic "eps"

    s = sd_ddim()
    s.set_timesteps(10)
    x = x_ref.clone()
    for i, t in enumerate(s.timesteps):
        x = s.step(model(x, t), t, x, eta=eta, variance_noise=noises[i]).prev_sample

    ab = D.sd_alphas_cumprod()
    ts = D.timesteps(1000, 10, "leading", steps_offset=1)
    y = x_ref.clone()
    for i, t in enumerate(ts.tolist()):
        t_prev = t - 1000 // 10
        y = D.ddim_step(y, model(y, t), ab[t], D.prev_alpha_bar(ab, t_prev), eta=eta, noise=noises[i])
    torch.testing.assert_close(y, x, atol=ATOL * 10, rtol=1e-5)
    assert not torch.allclose(y, x_ref)


@pytest.mark.parametrize("who", ["sd", "rectifier"])
def test_the_one_ddim_loop_takes_the_spacing_and_matches_diffusers(who):
    """core.sampling.ddim_loop is the one DDIM loop: SD's settings (leading, offset 1, alpha_bar_0 past the last
    step: Imagic, SINE, LayerDiffusion) and the rectifier's (trailing, alpha_bar = 1 past the last step:
    core.rectifier.sample.ddim_sample) each give diffusers' DDIMScheduler samples in that configuration."""
    from core.rectifier.sample import ddim_sample as rectifier_ddim
    from core.sampling import ddim_loop

    x_ref = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    model = lambda x, t: torch.tanh(x) * (float(t) / 1000.0) + 0.1  # noqa: E731
    s = sd_ddim() if who == "sd" else diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    s.set_timesteps(10)
    x = x_ref.clone()
    for t in s.timesteps:
        x = s.step(model(x, t), t, x).prev_sample
    ab = D.sd_alphas_cumprod()
    if who == "sd":
        y = ddim_loop(lambda x, t, i: model(x, t[0]), x_ref, ab, 10)
    else:
        y = rectifier_ddim(lambda x, t: model(x, t[0]), x_ref, ab, 10)
    torch.testing.assert_close(y, x, atol=ATOL * 10, rtol=1e-5)
    assert not torch.allclose(y, x_ref)


def test_the_rectifiers_inversion_retraces_its_sampling():
    """With an eps that does not depend on x, DDIM inversion then sampling over the same timesteps is exact: the
    inversion starts where sampling ends (alpha_bar = 1) and visits the same levels."""
    from core.rectifier.sample import ddim_invert, ddim_sample

    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    const = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    eps = lambda x, t: const * (1 + float(t[0]) / 1000.0)  # noqa: E731
    ab = D.sd_alphas_cumprod()
    x_T = ddim_invert(eps, x0, ab, 7)
    assert (x_T - x0).abs().max() > 0.5
    torch.testing.assert_close(ddim_sample(eps, x_T, ab, 7), x0, atol=1e-5, rtol=1e-5)


def test_ddpm_loop_matches_diffusers():
    """DDPM ancestral sampling on a strided schedule (20 of 1000 steps, "fixed small"
    variance), diffusers and core drawing the same noise at every step."""
    s = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                beta_start=0.00085, beta_end=0.012, clip_sample=False)
    s.set_timesteps(20)
    ts = s.timesteps.tolist()
    ab = D.sd_alphas_cumprod()
    x = y = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    model = lambda x, t: 0.5 * x + 0.01 * (t / 1000.0)  # noqa: E731
    for i, t in enumerate(ts):
        x = s.step(model(x, t), t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(100 + i)) if t > 0 else None
        y = D.ddpm_step(y, model(y, t), ab[t], D.prev_alpha_bar(ab, t_prev, final_alpha_bar=1.0), noise=noise)
    torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)


def test_ddpm_posterior_variance_matches_diffusers():
    s = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                beta_start=0.00085, beta_end=0.012, clip_sample=False)
    s.set_timesteps(50)
    ab = D.sd_alphas_cumprod()
    ts = s.timesteps.tolist()
    x = torch.zeros(1, 1, 1, 1)
    for i in (0, 10, 48):
        _, var = D.ddpm_posterior(x, x, ab[ts[i]], ab[ts[i + 1]])
        # beta_t = 1 - ab_t / ab_prev cancels digits in diffusers' float32: 1e-4 relative
        assert var.item() == pytest.approx(s._get_variance(ts[i]).item(), rel=1e-4)


def test_per_sample_alpha_bar_broadcasts():
    x0 = torch.ones(2, 1, 2, 2)
    eps = torch.zeros(2, 1, 2, 2)
    x_t = D.q_sample(x0, torch.tensor([0.25, 1.0]), eps)
    assert x_t[0].unique().item() == pytest.approx(0.5)
    assert x_t[1].unique().item() == pytest.approx(1.0)


def test_ddim_step_eta_needs_noise():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="noise"):
        D.ddim_step(x, x, 0.5, 0.9, eta=1.0)
