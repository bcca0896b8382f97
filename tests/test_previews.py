"""Previews while training (core.previews): the model's one-step x0 of the training latent at fixed t, shown every N
steps; they never change what is trained."""

from __future__ import annotations

import pytest
import torch

from core.diffusion import predict_x0, q_sample
from core.imagic import FineTuneConfig, finetune
from core.previews import Previews, one_step_x0
from tiny_sd import tiny_sd_model


@pytest.fixture(scope="module")
def tiny():
    model = tiny_sd_model(0)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    return model, latent, model.encode_text(["a photo of a dog"])


def test_previews_show_the_fine_tuned_models_one_step_x0_and_change_nothing(tiny):
    model, latent, cond = tiny
    cfg = FineTuneConfig(steps=6, lr=1e-2, seed=1)
    shown = []
    with_previews = finetune(model, latent, cond, cfg,
                             previews=Previews(4, lambda step, x0: shown.append((step, x0)), timesteps=(100, 900)))
    without = finetune(model, latent, cond, cfg)
    assert with_previews.losses == without.losses
    assert all(torch.equal(with_previews.deltas[k], without.deltas[k]) for k in without.deltas)
    assert [s for s, _ in shown] == [4, 6] and shown[0][1].shape == (2, 4, 16, 16)
    # the last preview is x0_hat of the fine-tuned model, computed here from its own eps at the same noise and t
    eps = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 900])
    a = model.alphas_cumprod[t].float()
    x_t = q_sample(latent.expand(2, -1, -1, -1), a, eps)
    with model.adapted(without.weight_functions()) as m, torch.no_grad():
        want = predict_x0(x_t, m.eps(x_t, t, cond.expand(2, -1, -1)), a)
    with torch.no_grad():
        base = predict_x0(x_t, model.eps(x_t, t, cond.expand(2, -1, -1)), a)
    torch.testing.assert_close(shown[-1][1], want, rtol=1e-4, atol=1e-4)
    assert (shown[-1][1] - base).abs().max() > 1e-2  # training moved it: the preview shows the tuned model


def test_one_step_x0_is_the_image_when_the_model_predicts_the_noise():
    latent = torch.randn(1, 4, 8, 8)
    ab = torch.linspace(0.99, 0.01, 1000)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn((3, 4, 8, 8), generator=g)
    x0 = one_step_x0(lambda x_t, t, c: eps, latent, None, ab, (10, 500, 990))
    torch.testing.assert_close(x0, latent.expand(3, -1, -1, -1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="preview interval"):
        Previews(-1, print)


def test_embedding_previews_use_the_current_embedding_and_change_nothing(tiny):
    from core.imagic import EmbeddingConfig, optimize_embedding

    model, latent, e_tgt = tiny
    cfg = EmbeddingConfig(steps=5, lr=5e-2, seed=2)
    shown = []
    on = optimize_embedding(model, latent, e_tgt, cfg, previews=Previews(5, lambda s, x0: shown.append(x0),
                                                                         timesteps=(700,)))
    off = optimize_embedding(model, latent, e_tgt, cfg)
    assert torch.equal(on.e_opt, off.e_opt) and on.losses == off.losses
    want = one_step_x0(model.eps, latent, off.e_opt, model.alphas_cumprod, (700,))  # at e_opt, not at e_tgt
    torch.testing.assert_close(shown[-1], want, rtol=1e-4, atol=1e-4)
    assert (shown[-1] - one_step_x0(model.eps, latent, e_tgt, model.alphas_cumprod, (700,))).abs().max() > 1e-3


def test_layerdiffusion_finetune_previews_change_nothing(tiny):
    from core.layerdiffusion import LayeredFineTuneConfig, finetune_layered

    model, latent, e_opt = tiny
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1
    cfg = LayeredFineTuneConfig(steps=4, lr=1e-2, seed=3)
    shown = []
    on = finetune_layered(model, latent, latent.flip(-1), e_opt, mask, 1 - mask, cfg,
                          previews=Previews(2, lambda s, x0: shown.append(s)))
    off = finetune_layered(model, latent, latent.flip(-1), e_opt, mask, 1 - mask, cfg)
    assert shown == [2, 4] and on.losses == off.losses and on.terms == off.terms
    assert all(torch.equal(on.deltas[k], off.deltas[k]) for k in off.deltas)


@pytest.mark.parametrize("patches", [False, True])
def test_sine_finetune_previews_change_nothing(tiny, patches):
    """Whole image, or one fixed crop with its positional map: the patch crops of training are untouched."""
    from core.sine import PatchConfig, SineFineTuneConfig, finetune_sine

    model, _, cond = tiny
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    cfg = SineFineTuneConfig(steps=4, lr=5e-3, patches=patches, patch=PatchConfig(high_resolution=64, size=32), seed=2)
    shown = []
    on = finetune_sine(model, image, cond, cfg, previews=Previews(2, lambda s, x0: shown.append(x0.shape)))
    off = finetune_sine(model, image, cond, cfg)
    side = 4 if patches else 8  # the 32 x 32 crop's latent, or the 64 x 64 image's
    assert shown == [(3, 4, side, side)] * 2 and on.losses == off.losses
    assert all(torch.equal(on.deltas[k], off.deltas[k]) for k in off.deltas)


@pytest.mark.parametrize("reading", ["concat", "separate_reference"])
def test_layerdiffusion_embedding_previews_show_each_trained_prediction_and_change_nothing(tiny, reading):
    """concat: x0_hat of the joint prediction at [e^_a, e^_b]; separate_reference: e^_a's of the image, then e^_b's
    of the reference, computed here from separate model calls at the returned embeddings."""
    from core.layerdiffusion import LayerEmbeddingConfig, optimize_layers

    model, latent, e_a = tiny
    e_b = model.encode_text(["a sunny beach"])
    ref = latent.flip(-1) * 0.5
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    cfg = LayerEmbeddingConfig(steps=4, lr=5e-2, reading=reading, seed=5)
    shown = []
    kw = dict(reference_latent=ref, reference_mask=torch.zeros_like(mask))
    on = optimize_layers(model, latent, e_a, e_b, mask, cfg, **kw,
                         previews=Previews(4, lambda s, x0: shown.append(x0), timesteps=(300, 800)))
    off = optimize_layers(model, latent, e_a, e_b, mask, cfg, **kw)
    assert torch.equal(on.e_a, off.e_a) and torch.equal(on.e_b, off.e_b) and on.losses == off.losses
    ab, ts = model.alphas_cumprod, (300, 800)
    if reading == "concat":
        want = one_step_x0(model.eps, latent, torch.cat([off.e_a, off.e_b], dim=1), ab, ts)
    else:
        want = torch.cat([one_step_x0(model.eps, latent, off.e_a, ab, ts), one_step_x0(model.eps, ref, off.e_b, ab, ts)])
    assert len(shown) == 1
    torch.testing.assert_close(shown[0], want, rtol=1e-4, atol=1e-4)
