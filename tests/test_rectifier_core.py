"""The rectifier's core (Hou et al. 2024): modulated layers, Delta = 0, per-sample modulation, training,
samplers, files, the CLI and DistributedDataParallel, on tiny pixel and SD models."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from test_engine import tiny_pixel_unet  # noqa: E402

from core.artifact_io import ArtifactError, atomic_save_safetensors  # noqa: E402
from core.diffusion import alphas_cumprod  # noqa: E402
from core.pixel import DiffusersPixel, save_pixel_folder  # noqa: E402
from core.rectifier import (  # noqa: E402
    RectifierConfig,
    RectifierInfo,
    SeparableModulation,
    TrainConfig,
    check_fits,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    invert_and_sample,
    load_rectifier,
    modulated_layers,
    new_rectifier,
    rectified,
    save_rectifier,
    train_rectifier,
)
from core.rectifier.layers import full_values, generated_values  # noqa: E402
from core.rectifier.modulation import delta_conv, delta_conv_loop, dense_delta  # noqa: E402
from core.rectifier.sample import inversion_schedule  # noqa: E402
from core.seam import DeltaFunction, Features  # noqa: E402
from tiny_sd import tiny_sd_model  # noqa: E402
from tiny_clip import random_open_clip_file, tiny_open_clip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(encoder_layers=(1, 1, 1, 1), width=8)


@pytest.fixture(scope="module")
def pixel():
    return DiffusersPixel(tiny_pixel_unet(), alphas_cumprod(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)))


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_model(0)


def perturbed(rectifier, seed=0, scale=0.05):
    """A copy whose A heads are no longer zero (Delta != 0)."""
    r = copy.deepcopy(rectifier)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in r.branches:
            b.head_a.weight.copy_(torch.randn(b.head_a.weight.shape, generator=g) * scale * 0.1)
            b.head_a.bias.copy_(torch.randn(b.head_a.bias.shape, generator=g) * scale)
    return r


# ---------------------------------------------------------------- which layers -----------------------------------
def test_modulated_layers_pixel_are_the_middle_and_up_block_convs(pixel):
    params = pixel.unet_parameters()
    layers = modulated_layers(params)
    names = [s.name for s in layers]
    convs = {n + ".weight" for n, m in pixel.unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    expected = sorted(n for n in convs if n.startswith(("mid_block.", "up_blocks.")) and "attentions" not in n)
    assert sorted(names) == expected
    assert not any(n.startswith(("down_blocks.", "conv_in", "conv_out", "time_embedding")) for n in names)
    kinds = sorted({n.split(".")[-2] for n in names})
    assert kinds == ["conv", "conv1", "conv2", "conv_shortcut"]
    assert all(params[s.name].shape == s.shape for s in layers)


def test_modulated_layer_counts_at_real_size():
    """SD 1.5: 43 kernels (middle 4, output blocks 24 + 12 skips + 3 up-samplers); the 256^2 CelebA-HQ DDPM: 63."""
    from diffusers import UNet2DModel

    from core.sd.keymap import unet_names
    from core.sd.loader import build_modules, read_config

    unet, _, _ = build_modules(read_config("unet"), read_config("vae"), read_config("text_encoder"))
    p = dict(unet.named_parameters())
    names = unet_names(p, read_config("unet"))
    layers = modulated_layers({names[k]: v for k, v in p.items()})
    kinds = {}
    for s in layers:
        key = s.name.split(".")[0] + "/" + {"2": "in_or_out", "3": "in_or_out"}.get(s.name.split(".")[-2],
                                                                                  s.name.split(".")[-2])
        kinds[key] = kinds.get(key, 0) + 1
    assert len(layers) == 43
    assert kinds == {"middle_block/in_or_out": 4, "output_blocks/in_or_out": 24, "output_blocks/skip_connection": 12,
                     "output_blocks/conv": 3}
    assert not any("proj_in" in s.name or "proj_out" in s.name or s.name.startswith("out.") for s in layers)
    assert full_values(layers) == 416_665_600 and generated_values(layers) == 656_640
    with torch.device("meta"):
        ddpm = UNet2DModel(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                           down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, layers_per_block=2)
    assert len(modulated_layers(dict(ddpm.named_parameters()))) == 63


def test_only_the_listed_layers_are_touched(pixel):
    params = pixel.unet_parameters()
    r = perturbed(new_rectifier(params, 3, **SMALL))
    x0 = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad(), rectified(pixel, r, x0) as R:
        seen = []
        orig = SeparableModulation.output_delta

        def spy(self, module, x):
            seen.append(module)
            return orig(self, module, x)

        SeparableModulation.output_delta = spy
        try:
            R.eps(torch.randn(1, 3, 16, 16), torch.tensor([500]))
        finally:
            SeparableModulation.output_delta = orig
    modules = dict(pixel.unet.named_modules())
    assert sorted(id(m) for m in seen) == sorted(id(modules[n.rsplit(".", 1)[0]]) for n in r.layer_names)


# ---------------------------------------------------------------- Delta = 0, per-sample -----------------------------
@pytest.mark.parametrize("estimate", ["base", "modulated"])
def test_fresh_rectifier_is_the_base_model_bit_for_bit(pixel, sd, estimate, one_thread):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 777])
    r = new_rectifier(pixel.unet_parameters(), 3, **SMALL)
    with torch.no_grad():
        plain = pixel.eps(x, t)
        with rectified(pixel, r, x.clamp(-1, 1), estimate=estimate) as R:
            assert torch.equal(R.eps(x, t), plain) and torch.equal(R.eps(x, t), plain)
        with rectified(pixel, perturbed(r), x.clamp(-1, 1), strength=0.0) as R:  # strength 0: also exact
            assert torch.equal(R.eps(x, t), plain)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    c = sd.encode_text(["a photo", ""])
    rs = new_rectifier(sd.unet_parameters(), 4, estimate_clip=4.0, **SMALL)
    with torch.no_grad():
        plain = sd.eps(z, t, c)
        with rectified(sd, rs, z, estimate=estimate) as R:
            assert torch.equal(R.eps(z, t, c), plain)


def test_per_sample_modulation_equals_a_loop_and_dense_weights(pixel, sd, one_thread):
    for model, ch, shape, cond in ((pixel, 3, (3, 3, 16, 16), None), (sd, 4, (3, 4, 8, 8), "text")):
        g = torch.Generator().manual_seed(3)
        x, x0 = torch.randn(shape, generator=g), torch.randn(shape, generator=g).clamp(-1, 1)
        t = torch.tensor([10, 400, 900])
        c = model.encode_text(["a", "b", ""]) if cond else None
        r = perturbed(new_rectifier(model.unet_parameters(), ch, **SMALL), seed=ch)
        with torch.no_grad(), rectified(model, r, x0) as R:
            p = R.base_estimate(x, t, c)
            batched = R.eps_with(x, t, p, c)
            deltas = r(x0, p, t)
            loop = torch.cat([R.modulated.eps(x[j:j + 1], t[j:j + 1], None if c is None else c[j:j + 1],
                                              Features(modulation={k: SeparableModulation(a[j:j + 1], cc[j:j + 1])
                                                                   for k, (a, cc) in deltas.items()}))
                              for j in range(3)])
            plain = R.base.eps(x, t, c)
        params = model.unet_parameters()
        dense = []
        for j in range(3):
            fns = {k: DeltaFunction(params[k] * dense_delta(a[j:j + 1], cc[j:j + 1])[0]) for k, (a, cc) in deltas.items()}
            with torch.no_grad(), model.adapted(fns) as m:
                dense.append(m.eps(x[j:j + 1], t[j:j + 1], None if c is None else c[j:j + 1]))
        dense = torch.cat(dense)
        torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched, dense, rtol=1e-4, atol=1e-5)
        assert (batched - plain).abs().max() > 1e-2  # the modulation does something
        # the samples differ: a per-sample Delta, not one Delta for the batch
        assert (deltas[r.layer_names[0]][0][0] - deltas[r.layer_names[0]][0][1]).abs().max() > 0


def test_grouped_conv_matches_loop_and_its_checkpointed_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 9, 9, generator=g, requires_grad=True)
    w = torch.randn(7, 5, 3, 3, generator=g)
    a = torch.randn(3, 7, 3, 3, generator=g, requires_grad=True)
    c = torch.randn(3, 5, 3, 3, generator=g, requires_grad=True)
    y = delta_conv(x, w, a, c, 2, 1, 1)
    torch.testing.assert_close(y, delta_conv_loop(x, w, a, c, 2, 1, 1), rtol=1e-5, atol=1e-5)
    conv = torch.nn.Conv2d(5, 7, 3, stride=2, padding=1)
    conv.weight.data.copy_(w)
    grads = []
    for ckpt in (False, True):
        out = SeparableModulation(a, c, 0.5, checkpoint=ckpt).output_delta(conv, x)
        grads.append(torch.autograd.grad(out.square().sum(), (x, a, c)))
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)
    with pytest.raises(ValueError, match="batch of 3"):
        SeparableModulation(a[:3], c[:3]).output_delta(conv, x[:2])


def test_delta_of_a_sample_does_not_depend_on_its_batch(pixel):
    """Per-sample normalisation: ComfyUI batches cond and uncond, and the images of a batch are unrelated."""
    for norm in ("group", "batch"):
        r = perturbed(new_rectifier(pixel.unet_parameters(), 3, encoder_norm=norm, **SMALL)).train()
        g = torch.Generator().manual_seed(9)
        x0, p = torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)
        t = torch.tensor([5, 500, 995])
        with torch.no_grad():
            together = r(x0, p, t)
            alone = r(x0[1:2], p[1:2], t[1:2])
        for name in r.layer_names[:3]:
            torch.testing.assert_close(together[name][0][1:2], alone[name][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(together[name][1][1:2], alone[name][1], rtol=1e-5, atol=1e-6)


def test_resnet34_rectifier_trains_stably_at_the_papers_lr(pixel, one_thread):
    """The paper's encoder (ResNet-34, random init) at lr 1e-3: with BatchNorm frozen at its initial statistics the
    residual stream blew up within a few Adam steps (NaN by step 4); GroupNorm keeps it bounded."""
    g = torch.Generator().manual_seed(11)
    x0 = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    r = new_rectifier(pixel.unet_parameters(), 3, width=8)
    assert r.config.encoder_layers == (3, 4, 6, 3)
    res = train_rectifier(pixel, r, x0, TrainConfig(steps=20, batch=4, lr=1e-3))
    assert all(torch.isfinite(torch.tensor(res.losses)))
    with torch.no_grad():
        f = r.encoder(torch.cat([x0[:2], x0[:2]], 1))
    # measured: GroupNorm 9.4; the frozen-BatchNorm encoder reaches 154 here (and 1.3e5, then NaN, at 256^2)
    assert f.abs().max() < 50 and max(res.losses[-4:]) < 2 * max(res.losses[:4])


# ---------------------------------------------------------------- training, sampling ------------------------------
def test_recon_training_lowers_the_loss_and_edit_needs_clip(pixel, one_thread):
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    r = new_rectifier(pixel.unet_parameters(), 3, **SMALL)
    before = {k: v.clone() for k, v in r.state_dict().items()}
    res = train_rectifier(pixel, r, x0, TrainConfig(steps=30, batch=4, lr=1e-3))
    assert len(res.losses) == 30 and all(torch.isfinite(torch.tensor(res.losses)))
    moved = [k for k, v in r.state_dict().items() if not torch.equal(v, before[k])]
    assert any("head_a" in k for k in moved) and any("encoder" in k for k in moved)
    rb = new_rectifier(pixel.unet_parameters(), 3, encoder_norm="batch", **SMALL)  # the ImageNet-weights variant
    stats = {k: v.clone() for k, v in rb.state_dict().items() if "running" in k}
    train_rectifier(pixel, rb, x0, TrainConfig(steps=2, batch=4, lr=1e-3))
    assert stats and all(torch.equal(v, rb.state_dict()[k]) for k, v in stats.items())  # BatchNorm stays fixed
    # the paper's optimiser settings per mode
    fc = TrainConfig().fit_config()
    assert (fc.weight_decay, fc.decay_every, fc.decay_gamma, fc.lr) == (1e-5, 5000, 0.9, 1e-3)
    fc = TrainConfig(mode="edit").fit_config()
    assert (fc.weight_decay, fc.decay_every, fc.decay_gamma) == (0.0, 10, 0.9)
    with pytest.raises(ValueError, match="CLIP"):
        train_rectifier(pixel, r, x0, TrainConfig(mode="edit", steps=1))
    with pytest.raises(ValueError, match="channels"):
        train_rectifier(pixel, r, torch.zeros(2, 4, 16, 16), TrainConfig(steps=1))


def test_samplers_run_and_sdedit_starts_at_t0(pixel, one_thread):
    r = perturbed(new_rectifier(pixel.unet_parameters(), 3, **SMALL))
    x0 = torch.rand(1, 3, 16, 16) * 2 - 1
    ab = pixel.alphas_cumprod
    with torch.no_grad(), rectified(pixel, r, x0) as R:
        full = ddpm_sample(R, ab, (1, 3, 16, 16), steps=8, generator=torch.Generator().manual_seed(0), clip_x0=1.0)
        assert R.base_calls == 8  # one unmodulated pass per step (P_t of eq. 1)
        seen = []

        def eps_fn(x, t):
            seen.append(int(t[0]))
            return R(x, t)

        ddpm_sample(eps_fn, ab, steps=10, generator=torch.Generator().manual_seed(0), x_start=x0, t0=450,
                    clip_x0=1.0)
        assert seen and max(seen) <= 450 and seen == sorted(seen, reverse=True) and len(seen) < 10
        xT = ddim_invert(R, x0, ab, 10)
        back = ddim_sample(R, xT, ab, 10)
    assert full.shape == x0.shape and back.shape == x0.shape
    with pytest.raises(ValueError, match="t0"):
        ddpm_sample(R, ab, steps=10, x_start=x0, t0=1000)
    with torch.no_grad(), rectified(pixel, r, x0, estimate="modulated") as R:
        ddpm_sample(R, ab, (1, 3, 16, 16), steps=8, generator=torch.Generator().manual_seed(0), clip_x0=1.0)
        assert R.base_calls == 1  # the previous modulated estimate feeds R after the first step


# ---------------------------------------------------------------- files ----------------------------------------------
def test_save_load_identical_and_bad_files(tmp_path, pixel, sd, one_thread):
    r = perturbed(new_rectifier(pixel.unet_parameters(), 3, **SMALL))
    path = save_rectifier(r, RectifierInfo("pixel", "edit", "face", "smiling face", 10), tmp_path / "r.safetensors")
    r2, info = load_rectifier(path)
    assert (info.backbone, info.mode, info.target_text, info.steps) == ("pixel", "edit", "smiling face", 10)
    assert r2.config == r.config
    x0 = torch.rand(1, 3, 16, 16) * 2 - 1
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        with rectified(pixel, r, x0) as R:
            e1 = R.eps(x, torch.tensor([300]))
        with rectified(pixel, r2, x0) as R:
            e2 = R.eps(x, torch.tensor([300]))
    assert torch.equal(e1, e2)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="cut.safetensors"):
        load_rectifier(tmp_path / "cut.safetensors")
    atomic_save_safetensors({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(ArtifactError, match="not a High-Fidelity rectifier"):
        load_rectifier(tmp_path / "lora.safetensors")
    atomic_save_safetensors({"x": torch.zeros(1)}, tmp_path / "sine.safetensors", {"format": "sie.sine"})
    with pytest.raises(ArtifactError, match="SINE fine-tune, not a High-Fidelity rectifier"):
        load_rectifier(tmp_path / "sine.safetensors")
    with pytest.raises(ValueError, match="another network"):
        check_fits(r, sd.unet_parameters())
    with pytest.raises(ArtifactError, match="not found"):
        load_rectifier(tmp_path / "missing.safetensors")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic saves leave no temporary files


# ---------------------------------------------------------------- CLI and DDP ----------------------------------------
def _cli(*args, procs: int = 1, port: int = 29541):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    head = [sys.executable, "-m", "core.rectifier"]
    if procs > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                str(port), "-m", "core.rectifier"]
    return subprocess.run([*head, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("rect_cli")
    save_pixel_folder(tiny_pixel_unet(), root / "model")
    (root / "imgs").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(root / "imgs" / f"{i}.png")
    return root


@pytest.mark.slow
def test_ddp_two_gloo_processes_equal_one_process_with_the_doubled_batch(cli_data):
    common = ["train", "--model", cli_data / "model", "--images", cli_data / "imgs", "--steps", 3,
              "--encoder-blocks", "1,1,1,1", "--width", 8, "--device", "cpu", "--seed", 7]
    one = _cli(*common, "--batch", 4, "--out", cli_data / "one.safetensors")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cli(*common, "--batch", 2, "--out", cli_data / "two.safetensors", procs=2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 process(es)" in two.stdout
    r1, info1 = load_rectifier(cli_data / "one.safetensors")
    r2, info2 = load_rectifier(cli_data / "two.safetensors")
    fresh = new_rectifier(r1.config.layers and {s.name: torch.zeros(s.shape) for s in r1.config.layers}, 3,
                          encoder_layers=(1, 1, 1, 1), width=8, seed=7)
    s1, s2, s0 = r1.state_dict(), r2.state_dict(), fresh.state_dict()
    diff = max((s1[k] - s2[k]).abs().max().item() for k in s1 if s1[k].is_floating_point())
    moved = max((s1[k] - s0[k]).abs().max().item() for k in s1 if s1[k].is_floating_point())
    # Adam divides by sqrt(v): where a gradient is ~0 its float-rounding differences (all-reduce vs one sum) can
    # move a weight by up to lr per step; everywhere else the runs agree far closer.  Tolerance: 2 % of the largest
    # move (3 steps at lr 1e-3).
    assert moved > 1e-3 and diff < 0.02 * moved, (diff, moved)
    assert info2.history[-1]["processes"] == 2 and info1.history[-1]["processes"] == 1


def test_cli_edit_and_errors(cli_data, tmp_path):
    out = _cli("train", "--model", cli_data / "model", "--images", cli_data / "imgs", "--steps", 2, "--batch", 2,
               "--encoder-blocks", "1,1,1,1", "--width", 8, "--device", "cpu", "--out", tmp_path / "r.safetensors")
    assert out.returncode == 0, out.stderr[-2000:]
    edit = ["edit", "--model", cli_data / "model", "--rectifier", tmp_path / "r.safetensors", "--image",
            cli_data / "imgs" / "0.png", "--steps", 4, "--device", "cpu", "--out", tmp_path / "o.png"]
    for extra, says in (([], "DDIM inversion by the rectifier itself"),  # the default: a recon rectifier inverts
                        (["--invert-with", "plain", "--plain-out", tmp_path / "p.png"], "DDIM inversion by plain"),
                        (["--start", "noise"], "DDPM from noise"), (["--t0", 400], "SDEdit from t0 400")):
        res = _cli(*edit, *extra)
        assert res.returncode == 0, res.stderr[-2000:]
        assert (tmp_path / "o.png").is_file() and says in res.stdout, res.stdout
        if "--plain-out" in extra:  # the plain model's round trip written too, both scored against the input
            assert (tmp_path / "p.png").is_file() and "plain vs the input: L1" in res.stdout, res.stdout
            assert "rectified vs the input: L1" in res.stdout
    for extra, flag in ((["--start", "sdedit"], "--t0"), (["--start", "inversion", "--t0", 300], "--t0"),
                        (["--start", "noise", "--plain-out", tmp_path / "p.png"], "--plain-out"),
                        (["--invert-with", tmp_path / "missing.safetensors"], "--invert-with")):
        bad = _cli(*edit, *extra)
        assert bad.returncode == 2 and flag in bad.stderr, (extra, bad.stderr[-1000:])
    bad = _cli("train", "--model", cli_data / "model", "--images", tmp_path / "none", "--out", tmp_path / "x.safetensors")
    assert bad.returncode == 2 and "--images" in bad.stderr
    bad = _cli("train", "--mode", "edit", "--model", cli_data / "model", "--images", cli_data / "imgs", "--out",
               tmp_path / "x.safetensors")
    assert bad.returncode == 2 and "--clip" in bad.stderr
    bad = _cli("edit", "--model", cli_data / "model", "--rectifier", cli_data / "imgs" / "0.png", "--image",
               cli_data / "imgs" / "0.png", "--out", tmp_path / "o.png")
    assert bad.returncode == 2 and "PNG image" in bad.stderr
    bad = _cli("edit", "--model", cli_data / "model", "--rectifier", tmp_path / "r.safetensors", "--image",
               cli_data / "imgs" / "0.png", "--out", tmp_path / "o.png", "--t0", 1000)
    assert bad.returncode == 2 and "--t0" in bad.stderr


# ---------------------------------------------------------------- trajectories, inversion ---------------------------
def test_modulated_estimate_needs_t_to_decrease_and_resets_between_inversion_and_sampling(pixel, one_thread):
    """estimate="modulated" feeds R the previous call's estimate only while t decreases (a sampling trajectory);
    ddim_invert runs t upwards, and every sampler starts a new trajectory, so the inversion's last estimate (at
    t = 999, of the *inverted* x) never feeds the first sampling step."""
    r = perturbed(new_rectifier(pixel.unet_parameters(), 3, **SMALL))
    x0 = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    ab = pixel.alphas_cumprod
    with torch.no_grad(), rectified(pixel, r, x0, estimate="modulated") as R:
        R.eps(x, torch.tensor([500]))
        R.eps(x, torch.tensor([400]))  # t decreases: the previous estimate, no base pass
        assert R.base_calls == 1
        R.eps(x, torch.tensor([600]))  # t rises: a new trajectory, a base pass
        R.eps(x, torch.tensor([600]))  # the same t again: also a base pass
        assert R.base_calls == 3
        R.base_calls = 0
        x_T = ddim_invert(R, x0, ab, 10)
        assert R.base_calls == 10  # t rises at every inversion step: the base model's estimate each time
        first = {}
        orig = R.eps_with

        def spy(x_t, t, estimate, cond=None):
            first.setdefault("p", estimate.clone())
            return orig(x_t, t, estimate, cond)

        R.eps_with = spy
        ddim_sample(R, x_T, ab, 10)
        assert R.base_calls == 11  # one base pass at the start of the sampling trajectory, then the modulated ones
        expected = R.base_estimate(x_T, torch.tensor([999]), None)
        assert torch.equal(first["p"], expected)
        R.reset()
        assert R.previous is None and R.previous_t is None


def test_invert_and_sample_inverts_with_the_plain_model_and_samples_with_the_rectified_one(pixel, one_thread):
    r = perturbed(new_rectifier(pixel.unet_parameters(), 3, **SMALL))
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    ab = pixel.alphas_cumprod
    plain = lambda x, t: pixel.eps(x, t)  # noqa: E731
    with torch.no_grad(), rectified(pixel, r, x0) as R:
        x_T, out = invert_and_sample(plain, R, x0, ab, 6)
        assert torch.equal(x_T, ddim_invert(plain, x0, ab, 6))
        assert torch.equal(out, ddim_sample(R, x_T, ab, 6))
        assert (out - ddim_sample(plain, x_T, ab, 6)).abs().max() > 1e-3  # the rectifier acts on the way back
    assert inversion_schedule(ab, 4) == [999, 749, 499, 249]


# ---------------------------------------------------------------- hypernetwork details ------------------------------
def test_branch_time_projection_is_the_unet_resblocks_silu_then_linear(pixel):
    """Supplement A: the time embedding enters every branch "the same way as U-Net": a ResBlock adds
    temb_proj(SiLU(temb)) to its first conv's output (DDPM, iDDPM, diffusers)."""
    r = new_rectifier(pixel.unet_parameters(), 3, **SMALL)
    b = r.branches[0]
    g = torch.Generator().manual_seed(8)
    f, temb = torch.randn(2, 512, 4, 4, generator=g), torch.randn(2, r.config.time_dim, generator=g) * 3
    with torch.no_grad():
        proj = torch.nn.functional.linear(temb * torch.sigmoid(temb), b.temb.weight, b.temb.bias)  # [2, width]
        h = torch.nn.functional.leaky_relu(b.conv_in(f) + proj[:, :, None, None], 0.2)
        for conv in b.convs:
            h = torch.nn.functional.leaky_relu(conv(h), 0.2)
        h = h.mean(dim=(2, 3))
        a, c = b(f, temb)
    torch.testing.assert_close(c.flatten(1), b.head_c(h))
    assert r.config.branch_silu and r.config.to_json()["branch_silu"] is True
    old = dict(r.config.to_json())
    del old["branch_silu"]  # a file saved before the SiLU existed keeps computing as it was trained
    assert RectifierConfig.from_json(old).branch_silu is False


