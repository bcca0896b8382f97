"""SinDDM's sampler step by step against the OFFICIAL sampler's recorded trajectories.

tests/data/sinddm_official_refine.json was written by
tests/reference/make_sinddm_refine_reference.py, which ran the official
MultiScaleGaussianDiffusion (fallenshock/SinDDM @ e7107d9) with a fixed tiny denoiser on
fixed inputs and fixed noise.  Here the pack's sampler (``_Sampler.refine`` and
``_Sampler.coarsest`` of core/sinddm/sample.py) gets the same denoiser, inputs and noise,
and every step is compared: the t and s given to the denoiser (start at T[s] with the
official off-by-one), x_t, the deblurred estimate x0_hat, the gamma each step used (the
0.55 clamp), the DDPM posterior under guidance, the gamma = 0 injection and the final sample.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from reference.make_sinddm_refine_reference import OUT, ToyDenoiser, load_reference

from core.sinddm import SinDDM
from core.sinddm.guidance import Guidance
from core.sinddm.pyramid import upsample
from core.sinddm.sample import _Sampler
from core.sinddm.schedule import SAMPLE_GAMMA_MAX, MultiScaleSchedule

REF = load_reference(OUT)
ATOL = RTOL = 1e-5


class _Record(Guidance):
    """A guidance that changes nothing and records the x0_hat it is given, per step."""

    def __init__(self, ddpm: bool):
        self.needs_ddpm = ddpm
        self.seen: list[tuple[int, int, torch.Tensor]] = []

    def apply(self, x0, s, t, sampler):
        self.seen.append((s, t, x0.clone()))
        return x0


class _FixedNoise:
    """Stands in for the per-sample noise streams: hands out the stored tensors in order."""

    def __init__(self, tensors):
        self.tensors, self.used = tensors, 0

    def __call__(self, shape):
        z = self.tensors[self.used]
        assert tuple(z.shape[1:]) == tuple(shape)
        self.used += 1
        return z.clone()


def run_ours(case):
    net = ToyDenoiser(REF["weight"], REF["bias"]).eval()
    T = case["num_timesteps"]
    sch = MultiScaleSchedule.build(REF["errors"] if case["mode"] != "coarsest" else [], num_timesteps=T)
    rec = _Record(ddpm=case["mode"] == "ddpm")
    smp = _Sampler(SinDDM(net, None, sch), torch.device("cpu"), [rec], None, None, T)
    noise = _FixedNoise(case["noise"])
    s, size = case["s"], tuple(case["size"])
    if case["mode"] == "coarsest":
        out, x_tilde = smp.coarsest((REF["batch"], 3, *size), noise), None
    else:
        x_tilde = upsample(case["x_in"], size)
        t_start = case["t_start"] if case["t_start"] is not None else sch.start_steps[s]
        out = smp.refine(x_tilde, s, t_start, noise, zero_gamma=case["mode"] == "inject")
    return sch, net.calls, rec.seen, noise.used, x_tilde, out


def close(a, b):
    return torch.allclose(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", sorted(REF["cases"]))
def test_sampler_matches_the_official_sampler_step_by_step(name):
    case = REF["cases"][name]
    off = case["official"]
    sch, calls, seen, noise_used, x_tilde, out = run_ours(case)
    s = case["s"]

    # the same schedule start, and the same (t, s) sequence given to the denoiser: T[s] - 1 .. 0
    if case["mode"] != "coarsest":
        assert list(sch.start_steps) == off["start_steps"]
    assert [(t, ss) for t, ss, _ in calls] == [(st["t"], st["s"]) for st in off["steps"]]
    assert calls[0][0] == off["t_start"] - 1
    if x_tilde is not None:  # bilinear upsampling of the coarser sample = the official x~
        assert close(x_tilde, off["x_tilde"])

    for k, ((t, _, x_t), (_, _, x0), st) in enumerate(zip(calls, seen, off["steps"])):
        assert close(x_t, st["x_t"]), f"{name}: x_t differs at step {k} (t={t})"
        want_x0 = st["x0_hat"].clamp(-1, 1) if case["mode"] == "ddpm" else st["x0_hat"]
        assert close(x0, want_x0), f"{name}: x0_hat differs at step {k} (t={t})"
        if case["mode"] == "ddim":
            # the gamma used, read back from the step: x_mix_hat - x0 = g (x~ - x0)
            ab = sch.alphas_cumprod[t]
            x_mix_hat = (x_t.double() - (1 - ab).sqrt() * ToyDenoiser(REF["weight"], REF["bias"])(
                x_t, torch.full((x_t.shape[0],), t), torch.full((x_t.shape[0],), s)).double()) / ab.sqrt()
            d = x_tilde.double() - x0.double()
            g = float(((x_mix_hat - x0.double()) * d).sum() / (d * d).sum())
            assert g == pytest.approx(st["gamma_t"], abs=1e-5)
            assert sch.gamma_sample(s, t) == pytest.approx(st["gamma_t"], abs=1e-7)
            assert sch.gamma_sample(s, t - 1) == pytest.approx(st["gamma_prev"], abs=1e-7)
    assert len(calls) == len(seen) == len(off["steps"])
    assert close(out, off["final"]), f"{name}: final sample differs"

    # noise: one tensor for the start, then one per stochastic step (none in the deblurring DDIM mode)
    stochastic = case["mode"] in ("ddpm", "coarsest")
    assert noise_used == (1 + len(off["steps"]) - 1 if stochastic else 1)


def test_the_reference_exercises_the_gamma_clamp_and_its_release():
    """The stored DDIM cases cover both sides of the 0.55 clamp, so the comparison above can see it."""
    gammas = [st["gamma_t"] for st in REF["cases"]["ddim_s1"]["official"]["steps"]]
    assert gammas[0] == pytest.approx(SAMPLE_GAMMA_MAX) and 0 < gammas[-1] < 0.2
    sch = MultiScaleSchedule.build(REF["errors"])
    assert float(sch.gammas[1, 10]) > 0.9  # unclamped training gamma, far above what sampling uses


def test_a_wrong_gamma_or_start_would_be_detected():
    """Control: the comparison fails when the sampler's gamma clamp or start step is changed."""
    case = REF["cases"]["ddim_s1"]
    off = case["official"]
    net = ToyDenoiser(REF["weight"], REF["bias"]).eval()
    sch = MultiScaleSchedule.build(REF["errors"])
    x_tilde = upsample(case["x_in"], tuple(case["size"]))

    smp = _Sampler(SinDDM(net, None, sch), torch.device("cpu"), [], None, None, 100)
    assert close(smp.refine(x_tilde, 1, off["t_start"], _FixedNoise(case["noise"])), off["final"])
    assert not close(smp.refine(x_tilde, 1, off["t_start"] + 1, _FixedNoise(case["noise"])), off["final"])
    smp.sch = SimpleNamespace(gamma_sample=lambda s, t: 0.0 if t < 0 else float(sch.gammas[s, t]))  # no clamp
    assert not close(smp.refine(x_tilde, 1, off["t_start"], _FixedNoise(case["noise"])), off["final"])
