"""SinDDM's CLIP guidance as the official code does it (issue 19, point 19), and the image-injection
helpers (harmonization mask, histogram matching) against scikit-image itself.

tests/data/sinddm_official_clip.json was written by tests/reference/make_sinddm_clip_reference.py
from the official code (fallenshock/SinDDM @ e7107d9): its template sets, and its CLIP-guided
sampling step by step with a fixed tiny denoiser and a stand-in for CLIP's loss (the same function
on both sides), so that the update itself (clamp, momentum, gradient, fill mask, soft threshold,
step size, clamp, mask carried across scales, guidance stop, DDPM step) is compared.  The
augmentations are compared with torchvision's functional transforms, which the official code
applies, and their random draws with torchvision's rules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from reference.make_sinddm_clip_reference import OUT, StandInClip, load_reference
from reference.make_sinddm_refine_reference import ToyDenoiser

from core.sinddm import SinDDM, build_pyramid, sample
from core.sinddm import clip_guidance as cg
from core.sinddm.clip_guidance import (
    JITTER_OPS,
    T2L_TEMPLATES_HR,
    T2L_TEMPLATES_LR,
    CLIPGuidance,
    CLIPRegionGuidance,
    affine_warp,
    color_jitter,
    draw_augmentation,
    hsv_to_rgb,
    perspective_warp,
    rgb_to_hsv,
)
from core.sinddm.guidance import Guidance, harmonization_mask, match_histograms
from core.sinddm.model import NetConfig, seeded_net
from core.sinddm.pyramid import upsample
from core.sinddm.sample import _Sampler
from core.sinddm.schedule import MultiScaleSchedule
from helpers import ROOT
from tiny_clip import tiny_open_clip

REF = load_reference(OUT)
CPU = torch.device("cpu")
ATOL = RTOL = 1e-5


class TextEncoderStandIn:
    """What CLIPGuidance needs of an OpenCLIP object, with the reference's fixed text embeddings
    (14 rows for the "hr" set, 26 for "lr"); records the texts it encodes."""

    image_size = 32

    def __init__(self):
        self.model = torch.nn.Identity()
        self.texts: list[list[str]] = []

    def encode_text(self, texts, device):
        self.texts.append(list(texts))
        return {14: REF["emb_hr"], 26: REF["emb_lr"]}[len(texts)]


# ------------------------------------------------------------------------------ templates
def test_the_template_sets_are_the_official_ones():
    """Content and style guidance encode the official "hr" and "lr" phrasings of the prompt; text in a
    region the "lr" ones (the official clip_roi)."""
    assert list(T2L_TEMPLATES_HR) == REF["templates"]["hr"] and len(T2L_TEMPLATES_HR) == 14
    assert list(T2L_TEMPLATES_LR) == REF["templates"]["lr"] and len(T2L_TEMPLATES_LR) == 26
    hr = lambda p: [t.format(p) for t in REF["templates"]["hr"]]  # noqa: E731
    lr = lambda p: [t.format(p) for t in REF["templates"]["lr"]]  # noqa: E731
    sizes = [(8, 8), (10, 12)]
    enc = TextEncoderStandIn()
    CLIPGuidance(enc, "a volcano", "content").begin(sizes, 1, CPU)
    assert enc.texts == [hr("a volcano"), lr("a volcano")]
    enc = TextEncoderStandIn()
    CLIPGuidance(enc, "Van Gogh", "style").begin(sizes, 1, CPU)
    assert enc.texts == [hr("Van Gogh Style"), lr("Van Gogh Style")]
    enc = TextEncoderStandIn()
    CLIPRegionGuidance(enc, "fire", torch.ones(1, 1, 10, 12)).begin(sizes, 1, CPU)
    assert enc.texts == [lr("fire")]


# ------------------------------------------------------------------------------ one guided update, step by step
class _Record(Guidance):
    """Records x0_hat as the guidances before it left it, and the CLIP guidance's mask after the step."""

    def __init__(self, clip_guidance=None):
        self.g = clip_guidance
        self.seen: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []

    def apply(self, x0, s, t, sampler):
        self.seen.append(x0.clone())
        if self.g is not None:
            self.masks.append(None if self.g.mask is None else self.g.mask.clone())
        return x0


class _FixedNoise:
    def __init__(self, tensors):
        self.tensors, self.used = tensors, 0

    def __call__(self, shape):
        z = self.tensors[self.used]
        assert tuple(z.shape[1:]) == tuple(shape)
        self.used += 1
        return z.clone()


