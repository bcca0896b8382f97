"""Writes tests/data/sinddm_official_clip.json: the OFFICIAL SinDDM CLIP-guided update, step by step.

    python tests/reference/make_sinddm_clip_reference.py /path/to/SinDDM [--check]

``/path/to/SinDDM`` is a checkout of fallenshock/SinDDM at commit
e7107d9fd198928f26e278f99ec428e261726a45 (the folder holding ``SinDDM/models.py`` and
``text2live_util/util.py``; the imports need einops, matplotlib, scikit-image, tqdm and
torchvision, all on PyPI).  The official code is imported from there, never copied, and is
not edited: the script only sets attributes on its own objects and wraps their methods to
record what they compute.

Recorded:

* ``templates``: ``get_augmentations_template('hr')`` and ``('lr')`` of the official
  ``text2live_util/util.py`` (from Text2LIVE, MIT), the prompt patterns SinDDM's guidance
  encodes;
* ``cases``: the official ``MultiScaleGaussianDiffusion`` (``SinDDM/models.py``) sampling with
  ``clip_guided_sampling`` on and ``reblurring=False`` (what its ``clip_content`` and
  ``clip_style_gen`` modes set), with the tiny fixed denoiser of
  make_sinddm_refine_reference.py and a *stand-in CLIP*: :class:`StandInClip` replaces
  ``ClipExtractor.calculate_clip_loss`` (views, augmentations and template choices, which
  need the real CLIP weights and the process's RNG) by a fixed differentiable function of
  the image, so that everything else of the official update is exercised exactly: the
  clamp, the momentum with the previous guided x0 (lambda), the gradient of minus the loss,
  the fill mask and soft threshold of the first guided step (``thresholded_grad`` at the
  quantile 1 - fill), the per-sample step size ||x0 m|| / ||g m||, the clamp, the mask
  carried to the next scale (bilinear), the guidance stopping 3 steps before the end of the
  finest scale, and the DDPM posterior step.

  - ``content``: 3 scales, guidance at scales 1 and 2 (``guidance_sub_iters`` [0, 1, 1]),
    strength 0.5, quantile 0.7 (fill 0.3), lambda 0.2; scale 1 from t = 5, scale 2 from t = 6;
  - ``style``: guidance at the finest scale only ([0, 0, 1]), strength 0.3, quantile 0
    (the whole image), lambda 0.05; scale 2 from t = 6.

  Per denoising step: t, s, x_t (the denoiser's input), ``x0_hat`` (``predict_start_from_noise``'s
  estimate before any clamp), ``x0_guided`` (the estimate given to ``q_posterior``: after
  guidance and the clamp), the loss the stand-in returned (null when the step is unguided)
  and the CLIP mask after the step.  ``noise[s]`` holds the tensors of scale s in the order
  the official code draws them (its ``q_sample`` first, then one per ``p_sample`` call, the
  last unused at t = 0).

tests/test_sinddm_clip.py runs the pack's sampler and CLIPGuidance with the same denoiser,
stand-in loss, inputs and noise, and compares every step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests")]
from reference.make_sinddm_refine_reference import ToyDenoiser, rounded, to_json  # noqa: E402

OUT = ROOT / "tests" / "data" / "sinddm_official_clip.json"
BATCH = 2
FEATURES = 8  # the stand-in's embedding width
SIZES = [(4, 5), (6, 7), (8, 10)]  # (H, W) per scale
ERRORS = [0.2, 0.1]
CASES = {
    "content": dict(sub_iters=[0, 1, 1], strength=0.5, quantile=0.7, llambda=0.2, runs=[(1, 5), (2, 6)]),
    "style": dict(sub_iters=[0, 0, 1], strength=0.3, quantile=0.0, llambda=0.05, runs=[(2, 6)]),
}


class StandInClip(torch.nn.Module):
    """Stands in for the official ``ClipExtractor`` (and for the pack's ``clip_loss``): a fixed,
    deterministic, differentiable loss of the same form, 1.2 (1 - cos) summed over images and
    averaged over the K text embeddings, with an image "embedding" phi(x) = W tanh(2 pool(x) - 1)
    (pool: adaptive average to 3 x 3).  Records every image it scores."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.as_tensor(weight, dtype=torch.float32), requires_grad=False)
        self.seen: list[torch.Tensor] = []

    def embed(self, x01: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x01, 3).flatten(1)  # [B, 27]
        return torch.tanh(2 * pooled - 1) @ self.weight.T  # [B, D]

    def loss(self, x01: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        cos = torch.nn.functional.cosine_similarity(self.embed(x01)[:, None], emb[None], dim=-1)  # [B, K]
        return (1.2 * (1 - cos)).mean(1).sum()

    def calculate_clip_loss(self, outputs, target_embeddings):  # the official ClipExtractor's method
        self.seen.append(outputs.detach().clone())
        return self.loss(outputs, target_embeddings)


def fixed_inputs() -> dict:
    g = torch.Generator().manual_seed(20240519)
    weight = rounded(torch.randn(3, 3, 3, 3, generator=g) * 0.25)
    bias = rounded(torch.randn(3, generator=g) * 0.1)
    clip_weight = rounded(torch.randn(FEATURES, 27, generator=g))
    emb_hr = rounded(torch.randn(14, FEATURES, generator=g))
    emb_lr = rounded(torch.randn(26, FEATURES, generator=g))
    cases = {}
    for name, cfg in CASES.items():
        s0 = cfg["runs"][0][0]
        x_in = rounded((torch.rand(BATCH, 3, *SIZES[s0 - 1], generator=g) * 2 - 1) * 0.9)
        noise = {s: [rounded(torch.randn(BATCH, 3, *SIZES[s], generator=g)) for _ in range(t + 1)]
                 for s, t in cfg["runs"]}
        cases[name] = {**cfg, "x_in": x_in, "noise": noise}
    return {"weight": weight, "bias": bias, "clip_weight": clip_weight, "emb_hr": emb_hr, "emb_lr": emb_lr,
            "cases": cases}


def run_official(models, inp: dict, case: dict, results: Path) -> dict:
    net = ToyDenoiser(inp["weight"], inp["bias"])
    net.requires_grad_(True)  # as the trained network's: the official update then edits a non-leaf x0 in place
    clip = StandInClip(inp["clip_weight"])
    diff = models.MultiScaleGaussianDiffusion(
        net, results_folder=str(results), n_scales=3, scale_factor=1.25,
        image_sizes=[(w, h) for h, w in SIZES], timesteps=100, train_full_t=True, scale_losses=ERRORS,
        loss_factor=1, loss_type="l1", device="cpu", reblurring=False)
    # what MultiscaleTrainer.clip_sampling sets, with the stand-in and fixed embeddings
    diff.clip_guided_sampling = True
    diff.clip_model = clip
    diff.clip_strength = case["strength"]
    diff.quantile = case["quantile"]
    diff.llambda = case["llambda"]
    diff.guidance_sub_iters = case["sub_iters"]
    diff.stop_guidance = 3
    diff.text_embedds_hr, diff.text_embedds_lr = inp["emb_hr"], inp["emb_lr"]
    diff.scale_mul = (1, 1)
    models.tqdm = lambda it, **kw: it

    steps: list[dict] = []
    predict, posterior, p_mean_variance = diff.predict_start_from_noise, diff.q_posterior, diff.p_mean_variance

    def recording_predict(x_t, t, s, noise):
        x0, x_mix = predict(x_t, t=t, s=s, noise=noise)
        steps.append({"t": int(t[0]), "s": int(s), "x_t": x_t.detach().clone(), "x0_hat": x0.detach().clone()})
        return x0, x_mix

    def recording_posterior(x_start, x_t_mix, x_t, t, s):
        steps[-1]["x0_guided"] = x_start.detach().clone()
        return posterior(x_start, x_t_mix, x_t, t, s)

    def recording_p_mean_variance(x, t, s, clip_denoised):
        before = len(clip.seen)
        out = p_mean_variance(x, t, s, clip_denoised)
        guided = len(clip.seen) > before
        steps[-1]["loss"] = float(clip.loss(clip.seen[-1], diff.text_embedds_hr if s > 0 else diff.text_embedds_lr)) \
            if guided else None
        steps[-1]["mask"] = diff.clip_mask.detach().clone() if diff.clip_mask is not None else None
        return out

    diff.predict_start_from_noise = recording_predict
    diff.q_posterior = recording_posterior
    diff.p_mean_variance = recording_p_mean_variance

    finals = {}
    x = case["x_in"]
    for s, t_start in case["runs"]:
        queue = list(case["noise"][s])

        def next_noise(shape, queue=queue):
            z = queue.pop(0)
            assert tuple(z.shape) == tuple(shape), (z.shape, shape)
            return z.clone()

        q_sample = models.MultiScaleGaussianDiffusion.q_sample.__get__(diff)
        diff.q_sample = lambda x_start, t, noise=None, q=q_sample, nn=next_noise: q(x_start, t, noise=nn(x_start.shape))
        models.noise_like = lambda shape, device, repeat=False, nn=next_noise: nn(shape)
        x = diff.sample_via_scale(BATCH, x, s, custom_t=t_start, custom_image_size=SIZES[s])
        assert not queue, "every stored noise tensor is drawn"
        finals[str(s)] = x.detach().clone()
    return {"steps": steps, "finals": finals}


def compute(official: Path) -> dict:
    sys.path.insert(0, str(official))
    import matplotlib

    matplotlib.use("Agg")
    import SinDDM.models as models
    from text2live_util.util import get_augmentations_template

    inp = fixed_inputs()
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in inp["cases"].items():
            cases[name] = {**case, "noise": {str(s): z for s, z in case["noise"].items()},
                           "official": run_official(models, inp, case, Path(tmp))}
    commit = "e7107d9fd198928f26e278f99ec428e261726a45"
    try:
        commit = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return to_json({
        "source": (f"computed by tests/reference/make_sinddm_clip_reference.py with SinDDM/models.py "
                   f"(MultiScaleGaussianDiffusion) and text2live_util/util.py of fallenshock/SinDDM at {commit}, "
                   f"torch {torch.__version__}; inputs are this script's fixed inputs, everything under 'official' "
                   f"and 'templates' comes from the official code"),
        "templates": {"hr": get_augmentations_template("hr"), "lr": get_augmentations_template("lr")},
        "sizes": SIZES, "errors": ERRORS, "batch": BATCH,
        "weight": inp["weight"], "bias": inp["bias"], "clip_weight": inp["clip_weight"],
        "emb_hr": inp["emb_hr"], "emb_lr": inp["emb_lr"], "cases": cases,
    })


TENSORS = {"weight", "bias", "clip_weight", "emb_hr", "emb_lr", "x_in", "x_t", "x0_hat", "x0_guided", "mask"}


def load_reference(path: Path = OUT) -> dict:
    """The stored file with its tensors (and the noise lists, the per-scale finals) back as float32 tensors."""
    ref = json.loads(path.read_text())

    def conv(d, key=None):
        if isinstance(d, dict):
            if key in ("noise", "finals"):
                return {k: ([torch.tensor(z, dtype=torch.float32) for z in v] if key == "noise"
                            else torch.tensor(v, dtype=torch.float32)) for k, v in d.items()}
            return {k: (torch.tensor(v, dtype=torch.float32) if k in TENSORS and v is not None else conv(v, k))
                    for k, v in d.items()}
        if isinstance(d, list) and d and isinstance(d[0], dict):
            return [conv(x) for x in d]
        return d

    return conv(ref)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("official", type=Path, help="checkout of fallenshock/SinDDM (folder with SinDDM/models.py)")
    ap.add_argument("--check", action="store_true", help="compare with the stored file instead of writing it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref = compute(args.official.resolve())
    if args.check:
        old = json.loads(OUT.read_text())
        same = {k: v for k, v in old.items() if k != "source"} == {k: v for k, v in ref.items() if k != "source"}
        print(f"{OUT.name}: " + ("reproduced" if same else "DIFFERS"))
        return 0 if same else 1
    OUT.write_text(json.dumps(ref, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
