"""SINE core maths: the positional map F(v) (official SinusoidalPositionalEmbedding / UNetModelPatch)
and the patch sampler (official SinImageHighResDataset), checked against hand computations."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from core.sine import PatchConfig, PatchSampler, PositionalMap, crop_map, positional_grid, sinusoidal_table
from core.sine.positional import whole_map


def spe(p: float, c: int, dim: int = 160) -> float:
    """Channel c of the official 1-D SPE of position p, by hand: sines of all freqs, then cosines."""
    half = dim // 2
    i = c % half
    f = math.exp(-i * math.log(10000) / (half - 1))
    return math.sin(p * f) if c < half else math.cos(p * f)


def test_grid_values_match_the_sinusoid_formula():
    g = positional_grid()
    assert g.shape == (1, 320, 128, 128) and g.dtype == torch.float32
    for c, row, col in [(0, 0, 0), (1, 5, 17), (79, 100, 127), (80, 3, 0), (123, 64, 64), (159, 127, 9)]:
        # x channel: position = column + 1 (1-based, never the zero padding index)
        assert g[0, c, row, col].item() == pytest.approx(spe(col + 1, c), abs=2e-5)
        # y channel: position = row + 1
        assert g[0, 160 + c, row, col].item() == pytest.approx(spe(row + 1, c), abs=2e-5)
    # first position: sin(1) and cos(1) at the top frequency, cos(~0)=1 at the lowest
    assert g[0, 0, 0, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert g[0, 80, 0, 0].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert g[0, 159, 0, 0].item() == pytest.approx(math.cos(1e-4), abs=1e-6)
    assert torch.equal(sinusoidal_table(torch.tensor([0]), 160)[0, :80], torch.zeros(80))
    # cached per device and dtype
    assert positional_grid() is g and positional_grid(dtype=torch.float64) is not g


def test_channel_order_is_x_then_y():
    g = positional_grid(32, 16)[0]
    x, y = g[:16], g[16:]
    assert torch.equal(x, x[:, :1, :].expand_as(x))  # x part: the same in every row
    assert torch.equal(y, y[:, :, :1].expand_as(y))  # y part: the same in every column
    assert not torch.equal(x, x[:, :, :1].expand_as(x))
    assert torch.equal(x, y.transpose(1, 2))
    assert x[0, 0, 2].item() == pytest.approx(spe(3, 0, 16), abs=1e-6)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_full_box_equals_the_whole_grid_resize(mode):
    g = positional_grid()
    got = crop_map(g, torch.tensor([[0, 0, 128, 128], [0, 0, 128, 128]]), (64, 48), mode)
    kw = dict(align_corners=True) if mode == "bilinear" else {}
    ref = F.interpolate(g, (64, 48), mode=mode, **kw)
    assert got.shape == (2, 320, 64, 48)
    torch.testing.assert_close(got, ref.expand(2, -1, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(whole_map(g, (64, 48), mode), ref, rtol=0, atol=0)


def test_half_box_equals_the_sub_grid_resize_by_hand():
    g = positional_grid()
    box = torch.tensor([[0, 64, 128, 64]])  # right half: rows 0..127, columns 64..127
    m = crop_map(g, box, (64, 64))
    # align_corners=True: output (i, j) samples row i*127/63 and column 64 + j*63/63 of the grid
    for c, i, j in [(0, 0, 0), (7, 10, 5), (170, 33, 63), (300, 63, 20)]:
        r = i * 127 / 63
        r0 = math.floor(r)
        r1 = min(r0 + 1, 127)
        w = r - r0
        ref = (1 - w) * g[0, c, r0, 64 + j] + w * g[0, c, r1, 64 + j]
        assert m[0, c, i, j].item() == pytest.approx(ref.item(), abs=1e-5)
    torch.testing.assert_close(m, F.interpolate(g[:, :, :, 64:], (64, 64), mode="bilinear", align_corners=True))
    # nearest (the official *_nearest_interp config): PyTorch's legacy nearest, row floor(i * 128 / 64)
    n = crop_map(g, box, (64, 64), "nearest")
    torch.testing.assert_close(n, g[:, :, ::2, 64:], rtol=0, atol=0)
    # float boxes holding whole numbers are accepted (Features carries them as they come)
    torch.testing.assert_close(crop_map(g, box.double(), (64, 64)), m, rtol=0, atol=0)


def test_boxes_are_validated():
    g = positional_grid()
    with pytest.raises(ValueError, match="inside"):
        crop_map(g, torch.tensor([[100, 0, 64, 64]]), (8, 8))
    with pytest.raises(ValueError, match="whole grid cells"):
        crop_map(g, torch.tensor([[0.5, 0, 64, 64]]), (8, 8))
    with pytest.raises(ValueError, match="mode"):
        crop_map(g, torch.tensor([[0, 0, 64, 64]]), (8, 8), "bicubic")


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_positional_map_whole_image_at_any_size(size):
    g = positional_grid()
    h = torch.zeros(2, 320, *size)
    m = PositionalMap()(h, None)
    assert m.shape == (1, 320, *size) and (h + m).shape == h.shape
    torch.testing.assert_close(m, F.interpolate(g, size, mode="bilinear", align_corners=True), rtol=0, atol=0)
    # align_corners=True: the four corners are the grid's corner positions 1 and 128 (up to float32 weights)
    for r, c in [(0, 0), (-1, -1), (0, -1), (-1, 0)]:
        torch.testing.assert_close(m[0, :, r, c], g[0, :, r, c], rtol=0, atol=2e-5)
    # half precision features get a map in their dtype
    assert PositionalMap()(h.half(), None).dtype == torch.float16


def test_positional_map_with_boxes_and_wrong_channels():
    pm = PositionalMap()
    boxes = torch.tensor([[0, 0, 128, 128], [10, 20, 30, 40]])
    h = torch.zeros(2, 320, 64, 64)
    torch.testing.assert_close(pm(h, boxes), crop_map(positional_grid(), boxes, (64, 64)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"320 channels but this model's first block gives 32"):
        pm(torch.zeros(1, 32, 8, 8), None)
    with pytest.raises(ValueError, match="crop boxes for a batch"):
        pm(torch.zeros(3, 320, 8, 8), boxes)
    with pytest.raises(ValueError, match="divisible by 4"):
        PositionalMap(channels=30)


def tiny_cfg(**kw) -> PatchConfig:
    return PatchConfig(high_resolution=256, size=32, **kw)  # grid 32 cells of 8 pixels


def test_patch_boxes_lie_in_the_grid_in_8_pixel_units():
    n = 128
    s = PatchSampler(torch.rand(3, 40, 60))  # official defaults: 1024 image, 128-cell grid
    g = torch.Generator().manual_seed(0)
    b = torch.tensor([s.draw_box(g) for _ in range(3000)])
    top, left, hh, ww = b.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + hh <= n).all() and (left + ww <= n).all()
    lo = int(n * 0.1)  # int(128 * 0.1) = 12 cells = 96 pixels
    for side in (hh, ww):
        assert side.min() == lo and side.max() >= 126 and (side <= n).all()
        assert abs(side.float().mean().item() - (lo + n) / 2) < 3  # ~U(0.1, 1) of the grid
    assert abs(torch.corrcoef(torch.stack([hh.float(), ww.float()]))[0, 1].item()) < 0.1  # independent draws
    # the crop is the box's pixels, in 8-pixel cells: an identity resize (4 cells -> 32 px) shows them
    img = torch.rand(3, 256, 256)
    t = PatchSampler(img, tiny_cfg())
    assert torch.equal(t.image[0], img)  # same-size bicubic is the identity
    torch.testing.assert_close(t.crop((3, 5, 4, 4))[0], img[:, 24:56, 40:72], rtol=0, atol=1e-6)


def test_patch_batch_matches_its_boxes():
    img = torch.rand(3, 50, 70)
    s = PatchSampler(img, tiny_cfg(whole_fraction=0.5))
    crops, boxes = s(6, torch.Generator().manual_seed(3))
    assert crops.shape == (6, 3, 32, 32) and boxes.shape == (6, 4) and boxes.dtype == torch.int64
    assert crops.min() >= 0 and crops.max() <= 1
    for crop, box in zip(crops, boxes.tolist()):
        torch.testing.assert_close(crop, s.crop(tuple(box))[0])
    # the whole image: box (0, 0, grid, grid), the 256 image resized to 32
    whole = F.interpolate(s.image, (32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(s.crop((0, 0, 32, 32)), whole)


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_whole_image_fraction(frac):
    s = PatchSampler(torch.rand(3, 16, 16), tiny_cfg(whole_fraction=frac))
    g = torch.Generator().manual_seed(11)
    n = 3000
    whole = sum(s.draw_box(g) == (0, 0, 32, 32) for _ in range(n)) / n
    assert abs(whole - frac) < 0.035  # binomial sd <= 0.0084


def test_sampler_is_seeded_and_leaves_global_rngs_alone():
    torch_state, py_state = torch.random.get_rng_state(), random.getstate()
    s = PatchSampler(torch.rand(3, 30, 30, generator=torch.Generator().manual_seed(1)), tiny_cfg(whole_fraction=0.2))
    a = s(4, torch.Generator().manual_seed(5))
    b = s(4, torch.Generator().manual_seed(5))
    c = s(4, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(torch.random.get_rng_state(), torch_state) and random.getstate() == py_state
    with pytest.raises(TypeError, match="Generator"):
        s(1, None)
    with pytest.raises(ValueError):
        PatchConfig(min_crop_frac=0.0)


def test_positional_map_through_the_tiny_sd_unet():
    pytest.importorskip("diffusers")
    from core.seam import Features
    from tiny_sd import tiny_sd_model

    sd = tiny_sd_model(0)
    pm = PositionalMap(channels=32)  # tiny UNet: block_out_channels[0] = model_channels = 32
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 12, generator=g)
    t = torch.tensor([100, 800])
    c = sd.encode_text(["a cat"]).expand(2, -1, -1)
    box = torch.tensor([[0, 0, 128, 128], [32, 64, 64, 32]])

    class AddMap(torch.nn.Module):
        def __init__(self, conv, box):
            super().__init__()
            self.conv, self.box = conv, box

        def forward(self, inp):
            h = self.conv(inp)
            grid = positional_grid(32)
            add = crop_map(grid, self.box, h.shape[-2:]) if self.box is not None else whole_map(grid, h.shape[-2:])
            return h + add

    with torch.no_grad():
        plain = sd.eps(x, t, c)
        for b in (box, None):
            ref_unet = copy.deepcopy(sd.unet)
            ref_unet.conv_in = AddMap(ref_unet.conv_in, b)
            ref = ref_unet(x, t, encoder_hidden_states=c).sample
            got = sd.eps(x, t, c, Features(input_map=pm, crop_box=b))
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
            assert (got - plain).abs().max() > 1e-3
        # the two boxes give the two samples different maps, hence different eps from the same input
        same_x = x[:1].expand(2, -1, -1, -1)
        e2 = sd.eps(same_x, t[:1].expand(2), c, Features(input_map=pm, crop_box=box))
        assert (e2[0] - e2[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="gives 32"), torch.no_grad():
        sd.eps(x, t, c, Features(input_map=PositionalMap(), crop_box=box))