def run_guided(name: str, monkeypatch, tweak=None):
    """The pack's sampler and CLIPGuidance on the reference case, the stand-in loss for clip_loss."""
    case = REF["cases"][name]
    stand_in = StandInClip(REF["clip_weight"])
    calls = []

    def stand_in_loss(clip, x01, emb, n_views, generators):
        calls.append(len(generators))
        return stand_in.loss(x01, emb)

    monkeypatch.setattr(cg, "clip_loss", stand_in_loss)
    net = ToyDenoiser(REF["weight"], REF["bias"]).eval()
    sch = MultiScaleSchedule.build(REF["errors"])
    mode = "style" if name == "style" else "content"
    g = CLIPGuidance(TextEncoderStandIn(), "a prompt", mode, strength=case["strength"],
                     fill_factor=1 - case["quantile"], n_views=2)
    before, after = _Record(), _Record(g)
    smp = _Sampler(SinDDM(net, None, sch), CPU, [before, g, after], None, None, 100)
    assert smp.ddpm  # CLIP guidance switches every scale to the DDPM posterior (official reblurring=False)
    sizes = [tuple(s) for s in REF["sizes"]]
    for guide in (before, g, after):
        guide.begin(sizes, REF["batch"], CPU)
    if tweak:
        tweak(g)
    x, finals = case["x_in"], {}
    for s, t_start in case["runs"]:
        g.begin_scale(s, sizes[s])
        x = smp.refine(upsample(x, sizes[s]), s, t_start, _FixedNoise(case["noise"][str(s)]))
        finals[str(s)] = x
    return case["official"], net.calls, before.seen, after.seen, after.masks, g, finals, calls


