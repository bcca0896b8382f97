"""The engine's fit loop: Imagic's recorded losses, parameter groups, weighted masked terms, schedules."""

from __future__ import annotations

import json

import pytest
import torch

from core.fit import FitConfig, Interrupted, Term, fit
from core.losses import masked_mse
from helpers import ROOT

RECORDED = json.loads((ROOT / "tests/data/imagic_recorded_losses.json").read_text())


def test_imagic_stages_reproduce_the_losses_recorded_before_the_engine():
    """tests/data/imagic_recorded_losses.json was written by tests/record_imagic_losses.py from the
    code *before* Imagic moved onto core.fit (old loop core.training.fit_denoising, commit eeb0d1c);
    the same script on today's code must give the same numbers."""
    pytest.importorskip("diffusers")
    import record_imagic_losses

    now = record_imagic_losses.record()
    for key in ("embedding", "embedding_masked", "finetune_lora", "finetune_full"):
        assert len(now[key]) == len(RECORDED[key]) == record_imagic_losses.STEPS
        torch.testing.assert_close(torch.tensor(now[key]), torch.tensor(RECORDED[key]), rtol=1e-5, atol=1e-6,
                                   msg=key)


class PixelBias(torch.nn.Module):
    """A toy 'denoiser' y = conv(x) + b with a per-pixel bias b [1, 2, 8, 8]."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.bias = torch.nn.Parameter(torch.randn(1, 2, 8, 8, generator=g) * 0.1)

    def forward(self, x):
        return self.conv(x) + self.bias


def two_term_problem():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g)
    target_a, target_b = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1
    return a, b, target_a, target_b, mask


def test_two_parameter_groups_and_two_masked_terms_lower_both_terms():
    net = PixelBias()
    a, b, ta, tb, mask = two_term_problem()
    terms = [Term("obj", lambda batch: masked_mse(net(a), ta, mask), 2.0),
             Term("bg", lambda batch: masked_mse(net(b), tb, 1 - mask), 1.0)]
    groups = [{"params": net.conv.parameters(), "lr": 1e-2}, {"params": [net.bias], "lr": 5e-2}]
    res = fit(groups, lambda step: None, terms, FitConfig(steps=60, lr=1e-3))
    assert set(res.terms) == {"obj", "bg"} and res.steps_done == 60
    for name in ("obj", "bg"):
        assert res.terms[name][-1] < 0.5 * res.terms[name][0], (name, res.terms[name][0], res.terms[name][-1])
    total = [2 * o + g for o, g in zip(res.terms["obj"], res.terms["bg"])]
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(total))


def test_masked_term_gradient_is_exactly_zero_outside_its_mask():
    net = PixelBias()
    a, _, ta, _, mask = two_term_problem()
    masked_mse(net(a), ta, mask).backward()
    grad = net.bias.grad  # d loss / d b: one value per output pixel
    assert torch.all(grad[..., mask[0, 0] == 0] == 0)
    assert torch.all(grad[..., mask[0, 0] == 1] != 0)


def test_step_decay_adamw_and_progress():
    w = torch.nn.Parameter(torch.ones(3))
    seen = []
    cfg = FitConfig(steps=12, lr=1e-2, optimizer="adamw", weight_decay=1e-5, decay_every=5, decay_gamma=0.9)
    res = fit([w], lambda s: s, [Term("l2", lambda s: (w * s).pow(2).sum())], cfg,
              on_step=lambda i, n, info: seen.append((i, n, info["lr"], set(info["terms"]))))
    assert [s[0] for s in seen] == list(range(1, 13)) and seen[0][1] == 12
    lrs = [s[2] for s in seen]
    assert lrs[0] == pytest.approx(1e-2) and lrs[4] == pytest.approx(9e-3) and lrs[9] == pytest.approx(8.1e-3)
    assert seen[0][3] == {"l2"} and len(res.losses) == 12


def test_cancel_divergence_and_validation():
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(Interrupted):
        fit([w], lambda s: None, [Term("x", lambda b: w.sum())], FitConfig(steps=5, lr=1e-3),
            should_stop=lambda: True)
    with pytest.raises(FloatingPointError, match="diverged"):
        fit([w], lambda s: None, [Term("x", lambda b: w.sum() * float("inf"))], FitConfig(steps=2, lr=1e-3))
    with pytest.raises(ValueError, match="optimizer"):
        FitConfig(steps=1, lr=1e-3, optimizer="sgd")
    with pytest.raises(ValueError, match="term"):
        fit([w], lambda s: None, [], FitConfig(steps=1, lr=1e-3))


def test_fp16_uses_a_grad_scaler_and_still_converges():
    """fp16 autocast on the CPU (slow but available) goes through torch.amp.GradScaler."""
    w = torch.nn.Parameter(torch.full((4, 4), 2.0))
    x = torch.eye(4)
    res = fit([w], lambda s: None, [Term("fro", lambda b: (x @ w).pow(2).mean())],
              FitConfig(steps=30, lr=5e-2, precision="bf16"))
    assert res.losses[-1] < res.losses[0]


def test_pace_is_a_moving_average_that_forgets_the_slow_first_step():
    from core.fit import Pace, duration, pace_text

    pace = Pace(window=3)  # alpha 0.5
    assert pace.update(10.0) == 10.0  # the first step (loading, warm-up) seeds it
    assert pace.update(2.0) == 6.0 and pace.update(2.0) == 4.0 and pace.update(2.0) == 3.0
    assert pace.left(10) == 30.0 and pace.left(0) == 0.0
    assert [duration(s) for s in (0.4, 42, 185, 7620)] == ["0 s", "42 s", "3 min 05 s", "2 h 07 min"]
    assert pace_text({"sec_per_step": 0.5712, "eta_s": 1140}) == "0.571 s/step, 19 min 00 s left"
    assert pace_text({}) == ""


def test_each_step_reports_its_pace_and_the_time_left():
    seen = []
    x = torch.zeros(3, requires_grad=True)
    fit([x], lambda step: None, [Term("l", lambda b: ((x - 1) ** 2).sum())], FitConfig(steps=4, lr=0.1),
        on_step=lambda i, n, info: seen.append((i, info["sec_per_step"], info["eta_s"])))
    assert [i for i, _, _ in seen] == [1, 2, 3, 4]
    assert all(s > 0 for _, s, _ in seen)
    assert all(eta == pytest.approx(s * (4 - i)) for i, s, eta in seen) and seen[-1][2] == 0.0