# ---------------------------------------------------------------- distributed: a NaN on one rank --------------------
@pytest.mark.slow
def test_a_nan_batch_on_one_rank_stops_every_rank_at_the_same_step():
    """Two gloo processes; rank 1's first batch holds a NaN image (tests/rectifier_ddp_nan.py).  Every rank must
    raise at step 1 naming rank 1, and the job must end (before: rank 1 stopped alone after its step, having
    poisoned the shared gradients, and rank 0 went on to wait in the next gradient all-reduce, for good)."""
    import signal
    import uuid

    token = uuid.uuid4().hex  # marks this job's worker processes (torchrun starts each in its own session)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "rectifier_ddp_nan.py"), token]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher we started
        out, err = proc.communicate()
        pytest.fail(f"the job hung:\n{out[-2000:]}\n{err[-2000:]}")
    finally:
        for pid in _pids_with(token):  # its workers, if any outlived it
            os.kill(pid, signal.SIGKILL)
    lines = sorted(line for line in out.splitlines() if line.startswith("rank "))
    assert len(lines) == 2, (out[-2000:], err[-3000:])
    for rank, line in enumerate(lines):
        assert line.startswith(f"rank {rank}: FloatingPointError:"), line
        assert "not finite at step 1 on rank 1 of 2" in line, line
    assert proc.returncode != 0


