"""Writes tests/data/sinddm_official_refine.json: per-step trajectories of the OFFICIAL SinDDM sampler.

    python tests/reference/make_sinddm_refine_reference.py /path/to/SinDDM [--check]

``/path/to/SinDDM`` is a checkout of fallenshock/SinDDM at commit
e7107d9fd198928f26e278f99ec428e261726a45 (the folder holding ``SinDDM/models.py``; its
imports need einops, matplotlib, scikit-image, tqdm and torchvision, all on PyPI).  The
official code is imported from there, never copied, and is not edited: the script only
replaces, on its own objects, where the noise comes from and adds recording wrappers.

The official ``MultiScaleGaussianDiffusion`` (``SinDDM/models.py``) samples with
:class:`ToyDenoiser`, a fixed, tiny, deterministic stand-in for the trained network
(one seeded 3x3 convolution with a dependence on t and s, weights stored in the file),
from fixed inputs with fixed noise tensors (all stored in the file, rounded to 6
decimals *before* use so that the stored values are exactly what both samplers get):

* ``ddim_s1``, ``ddim_s2``: ``sample_via_scale`` (bilinear upsampling of a coarse image to
  this scale, ``q_sample`` to t = T[s], then ``p_sample_via_scale_loop``'s t = T[s]-1 .. 0
  with ``reblurring=True``: the deblurring DDIM update with gamma clamped to [0, 0.55]),
  T[s] = ``num_timesteps_ideal`` for the scale errors ``ERRORS``;
* ``ddpm_s1``: the same with ``reblurring=False`` (the stochastic DDPM posterior, what the
  official code uses at every scale under CLIP guidance), from t = 5;
* ``inject_s2``: the image-to-image path of ``MultiscaleTrainer.image2image``: the scale's
  gammas clamped to 0, an image injected at its own size, from t = 4;
* ``coarsest``: ``sample`` (``p_sample_loop``) at s = 0, DDPM from N(0, I), on a
  T = 8 schedule (to keep the file small).

Recorded per denoising step, from the official objects: t and s given to the denoiser,
x_t (its input), x0_hat (``predict_start_from_noise``'s first output: the deblurred
estimate, before any clamp), and the gammas the step uses (the official
``gammas[s - 1].clamp(0, 0.55)`` at t and t - 1; 0 where the official code does not mix).
Also recorded: x~ (``img_prev_upsample``) and the final sample.  ``noise[0]`` is the
noise of the first ``q_sample`` (or the initial N(0, I) sample at s = 0), ``noise[k]`` the
one ``p_sample`` draws at its k-th call.  In the deblurring mode the official code adds
it times exp(0.5 log 1e-20) = 1e-10 (its clipped zero variance); the pack adds none.

tests/test_sinddm_reference.py runs the pack's sampler on the same inputs and compares.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "sinddm_official_refine.json"
ERRORS = [0.2, 0.1]  # scale errors L_1, L_2 -> T[1] = 11, T[2] = 5 with T = 100
BATCH = 2
DECIMALS = 6


class ToyDenoiser(torch.nn.Module):
    """eps(x, t, s) = tanh(conv3x3(x) + 0.07 (t + 1) - 0.2 s): deterministic, depends on x, t and s.

    Accepts both call forms: the official ``denoise_fn(x, t, scale=s)`` (s an int) and
    the pack's ``net(x, t, s)`` (s a tensor [B]).  Records every call as (t, s, x).
    """

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.as_tensor(weight, dtype=torch.float32), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.as_tensor(bias, dtype=torch.float32), requires_grad=False)
        self.calls: list[tuple[int, int, torch.Tensor]] = []

    def forward(self, x, t, s=None, scale=None):
        s = scale if s is None else s
        s_val = int(s[0]) if torch.is_tensor(s) else int(s)
        self.calls.append((int(t[0]), s_val, x.detach().clone()))
        tt = t.to(torch.float32).reshape(-1, 1, 1, 1)
        h = torch.nn.functional.conv2d(x, self.weight, self.bias, padding=1)
        return torch.tanh(h + 0.07 * (tt + 1) - 0.2 * s_val)


def rounded(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.double() * 10**DECIMALS).div(10**DECIMALS).float()


def fixed_inputs() -> dict:
    g = torch.Generator().manual_seed(20230820)
    weight = rounded(torch.randn(3, 3, 3, 3, generator=g) * 0.25)
    bias = rounded(torch.randn(3, generator=g) * 0.1)

    def image(h, w):
        return rounded((torch.rand(BATCH, 3, h, w, generator=g) * 2 - 1) * 0.9)

    def noises(n, h, w):
        return [rounded(torch.randn(BATCH, 3, h, w, generator=g)) for _ in range(n)]

    # (name, mode, s, t_start or None for T[s], input image, output size (H, W), T)
    cases = [
        ("ddim_s1", "ddim", 1, None, image(4, 4), (6, 5), 100),
        ("ddim_s2", "ddim", 2, None, image(5, 4), (7, 6), 100),
        ("ddpm_s1", "ddpm", 1, 5, image(4, 4), (6, 5), 100),
        ("inject_s2", "inject", 2, 4, image(7, 6), (7, 6), 100),
        ("coarsest", "coarsest", 0, 8, None, (6, 5), 8),
    ]
    out = {}
    for name, mode, s, t_start, x_in, size, T in cases:
        n_noise = 1 + (t_start if t_start is not None else 11 if s == 1 else 5)
        out[name] = {"mode": mode, "s": s, "t_start": t_start, "size": list(size), "num_timesteps": T,
                     "x_in": x_in, "noise": noises(n_noise, *size)}
    return {"weight": weight, "bias": bias, "cases": out}


def run_official(models, inp: dict, case: dict) -> dict:
    """Run one case through the official sampler; returns the recorded trajectory."""
    net = ToyDenoiser(inp["weight"], inp["bias"])
    s, mode, size = case["s"], case["mode"], tuple(case["size"])
    diff = models.MultiScaleGaussianDiffusion(
        net, n_scales=3, scale_factor=1.4, image_sizes=[(4, 4), (5, 6), (6, 7)], timesteps=case["num_timesteps"],
        train_full_t=True, scale_losses=ERRORS, loss_factor=1, loss_type="l1", device="cpu",
        reblurring=mode != "ddpm")
    noise = list(case["noise"])
    used = []

    def next_noise(shape):
        z = noise[len(used)]
        assert tuple(z.shape) == tuple(shape), (z.shape, shape)
        used.append(z)
        return z.clone()

    # noise injection on the official objects only (no edit of the official code)
    q_sample = diff.q_sample
    diff.q_sample = lambda x_start, t, noise=None: q_sample(x_start, t, noise=next_noise(x_start.shape))
    models.noise_like = lambda shape, device, repeat=False: next_noise(shape)
    models.tqdm = lambda it, **kw: it

    x0_hats = []
    predict = diff.predict_start_from_noise

    def recording_predict(x_t, t, s, noise):
        x0, x_mix = predict(x_t, t=t, s=s, noise=noise)
        x0_hats.append(x0.detach().clone())  # before the in-place clamps of p_mean_variance
        return x0, x_mix

    diff.predict_start_from_noise = recording_predict

    if mode == "inject":  # MultiscaleTrainer.image2image: no mixing at the starting scale
        diff.gammas[s - 1].clamp_(0, 0)
    if mode == "coarsest":
        randn = torch.randn
        torch.randn = lambda shape, device=None: next_noise(shape)  # p_sample_loop's initial N(0, I)
        try:
            final = diff.sample(batch_size=BATCH, scale_0_size=size, s=0)
        finally:
            torch.randn = randn
        t_start = diff.num_timesteps
    else:
        t_start = case["t_start"] if case["t_start"] is not None else diff.num_timesteps_ideal[s]
        final = diff.sample_via_scale(BATCH, case["x_in"], s, custom_t=t_start, custom_image_size=size)

    steps = []
    for k, (t, s_call, x_t) in enumerate(net.calls):
        if s > 0 and diff.reblurring:
            gam = diff.gammas[s - 1].reshape(-1).clamp(0, 0.55)  # the sampler's clamp (p_mean_variance)
            g_t, g_prev = float(gam[t]), (float(gam[t - 1]) if t > 0 else 0.0)
        else:
            g_t = g_prev = 0.0
        steps.append({"t": t, "s": s_call, "x_t": x_t, "x0_hat": x0_hats[k], "gamma_t": g_t, "gamma_prev": g_prev})
    # self-check: the recorded gamma is the one the official step used
    ab = diff.alphas_cumprod
    for st in steps:
        if st["gamma_t"] > 0:
            x_mix = (st["x_t"] - (1 - ab[st["t"]]).sqrt() * net(st["x_t"], torch.full((BATCH,), st["t"]),
                                                                scale=s)) / ab[st["t"]].sqrt()
            net.calls.pop()
            want = (x_mix - st["gamma_t"] * diff.img_prev_upsample) / (1 - st["gamma_t"])
            assert torch.allclose(want, st["x0_hat"], atol=1e-5), "recorded gamma is not the one used"
    return {"t_start": int(t_start), "start_steps": [int(v) for v in diff.num_timesteps_ideal],
            "x_tilde": diff.img_prev_upsample if s > 0 else None, "steps": steps, "final": final,
            "noise_used": len(used)}


def to_json(v):
    if torch.is_tensor(v):
        return torch.round(v.double() * 1e8).div(1e8).tolist() if v.is_floating_point() else v.tolist()
    if isinstance(v, dict):
        return {k: to_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_json(x) for x in v]
    return v


def load_reference(path: Path = OUT) -> dict:
    """The stored file with every nested list turned back into a float32 tensor where it is one."""
    ref = json.loads(path.read_text())
    tensor_keys = {"weight", "bias", "x_in", "x_tilde", "x_t", "x0_hat", "final"}

    def conv(d):
        if isinstance(d, dict):
            return {k: (torch.tensor(v, dtype=torch.float32) if k in tensor_keys and v is not None
                        else [torch.tensor(z, dtype=torch.float32) for z in v] if k == "noise" else conv(v))
                    for k, v in d.items()}
        if isinstance(d, list):
            return [conv(x) for x in d]
        return d

    return conv(ref)


def compute(official: Path) -> dict:
    sys.path.insert(0, str(official))
    import SinDDM.models as models

    inp = fixed_inputs()
    cases = {}
    for name, case in inp["cases"].items():
        cases[name] = {**case, "official": run_official(models, inp, case)}
    commit = "e7107d9fd198928f26e278f99ec428e261726a45"
    try:
        import subprocess

        commit = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return to_json({
        "source": (f"computed by tests/reference/make_sinddm_refine_reference.py with SinDDM/models.py "
                   f"(MultiScaleGaussianDiffusion) of fallenshock/SinDDM at {commit}, torch {torch.__version__}; "
                   f"inputs (weight, bias, x_in, noise) are this script's fixed inputs, everything under "
                   f"'official' was computed by the official sampler"),
        "errors": ERRORS, "batch": BATCH, "weight": inp["weight"], "bias": inp["bias"], "cases": cases,
    })


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
