"""The tiny pixel DDPM trained in the test tier (tests/tiny_pixel_ddpm.py) is a usable diffusion model.

It is trained once per session on real crops (about a minute on two cores) and cached
as safetensors, so reruns load it.  The checks: it has learnt to denoise held-out crops
(eps-MSE far below the untrained network's), DDIM round trips improve with more steps,
and a second call loads the cached weights instead of training.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

import tiny_pixel_ddpm  # noqa: E402
from pixel_data import real_crops  # noqa: E402
from tiny_pixel_ddpm import (  # noqa: E402
    cache_dir,
    ddim_reconstruct,
    eps_mse,
    trained_tiny_ddpm,
    untrained_tiny_ddpm,
)

from core.rectifier.metrics import reconstruction_report  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crops() -> tuple[torch.Tensor, torch.Tensor]:
    return real_crops()  # train [48, 3, 16, 16], held-out [16, 3, 16, 16]


@pytest.fixture(scope="module")
def model(crops):
    return trained_tiny_ddpm(crops[0])


def test_trained_model_denoises_held_out_crops(model, crops):
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())
    held = crops[1]
    trained, untrained = eps_mse(model, held), eps_mse(untrained_tiny_ddpm(), held)
    assert trained < 0.5 * untrained, (trained, untrained)
    assert trained < 0.2, trained  # a real denoiser, not just a smaller output scale


def test_ddim_round_trip_improves_with_steps(model, crops):
    held = crops[1]
    few = reconstruction_report(held, ddim_reconstruct(model, held, steps=5))
    many_recon = ddim_reconstruct(model, held, steps=50)
    many = reconstruction_report(held, many_recon)
    assert many_recon.shape == held.shape and 0 <= many_recon.min() and many_recon.max() <= 1
    assert many["l1"] < few["l1"], (few, many)
    assert many["l1"] < 0.08 and many["ssim"] > 0.7, many  # looks like the crop, not like noise


def test_second_call_loads_the_cache_and_gives_identical_eps(model, crops, monkeypatch):
    folder = cache_dir(crops[0])
    if not folder.is_dir():
        pytest.skip(f"the cache folder {folder} could not be written")
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(tiny_pixel_ddpm, "train_tiny_ddpm", no_training)
    again = trained_tiny_ddpm(crops[0])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 16, 16, generator=g)  # [B, 3, H, W]
    t = torch.tensor([0, 250, 600, 999])
    with torch.no_grad():
        assert torch.equal(model.eps(x, t), again.eps(x, t))
    assert torch.equal(model.alphas_cumprod, again.alphas_cumprod)