def close(a, b):
    return torch.allclose(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", sorted(REF["cases"]))
def test_a_guided_sampling_run_matches_the_official_update_step_by_step(name, monkeypatch):
    off, calls, before, after, masks, g, finals, loss_calls = run_guided(name, monkeypatch)
    steps = off["steps"]
    assert [(t, s) for t, s, _ in calls] == [(st["t"], st["s"]) for st in steps]
    guided = [st for st in steps if st["loss"] is not None]
    assert len(g.scores) == len(guided) and loss_calls == [REF["batch"]] * len(guided)
    k_guided = 0
    for k, ((t, s, x_t), x0_in, x0_out, mask, st) in enumerate(zip(calls, before, after, masks, steps)):
        where = f"{name}: step {k} (s={s}, t={t})"
        assert close(x_t, st["x_t"]), f"{where}: x_t differs"
        assert close(x0_in, st["x0_hat"].clamp(-1, 1)), f"{where}: x0_hat differs"
        assert close(x0_out.clamp(-1, 1), st["x0_guided"]), f"{where}: guided x0 differs"
        assert (mask is None) == (st["mask"] is None) and (mask is None or close(mask, st["mask"])), where
        if st["loss"] is not None:
            assert -g.scores[k_guided] == pytest.approx(st["loss"], rel=1e-5), where
            k_guided += 1
        else:
            assert torch.equal(x0_out, x0_in), f"{where}: an unguided step changed x0"
    for s, final in off["finals"].items():
        assert close(finals[s], final), f"{name}: the output of scale {s} differs"
    # the reference exercises what it should: a mask that is neither empty nor full (content), carried to
    # scale 2 and made soft there by the bilinear resize; the whole image but its weakest pixels (style)
    last = steps[-1]["mask"]
    if name == "content":
        first = next(st["mask"] for st in steps if st["mask"] is not None)
        assert set(torch.unique(first).tolist()) == {0.0, 1.0} and 0.1 < float(first.mean()) < 0.5
        assert 0 < int(((last > 0) & (last < 1)).sum())
    else:
        assert 0.85 < float(last.mean()) < 1  # quantile 0: all but the pixels of least gradient energy


@pytest.mark.parametrize("tweak", [
    lambda g: setattr(g, "momentum", g.momentum + 0.05),  # lambda of the momentum
    lambda g: setattr(g, "fill", 0.1 if g.fill < 1 else 0.9),  # the fill quantile
    lambda g: setattr(g, "strength", g.strength * 1.1),  # eta
    lambda g: setattr(g, "stop_steps", 2),  # where guidance stops at the finest scale
], ids=["momentum", "fill", "strength", "stop"])
@pytest.mark.parametrize("name", sorted(REF["cases"]))
def test_the_step_by_step_comparison_sees_a_changed_update(name, tweak, monkeypatch):
    off, *_, finals, _ = run_guided(name, monkeypatch, tweak)
    assert not all(close(finals[s], f) for s, f in off["finals"].items())


# ------------------------------------------------------------------------------ augmentations
def test_augmentations_are_torchvisions_transforms():
    """The official views go through torchvision's RandomHorizontalFlip, RandomAffine, RandomPerspective,
    ColorJitter (hue included) and RandomGrayscale with white fill; ours, given the same draws, give the
    same images."""
    TF = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    bilinear, white = InterpolationMode.BILINEAR, [1.0, 1.0, 1.0]
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    for angle, tx, ty in ((12.3, 3, -4), (-7.5, -5, 2), (14.9, 0, 0)):
        want = TF.affine(x, angle=angle, translate=[tx, ty], scale=1.0, shear=[0.0, 0.0], interpolation=bilinear,
                         fill=white)
        torch.testing.assert_close(affine_warp(x, angle, tx, ty), want, atol=2e-5, rtol=0)
    start = [[0, 0], [47, 0], [47, 39], [0, 39]]
    for end in (((3, 2), (45, 1), (44, 37), (2, 39)), ((9, 0), (47, 8), (38, 39), (0, 31)),
                ((0, 0), (47, 0), (47, 39), (0, 39))):
        want = TF.perspective(x, start, [list(p) for p in end], bilinear, fill=white)
        torch.testing.assert_close(perspective_warp(x, end), want, atol=2e-5, rtol=0)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for order, factors in (((0, 1, 2, 3), (1.07, 0.93, 1.05, -0.08)), ((3, 2, 1, 0), (0.91, 1.09, 0.95, 0.1)),
                           ((2, 0, 3, 1), (1.0, 1.0, 1.1, 0.03))):
        want = x
        for op in order:
            want = adjust[op](want, factors[op])
        torch.testing.assert_close(color_jitter(x, order, *factors), want, atol=2e-5, rtol=0)
    torch.testing.assert_close(cg._grey(x).expand_as(x), TF.rgb_to_grayscale(x, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=2e-6, rtol=0)
    # colour jitter is differentiable (the loss's gradient reaches x0 through every view)
    v = x.clone().requires_grad_(True)
    color_jitter(perspective_warp(affine_warp(v, 5.0, 1, 1), ((2, 2), (45, 1), (46, 38), (1, 37))), (3, 1, 0, 2),
                 1.05, 0.95, 1.02, 0.05).sum().backward()
    assert torch.isfinite(v.grad).all() and float(v.grad.abs().sum()) > 0


def test_augmentation_draws_follow_torchvisions_rules():
    """RandomPerspective moves every corner inwards only, by 0 .. int(0.4 * side // 2) whole pixels
    (the same range as torchvision's get_params); ColorJitter runs its four operations in a random order
    with a hue term; the probabilities are the official ones."""
    T = pytest.importorskip("torchvision.transforms")
    size, n = 224, 4000
    gen = torch.Generator().manual_seed(0)
    draws = [draw_augmentation(size, size, gen) for _ in range(n)]
    k = int(0.4 * (size // 2))  # 44
    corners = torch.tensor([d.perspective for d in draws if d.perspective is not None])  # [m, 4, 2]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = torch.tensor([T.RandomPerspective.get_params(size, size, 0.4)[1] for _ in range(len(corners))])
    lo, hi = torch.tensor([[0, 0], [size - 1 - k, 0], [size - 1 - k, size - 1 - k], [0, size - 1 - k]]), None
    hi = lo + k
    assert bool(((corners >= lo) & (corners <= hi)).all())  # inwards only, at most k
    assert torch.equal(corners.amin(0), theirs.amin(0)) and torch.equal(corners.amax(0), theirs.amax(0))
    assert torch.equal(corners.amin(0), lo) and torch.equal(corners.amax(0), hi)  # the whole range is drawn
    rate = lambda f: sum(bool(f(d)) for d in draws) / n  # noqa: E731
    for f, p in ((lambda d: d.flip, 0.5), (lambda d: d.affine, 0.8), (lambda d: d.perspective, 0.5),
                 (lambda d: d.jitter, 0.7), (lambda d: d.grey, 0.15)):
        assert rate(f) == pytest.approx(p, abs=0.035)
    jit = [d.jitter for d in draws if d.jitter is not None]
    assert len({j[0] for j in jit}) == 24 and all(sorted(j[0]) == [0, 1, 2, 3] for j in jit)
    hue = torch.tensor([j[4] for j in jit])
    assert float(hue.min()) >= -0.1 and float(hue.max()) <= 0.1 and float(hue.min()) < -0.09 < 0.09 < float(hue.max())
    bcs = torch.tensor([j[1:4] for j in jit])
    assert float(bcs.min()) >= 0.9 and float(bcs.max()) <= 1.1
    aff = torch.tensor([d.affine for d in draws if d.affine is not None])
    assert float(aff[:, 0].abs().max()) <= 15 and float(aff[:, 0].abs().max()) > 14.9
    assert float(aff[:, 1:].abs().max()) == round(0.1 * size) and torch.equal(aff[:, 1:], aff[:, 1:].round())
    assert JITTER_OPS == ("brightness", "contrast", "saturation", "hue")


# ------------------------------------------------------------------------------ one generator per sample
def _tiny_clip():
    return tiny_open_clip(width=32, layers=1, head_width=16)


def test_guided_result_k_depends_on_seed_plus_k_not_on_count(one_thread):
    """Sample k of a guided batch equals the single sample drawn with seed + k and guidance seed + k
    (the tooltips' promise), for text guidance and text in a region; before, one generator fed the
    whole batch, so sample k changed with count."""
    clip = _tiny_clip()
    pyr = build_pyramid(Image.open(ROOT / "core/sinddm/data/coffee_128x100.png"))
    model = SinDDM.create(seeded_net(NetConfig(8), 0), pyr)
    steps = [3, 5]

    def text(count, seed, gseed):
        g = CLIPGuidance(clip, "a red apple", "content", strength=0.5, fill_factor=0.3, n_views=3, seed=gseed)
        return sample(model, count=count, seed=seed, guidance=[g], start_steps=steps)

    batch = text(3, 10, 20)
    for k in (1, 2):
        torch.testing.assert_close(batch[k : k + 1], text(1, 10 + k, 20 + k), atol=1e-5, rtol=0)
    assert not torch.allclose(batch[1], batch[2], atol=1e-3)
    h, w = pyr.spec.sizes[-1]
    mask = torch.zeros(1, 1, h, w)
    mask[..., 20:60, 30:90] = 1

    def region(count, seed, gseed):
        g = CLIPRegionGuidance(clip, "a red apple", mask, strength=0.5, iterations=2, n_views=3, seed=gseed)
        return sample(model, count=count, seed=seed, guidance=[g], start_steps=steps)

    torch.testing.assert_close(region(2, 4, 7)[1:], region(1, 5, 8), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ scikit-image itself
def test_harmonization_mask_is_scikit_images_dilation_and_gaussian():
    """The official dilate_mask: skimage binary dilation by disk(7), skimage.filters.gaussian(sigma=5),
    min-max normalised; any positive value counts as the object (a Lanczos-resized mask rings)."""
    pytest.importorskip("skimage")
    from skimage import filters, morphology

    g = torch.Generator().manual_seed(0)
    blobs = torch.zeros(1, 1, 70, 90)
    blobs[..., 20:31, 25:41] = 1
    blobs[..., 60, 85] = 1  # near the corner: the blur reaches the edge (mode 'nearest')
    blobs[..., 0:5, 0:3] = 1
    soft = torch.nn.functional.interpolate((torch.rand(1, 1, 12, 15, generator=g) > 0.8).float(), size=(70, 90),
                                           mode="bicubic", align_corners=False)  # rings: small +- values
    for m in (blobs, soft):
        arr = m[0, 0].numpy()
        want = filters.gaussian(morphology.dilation(arr > 0, morphology.disk(7)).astype(np.float64), sigma=5)
        want = (want - want.min()) / (want.max() - want.min())
        got = harmonization_mask(m)[0, 0].double().numpy()
        assert np.abs(got - want).max() < 1e-6  # measured 2.6e-7 (float32)


def test_histogram_matching_is_scikit_images():
    """skimage.exposure.match_histograms(channel_axis=-1) on uint8 images, as the official code calls it."""
    pytest.importorskip("skimage")
    from skimage.exposure import match_histograms as sk_match

    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 256, (60, 80, 3)), (rng.beta(2, 5, (70, 50, 3)) * 255)),
             (rng.integers(0, 100, (30, 40, 3)), rng.integers(150, 256, (50, 20, 3))),
             (rng.choice([3, 50, 200], (25, 33, 3)), rng.normal(120, 40, (64, 48, 3)).clip(0, 255))]
    for src, ref in cases:
        src, ref = src.astype(np.uint8), ref.astype(np.uint8)
        want = sk_match(src, ref, channel_axis=-1)
        got = match_histograms(src, ref)
        assert got.dtype == np.uint8 and np.array_equal(got, want.astype(np.uint8))


def test_the_reference_file_records_the_official_rules():
    """Sanity of the stored reference: T = 100 schedule, batch > 1, the guidance stop at the finest scale."""
    assert REF["batch"] == 2 and math.isclose(REF["errors"][0], 0.2)
    content = REF["cases"]["content"]["official"]["steps"]
    assert [st["t"] for st in content if st["s"] == 2 and st["loss"] is None] == [2, 1, 0]
