"""The rectifier on real images (Hou et al. 2024, Table 1 and Alg. 1), with a tiny pixel DDPM trained in this tier.

Reconstruction: the tiny DDPM of :mod:`tiny_pixel_ddpm` is trained on crops of scikit-image's sample photos; the
rectifier is trained with eq. 3 on crops the DDPM never saw in that form (the photos' colour channels rotated,
RGB -> BRG: an out-of-domain set, like the paper's METFACES / CelebA-HQ tests of an FFHQ model) and must lower the
error of DDIM inversion + sampling (10 steps) on **held-out** crops of that set, against the same DDPM without the
rectifier: L1 and L2 as in the paper's Table 1, and SSIM (LPIPS needs pretrained weights).  The path is the user's:
``python -m core.rectifier edit`` (the default: the rectified model inverts and samples back) on each held-out
crop's PNG, scored from the PNGs it writes; in-process the same with :func:`core.rectifier.invert_and_sample`, with
the other inversions printed (the plain model inverting and the rectified one sampling back is *worse* than the
plain model alone: the two halves of the round trip no longer match).

Editing: with a random-weight OpenCLIP, editing training (Alg. 1) must raise the directional CLIP similarity of
x0_hat on its training images while the L1 term keeps x0_hat near x0; and with lambda_CLIP = lambda_L1 = 1 both
terms must move R (neither term's gradient more than 20x the other's, averaged over t).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("skimage")
open_clip = pytest.importorskip("open_clip")

from pixel_data import real_crops  # noqa: E402
from tiny_pixel_ddpm import trained_tiny_ddpm  # noqa: E402
from tiny_clip import tiny_open_clip  # noqa: E402

from core.diffusion import predict_x0, q_sample  # noqa: E402
from core.rectifier import (  # noqa: E402
    RectifierInfo,
    TrainConfig,
    invert_and_sample,
    new_rectifier,
    rectified,
    save_rectifier,
    train_rectifier,
)
from core.rectifier.clip_direction import DirectionalCLIP  # noqa: E402
from core.rectifier.metrics import reconstruction_report  # noqa: E402
from core.rectifier.train import objective  # noqa: E402
from core.clip_model import OpenCLIP  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 10  # DDIM inversion and sampling steps


def brg(x: torch.Tensor) -> torch.Tensor:
    return x[:, [2, 0, 1]]


@pytest.fixture(scope="module")
def setup():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    train, held = real_crops()  # [48 | 16, 3, 16, 16] in [0, 1], disjoint regions
    model = trained_tiny_ddpm(train)
    r = new_rectifier(model.unet_parameters(), 3, encoder_layers=(1, 1, 1, 1), width=8)
    res = train_rectifier(model, r, brg(train) * 2 - 1, TrainConfig(steps=150, batch=8, lr=1e-3, seed=0))
    yield model, r, train, held, res
    torch.set_num_threads(before)


def to01(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(-1, 1) + 1) / 2


def test_recon_training_lowers_held_out_reconstruction_error(setup):
    model, r, _, held, res = setup
    ab = model.alphas_cumprod
    x0 = brg(held) * 2 - 1
    plain = lambda x, t: model.eps(x, t)  # noqa: E731
    with torch.no_grad(), rectified(model, r, x0) as R:
        base = reconstruction_report(brg(held), to01(invert_and_sample(plain, plain, x0, ab, STEPS)[1]))
        ours = reconstruction_report(brg(held), to01(invert_and_sample(R, R, x0, ab, STEPS)[1]))
        halves = reconstruction_report(brg(held), to01(invert_and_sample(plain, R, x0, ab, STEPS)[1]))
    print(f"\nheld-out reconstruction ({STEPS} DDIM steps): plain {base}, rectified {ours}; plain inversion + "
          f"rectified sampling {halves}; train loss first/last 10: {sum(res.losses[:10]) / 10:.4f} / "
          f"{sum(res.losses[-10:]) / 10:.4f}")
    # measured: L1 0.161 -> 0.128, L2 0.0361 -> 0.0241, SSIM 0.412 -> 0.516 (plain inversion + rectified: L1 0.209)
    assert ours["l1"] < 0.9 * base["l1"] and ours["l2"] < 0.8 * base["l2"]
    assert ours["ssim"] > base["ssim"]


def _png(x01: torch.Tensor, path) -> None:
    from PIL import Image

    Image.fromarray((x01.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()).save(path)


def _read(path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1).float()[None] / 255


def test_cli_edit_reconstructs_held_out_images_closer_than_the_plain_model(setup, tmp_path):
    """The user's path: ``python -m core.rectifier edit`` with its defaults (DDIM inversion and sampling, the
    reconstruction rectifier running both), ``--plain-out`` the plain model's round trip, on held-out PNGs."""
    import os
    import subprocess
    import sys

    from tiny_pixel_ddpm import cache_dir

    model, r, train, held, _ = setup
    rect_file = save_rectifier(r, RectifierInfo("pixel", "recon", steps=150), tmp_path / "recon.safetensors")
    folder = cache_dir(train)
    assert (folder / "config.json").is_file() or any(folder.iterdir())
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    scores = {"rectified": [], "plain": []}
    for i in range(4):
        src = tmp_path / f"held_{i}.png"
        _png(brg(held)[i], src)
        out, plain = tmp_path / f"rect_{i}.png", tmp_path / f"plain_{i}.png"
        run = subprocess.run([sys.executable, "-m", "core.rectifier", "edit", "--model", str(folder), "--rectifier",
                              str(rect_file), "--image", str(src), "--steps", str(STEPS), "--device", "cpu",
                              "--out", str(out), "--plain-out", str(plain)],
                             cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "DDIM inversion by the rectifier itself" in run.stdout, run.stdout
        ref = _read(src)
        scores["rectified"].append(reconstruction_report(ref, _read(out)))
        scores["plain"].append(reconstruction_report(ref, _read(plain)))
    mean = {k: {m: sum(s[m] for s in v) / len(v) for m in ("l1", "l2", "ssim")} for k, v in scores.items()}
    print(f"\nCLI edit, 4 held-out crops ({STEPS} steps): {mean}")
    # measured: L1 0.191 -> 0.168, L2 0.0467 -> 0.0363, SSIM 0.359 -> 0.397 (8-bit PNGs in and out)
    assert mean["rectified"]["l1"] < 0.9 * mean["plain"]["l1"] and mean["rectified"]["l2"] < 0.8 * mean["plain"]["l2"]
    assert mean["rectified"]["ssim"] > mean["plain"]["ssim"]


def tiny_clip() -> OpenCLIP:
    return tiny_open_clip()


def probe(model, r, clip: DirectionalCLIP, x0: torch.Tensor) -> tuple[float, float]:
    """Mean directional similarity and L1 of x0_hat on fixed (t, eps) draws, t in the upper half of the schedule."""
    g = torch.Generator().manual_seed(99)
    t = torch.randint(300, 900, (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ab = model.alphas_cumprod.float()
    x_t = q_sample(x0, ab[t], eps)
    with torch.no_grad(), rectified(model, r, x0) as R:
        x0_hat = predict_x0(x_t, R(x_t, t), ab[t]).clamp(-1, 1)
        sim = clip.similarity((x0_hat + 1) / 2, (x0 + 1) / 2).mean().item()
    return sim, (x0_hat - x0).abs().mean().item()


def test_edit_training_raises_directional_clip_similarity_and_l1_keeps_x0(setup):
    model, r_recon, train, _, _ = setup
    x0 = train[:8] * 2 - 1
    clip = DirectionalCLIP(tiny_clip(), "photo", "painting")
    sim0, l1_0 = probe(model, r_recon, clip, x0)
    r = copy.deepcopy(r_recon)  # editing continues from the reconstruction rectifier (the paper's recipe)
    res = train_rectifier(model, r, x0, TrainConfig(mode="edit", steps=30, batch=4, lr=1e-3, seed=1), clip=clip,
                          to_image=lambda z: (z.clamp(-1, 1) + 1) / 2, source_images=train[:8])
    sim1, l1_1 = probe(model, r, clip, x0)
    print(f"\nedit: directional similarity {sim0:.3f} -> {sim1:.3f}, L1(x0_hat, x0) {l1_0:.3f} -> {l1_1:.3f}, "
          f"terms first/last: clip {res.terms['clip'][0]:.3f}/{res.terms['clip'][-1]:.3f}, "
          f"l1 {res.terms['l1'][0]:.3f}/{res.terms['l1'][-1]:.3f}")
    assert sim1 > sim0 + 0.05
    assert l1_1 < l1_0 + 0.1  # the L1 term keeps x0_hat near x0
    assert set(res.terms) == {"clip", "l1"}


TS = (0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)


def term_gradients(model, r, x0, src, clip, x0_clip) -> list[dict]:
    """Per t of :data:`TS`: the norm of each edit term's gradient w.r.t. R's parameters (lambda_CLIP = lambda_L1 = 1),
    from the terms train_rectifier minimises, on fixed images and noise."""
    config = TrainConfig(mode="edit", steps=1, batch=x0.shape[0], x0_clip=x0_clip)
    params = [p for p in r.parameters() if p.requires_grad]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    idx = torch.arange(x0.shape[0])
    rows = []
    with objective(model, r, x0, config, clip=clip, to_image=lambda z: (z.clamp(-1, 1) + 1) / 2,
                   source_images=src) as obj:
        for t in TS:
            b = obj.batch(idx, torch.full((x0.shape[0],), t), eps)
            row = {"t": t}
            for term in obj.terms:
                value = term.weight * term.fn(b)
                grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                norm = sum(float(g.square().sum()) for g in grads if g is not None) ** 0.5
                row[term.name] = (float(value.detach()), norm)
            rows.append(row)
    return rows


def test_edit_loss_terms_both_move_the_rectifier_over_t(setup):
    """Eq. 6 with lambda_CLIP = lambda_L1 = 1: x0_hat = P_t[eps_hat] is clipped to the data range before both terms
    (our choice; the paper is silent), so the L1 term is bounded like the directional CLIP term (<= 2) at every t.
    Unclipped, |x0_hat - x0| = sqrt((1 - a_t) / a_t) |eps_hat - eps| grows to ~157x the eps error at t = 999 of the
    linear schedule (measured here: L1 10.0 at t = 999 against CLIP 0.98; its gradient there 8.3x the CLIP term's).
    Measured (tiny DDPM, random tiny CLIP, 4 images, 12 t): mean |grad| over t, CLIP 1.13, L1 0.13 clipped (ratio
    8.6) and 0.73 unclipped (ratio 1.6): the issue's 20x criterion holds either way on this model, so the assertion
    that fails on the unclipped loss is the bound (largest L1 0.80 clipped, 10.0 unclipped)."""
    model, r_recon, train, _, _ = setup
    r = copy.deepcopy(r_recon)
    x0, src = train[:4] * 2 - 1, train[:4]
    clip = DirectionalCLIP(tiny_clip(), "photo", "painting")
    ratios, peaks = {}, {}
    for name, x0_clip in (("clipped", None), ("unclipped", 0.0)):
        rows = term_gradients(model, r, x0, src, clip, x0_clip)
        for row in rows:
            print(f"{name} t {row['t']:4d}: clip loss {row['clip'][0]:.3f} |grad| {row['clip'][1]:.3e}; "
                  f"l1 loss {row['l1'][0]:.3f} |grad| {row['l1'][1]:.3e}")
        g_clip = sum(row["clip"][1] for row in rows) / len(rows)
        g_l1 = sum(row["l1"][1] for row in rows) / len(rows)
        ratios[name] = max(g_clip / g_l1, g_l1 / g_clip)
        peaks[name] = max(row["l1"][0] for row in rows)
        assert all(0 <= row["clip"][0] <= 2 for row in rows)
    print(f"mean |grad| ratio over t: {ratios}; largest L1 value: {peaks}")
    assert ratios["clipped"] < 20  # both terms move R
    assert peaks["clipped"] <= 2.0  # bounded like the CLIP term at every t: lambda_L1 means the same at every t
    assert peaks["unclipped"] > 2.0  # what the clip changes (the loss before it)
