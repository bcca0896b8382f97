"""Reconstruction metrics of the rectifier's evaluation (core.rectifier.metrics): L1, L2 and SSIM.

SSIM is checked against scikit-image's ``structural_similarity`` with the settings of
Wang et al. 2004 (Gaussian window, sigma 1.5, population covariances), on random images
and on real crops of scikit-image's sample images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.rectifier.metrics import effective_window, l1, l2, reconstruction_report, ssim

skmetrics = pytest.importorskip("skimage.metrics")


def reference_ssim(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5, data_range: float = 1.0) -> np.ndarray:
    """scikit-image's SSIM per image of [B, C, H, W] tensors (channel axis 0 of each image)."""
    return np.array([
        skmetrics.structural_similarity(x.double().numpy(), y.double().numpy(), gaussian_weights=True, sigma=sigma,
                                        use_sample_covariance=False, data_range=data_range, channel_axis=0)
        for x, y in zip(a, b)
    ])


def noisy(x: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (2, 3, 20, 27), (1, 3, 11, 40)])
def test_ssim_matches_skimage_on_random_images(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.rand(shape, generator=g, dtype=dtype)  # [B, 3, H, W]
    for b in (noisy(a, 0.05, 1), noisy(a, 0.3, 2), torch.rand(shape, generator=g, dtype=dtype)):
        got = ssim(a, b)
        assert got.shape == (shape[0],) and got.dtype == dtype
        np.testing.assert_allclose(got.double().numpy(), reference_ssim(a, b), atol=1e-4, rtol=0)


def test_ssim_matches_skimage_on_real_crops():
    from pixel_data import real_crops

    train, held = real_crops(size=16, n_train=10, n_held=10, seed=3)  # [10, 3, 16, 16] each
    blurred = torch.nn.functional.avg_pool2d(train, 3, stride=1, padding=1, count_include_pad=False)
    for a, b in ((train, held), (train, noisy(train, 0.05, 4)), (train, blurred), (train, train.flip(-1))):
        np.testing.assert_allclose(ssim(a, b).double().numpy(), reference_ssim(a, b), atol=1e-4, rtol=0)
    large, _ = real_crops(size=40, n_train=3, n_held=0, seed=5)  # [3, 3, 40, 40]
    np.testing.assert_allclose(ssim(large, noisy(large, 0.1, 6)).double().numpy(),
                               reference_ssim(large, noisy(large, 0.1, 6)), atol=1e-4, rtol=0)


def test_ssim_data_range_matches_skimage():
    g = torch.Generator().manual_seed(8)
    a = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1  # [-1, 1]
    b = (a + 0.2 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    np.testing.assert_allclose(ssim(a, b, data_range=2.0).numpy(), reference_ssim(a, b, data_range=2.0), atol=1e-4)


def test_small_images_shrink_the_window_to_their_smaller_side():
    assert effective_window(11, 7, 9) == 7 and effective_window(11, 8, 30) == 7 and effective_window(11, 64, 64) == 11
    g = torch.Generator().manual_seed(9)
    a = torch.rand(2, 3, 7, 9, generator=g, dtype=torch.float64)
    b = noisy(a, 0.1, 10)
    got = ssim(a, b)
    torch.testing.assert_close(got, ssim(a, b, window=7))
    # skimage with sigma 0.8 uses a 7-tap window (radius int(3.5 * 0.8 + 0.5) = 3): the same computation
    np.testing.assert_allclose(ssim(a, b, sigma=0.8).numpy(), reference_ssim(a, b, sigma=0.8), atol=1e-4)
    assert torch.isfinite(got).all() and (got < 1).all()
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))


def test_identical_images_are_perfect():
    g = torch.Generator().manual_seed(11)
    a = torch.rand(4, 3, 16, 16, generator=g)
    torch.testing.assert_close(ssim(a, a.clone()), torch.ones(4), atol=1e-6, rtol=0)
    assert torch.equal(l1(a, a.clone()), torch.zeros(4)) and torch.equal(l2(a, a.clone()), torch.zeros(4))
    assert reconstruction_report(a, a.clone()) == pytest.approx({"l1": 0.0, "l2": 0.0, "ssim": 1.0}, abs=1e-6)


def test_l1_l2_are_per_image_means():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.zeros(2, 3, 4, 4)
    b[0] = 0.5  # every pixel off by 0.5
    b[1, 0, 0, 0] = 1.0  # one of 48 values off by 1
    torch.testing.assert_close(l1(a, b), torch.tensor([0.5, 1 / 48]))
    torch.testing.assert_close(l2(a, b), torch.tensor([0.25, 1 / 48]))
    report = reconstruction_report(a, b)
    assert set(report) == {"l1", "l2", "ssim"} and all(isinstance(v, float) for v in report.values())
    assert report["l1"] == pytest.approx((0.5 + 1 / 48) / 2) and report["l2"] == pytest.approx((0.25 + 1 / 48) / 2)


def test_bad_shapes_and_arguments_raise_naming_the_argument():
    a = torch.rand(2, 3, 16, 16)
    for fn in (l1, l2, ssim):
        with pytest.raises(ValueError, match=r"\bb\b.*\(2, 3, 16, 8\)"):
            fn(a, torch.rand(2, 3, 16, 8))
        with pytest.raises(ValueError, match=r"^a must have shape \[B, C, H, W\]"):
            fn(a[0], a[0])
        with pytest.raises(ValueError, match=r"^b must be a float tensor"):
            fn(a, (a * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="reconstructions"):
        reconstruction_report(a, a[:1])
    with pytest.raises(ValueError, match="odd"):
        ssim(a, a, window=10)
    with pytest.raises(ValueError, match="data_range"):
        ssim(a, a, data_range=0.0)