def _pids_with(token: str) -> list[int]:
    """Processes whose command line holds ``token`` (this test's own workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if token.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


# ---------------------------------------------------------------- CLI edit training, end to end ----------------------
def small_open_clip() -> Path:
    """A random-weight OpenCLIP ViT-S-32 in safetensors (the smallest registered ViT), made once and cached."""
    return random_open_clip_file("ViT-S-32", "random_open_clip_vit_s32.safetensors")


@pytest.mark.slow
def test_cli_edit_training_runs_end_to_end(cli_data, tmp_path):
    """python -m core.rectifier train --mode recon, then --mode edit continued from it (Alg. 1, a random OpenCLIP):
    the edit file records both runs with finite losses, and the edit steps moved R.  (On a GPU the same run is a
    stage of benchmarks/gpu_suite.py: there the step's CLIP source images were indexed across devices.)"""
    clip = small_open_clip()
    common = ["--model", cli_data / "model", "--images", cli_data / "imgs", "--steps", 2, "--batch", 2,
              "--encoder-blocks", "1,1,1,1", "--width", 8, "--device", "cpu"]
    recon = _cli("train", *common, "--out", tmp_path / "recon.safetensors")
    assert recon.returncode == 0, recon.stderr[-2000:]
    edit = _cli("train", "--mode", "edit", *common, "--continue", tmp_path / "recon.safetensors", "--clip", clip,
                "--clip-arch", "ViT-S-32", "--source", "photo", "--target", "painting", "--out",
                tmp_path / "edit.safetensors")
    assert edit.returncode == 0, edit.stderr[-3000:]
    r0, _ = load_rectifier(tmp_path / "recon.safetensors")
    r1, info = load_rectifier(tmp_path / "edit.safetensors")
    assert info.mode == "edit" and (info.source_text, info.target_text) == ("photo", "painting")
    assert [h["mode"] for h in info.history] == ["recon", "edit"] and info.steps == 4
    assert all(torch.isfinite(torch.tensor(h["final_loss"])) for h in info.history)
    moved = max((a - b).abs().max().item() for a, b in zip(r0.state_dict().values(), r1.state_dict().values())
                if a.is_floating_point())
    assert moved > 0


def _tiny_clip():
    """A random two-layer OpenCLIP (32 px) for CLIP-loss plumbing tests."""
    return tiny_open_clip()


def test_cli_sd_edit_training_compares_with_the_decoded_originals(cli_data, tmp_path, monkeypatch, one_thread):
    """python -m core.rectifier train --mode edit on SD: the CLIP source images (x_src of eq. 4) are the training
    latents through the VAE decoder, as x0_hat is rendered and as the node does, not the image files: the VAE's own
    reconstruction error is then no part of the image direction dI."""
    import core.rectifier.clip_direction as cd
    import core.clip_model as cg
    from core.images import load_image
    from core.rectifier.__main__ import image_paths, main
    from core.rectifier.train import draw
    from core.sd.loader import load_sd15
    from tiny_sd import build_tiny, write_diffusers_folder

    folder = write_diffusers_folder(tmp_path / "sd", *build_tiny(0))
    monkeypatch.setattr(cg, "load_open_clip", lambda path, arch, device: _tiny_clip())
    seen = []
    loss = cd.DirectionalCLIP.loss

    def spy(self, x_edit, x_src):
        seen.append(x_src.detach().clone())
        return loss(self, x_edit, x_src)

    monkeypatch.setattr(cd.DirectionalCLIP, "loss", spy)
    main(["train", "--mode", "edit", "--kind", "sd", "--model", str(folder), "--images", str(cli_data / "imgs"),
          "--size", "32", "--steps", "1", "--batch", "2", "--encoder-blocks", "1,1,1,1", "--width", "8", "--device",
          "cpu", "--clip", str(tmp_path / "clip.safetensors"), "--source", "photo", "--target", "painting", "--out",
          str(tmp_path / "edit.safetensors")])
    model = load_sd15(folder, device="cpu")
    images = torch.cat([load_image(p, 32) for p in image_paths([str(cli_data / "imgs")])])  # [6, 3, 32, 32]
    with torch.no_grad():
        decoded = model.decode(torch.cat([model.encode(images[i:i + 1]) for i in range(len(images))]))
    idx = draw(1, 0, len(images), 2, (4, 4, 4), len(model.alphas_cumprod))[0]
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], decoded[idx], rtol=1e-4, atol=1e-4)
    assert (seen[0] - images[idx]).abs().max() > 0.05  # the files themselves are another picture for this VAE
