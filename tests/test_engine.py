"""The engine on tiny models built in code: coexisting views, typed features, the pixel back end,
guidance rules and step indices, the guided DDIM loop."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from core.guidance import StepClock, cfg, step_index  # noqa: E402
from core.layerdiffusion.guidance import alternating_choice  # noqa: E402
from core.sine.guidance import model_guidance  # noqa: E402
from core.lora import LoRAConfig, make_loras  # noqa: E402
from core.pixel import DiffusersPixel, save_pixel_folder, save_pixel_unet  # noqa: E402
from core.sampling import ddim_loop  # noqa: E402
from core.seam import DeltaFunction, Denoiser, Features, LatentDiffusion, ViewSpec  # noqa: E402
from tiny_sd import tiny_sd_model  # noqa: E402


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_model(0)


def tiny_pixel_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pixel():
    from core.diffusion import alphas_cumprod

    return DiffusersPixel(tiny_pixel_unet(), alphas_cumprod(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)))


def random_loras(model, seed: int, std: float = 0.05):
    params = model.unet_parameters()
    loras = make_loras({k: tuple(v.shape) for k, v in params.items()}, LoRAConfig(rank=2, alpha=2), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for lora in loras.values():
            lora.up.normal_(std=std, generator=g)
    return loras


def inputs(sd, b: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, 4, size, size, generator=g)
    t = torch.tensor([100, 800])[:b]
    return x, t, sd.encode_text(["a cat"]).expand(b, -1, -1)


def test_backends_satisfy_the_protocols(sd, pixel):
    assert isinstance(sd, LatentDiffusion) and isinstance(sd, Denoiser)
    assert isinstance(pixel, Denoiser) and not isinstance(pixel, LatentDiffusion)


def test_two_views_give_their_own_eps_inside_one_step_without_touching_the_base(sd):
    x, t, c = inputs(sd)
    loras = random_loras(sd, 1)
    name = sorted(sd.unet_parameters())[10]
    delta = {name: DeltaFunction(torch.randn_like(sd.unet_parameters()[name]) * 0.5)}
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    with torch.no_grad():
        base_ref = sd.eps(x, t, c)
        with sd.adapted(loras) as m:
            lora_ref = m.eps(x, t, c)
        with sd.adapted(delta) as m:
            delta_ref = m.eps(x, t, c)
        with sd.views(ViewSpec(loras), ViewSpec(delta)) as (base, a, b):
            # interleaved inside one "step", twice, in different orders
            got = [a.eps(x, t, c), base.eps(x, t, c), b.eps(x, t, c), sd.eps(x, t, c), b.eps(x, t, c),
                   a.eps(x, t, c)]
    for out, ref in zip(got, [lora_ref, base_ref, delta_ref, base_ref, delta_ref, lora_ref]):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert (lora_ref - base_ref).abs().max() > 1e-3 and (delta_ref - base_ref).abs().max() > 1e-3
    after = sd.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("parametrizations" in n for n, _ in sd.unet.named_modules())
    assert not sd.unet.conv_in._forward_hooks


def test_views_train_with_gradient_checkpointing_inside_activated(sd):
    """A view's weights during backward recomputation are the view's (activated() spans backward)."""
    x, t, c = inputs(sd, 1)
    grads = []
    for ckpt in (False, True):
        loras = random_loras(sd, 3)
        target = loras[sorted(loras)[5]]
        sd.unet.train()
        with sd.views(ViewSpec(loras), gradient_checkpointing=ckpt, differentiable=True) as (_, v):
            with v.activated():
                v.eps(x, t, c).pow(2).mean().backward()
        sd.unet.eval()
        grads.append(target.down.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert grads[0].abs().sum() > 0


def hand_copy_with_map(unet, fmap, box):
    """A copied UNet whose conv_in output gets fmap added: the reference for Features.input_map."""

    class AddMap(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            h = self.conv(x)
            return h + fmap(h, box)

    ref = copy.deepcopy(unet)
    ref.conv_in = AddMap(ref.conv_in)
    return ref


def grid_map(h, box):
    """A position-dependent map [B, C, H, W]; the crop box shifts it per sample."""
    b, ch, hh, ww = h.shape
    yy = torch.linspace(0, 1, hh).view(1, 1, hh, 1)
    xx = torch.linspace(0, 1, ww).view(1, 1, 1, ww)
    k = torch.arange(ch).view(1, ch, 1, 1).float()
    shift = box[:, :1].view(b, 1, 1, 1) if box is not None else 0
    return torch.sin(3 * xx + k) * torch.cos(2 * yy + shift) * 0.5


def test_input_map_feature_equals_a_hand_copied_forward(sd, pixel):
    x, t, c = inputs(sd)
    box = torch.tensor([[0.0, 0, 8, 8], [2.0, 1, 4, 4]])
    f = Features(input_map=grid_map, crop_box=box)
    with torch.no_grad():
        ref_unet = hand_copy_with_map(sd.unet, grid_map, box)
        ref = ref_unet(x, t, encoder_hidden_states=c).sample
        got = sd.eps(x, t, c, f)
        plain = sd.eps(x, t, c)
        # a view may carry the map as its default feature: only its calls get it
        with sd.views(ViewSpec(features=f)) as (base, fv):
            got_view, got_base = fv.eps(x, t, c), base.eps(x, t, c)
        xp = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        ref_p = hand_copy_with_map(pixel.unet, grid_map, box)(xp, t).sample
        got_p = pixel.eps(xp, t, features=f)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_view, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_base, plain)
    torch.testing.assert_close(got_p, ref_p, rtol=1e-5, atol=1e-6)
    assert (got - plain).abs().max() > 1e-3
    assert not sd.unet.conv_in._forward_hooks and not pixel.unet.conv_in._forward_hooks


class PerSampleScale(torch.nn.Module):
    """A per-call, per-sample modulation of a conv: W_b = W (1 + d_b), applied on the output
    (y + d_b * conv(x, W)), which a weight function cannot express."""

    def __init__(self, d):
        super().__init__()
        self.d = d  # [B]

    def forward(self, w):  # unused: output_delta takes precedence
        return w

    def output_delta(self, module, x):
        y = torch.nn.functional.conv2d(x, module.weight, None, module.stride, module.padding, module.dilation)
        return self.d.view(-1, 1, 1, 1).to(y) * y


def test_per_call_modulation_and_pixel_views(pixel):
    name = "down_blocks.0.resnets.0.conv1.weight"
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([10, 500])
    w = pixel.unet_parameters()[name]
    with torch.no_grad():
        base_ref = pixel.eps(x, t)
        # per-sample scale d = (0.3, 0): sample 0 is modulated, sample 1 is not
        with pixel.adapted({name: DeltaFunction(w * 0.3)}) as m:
            scaled_ref = m.eps(x, t)
        with pixel.views(ViewSpec(modulates=(name,))) as (base, mod):
            got = mod.eps(x, t, features=Features(modulation={name: PerSampleScale(torch.tensor([0.3, 0.0]))}))
            got_base = base.eps(x, t)
            with pytest.raises(ValueError, match="view"):
                pixel.eps(x, t, features=Features(modulation={name: PerSampleScale(torch.tensor([0.3, 0.0]))}))
    torch.testing.assert_close(got[0], scaled_ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], base_ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_base, base_ref)
    assert (scaled_ref[0] - base_ref[0]).abs().max() > 1e-3
    with pytest.raises(KeyError, match="modulates"):
        with pixel.views(ViewSpec({name: DeltaFunction(w * 0)})) as (_, v):
            v.eps(x, t, features=Features(modulation={name: DeltaFunction(w * 0.1)}))
    other = "up_blocks.1.resnets.0.conv2.weight"  # a name the view did not declare is refused, not ignored
    with pytest.raises(KeyError, match="modulates"):
        with pixel.views(ViewSpec(modulates=(name,))) as (_, v):
            v.eps(x, t, features=Features(modulation={other: DeltaFunction(w * 0.1)}))


def test_pixel_model_loads_from_a_folder_and_a_single_file(tmp_path, pixel):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([321])
    with torch.no_grad():
        ref = pixel.eps(x, t)
        for path in (save_pixel_folder(pixel.unet, tmp_path / "folder"),
                     save_pixel_unet(pixel.unet, tmp_path / "one.safetensors", pixel.alphas_cumprod)):
            loaded = DiffusersPixel.load(path)
            assert torch.equal(loaded.eps(x, t), ref), path
            torch.testing.assert_close(loaded.alphas_cumprod, pixel.alphas_cumprod)


def test_model_guidance_is_eq3_and_its_multi_model_form():
    g = torch.Generator().manual_seed(0)
    u, c, f1, f2 = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(4))
    w, v, K = 7.5, 0.7, 400
    single = model_guidance(u, c, [f1], [1 - v], w, t=401, K=K)
    torch.testing.assert_close(single, w * (v * c + (1 - v) * f1) + (1 - w) * u)
    torch.testing.assert_close(model_guidance(u, c, [f1], [1 - v], w, t=400, K=K), u + w * (c - u))
    multi = model_guidance(u, c, [f1, f2], [0.4, 0.5], w, t=900, K=K)
    torch.testing.assert_close(multi, u + w * (0.1 * c + 0.4 * f1 + 0.5 * f2 - u))
    torch.testing.assert_close(cfg(u, c, 1.0), c)
    # affine with weights summing to 1: mixing x0 = x - s*eps equals x0 of the mixed eps
    x, s = torch.randn(2, 4, 3, 3, generator=g), 2.5
    x0 = model_guidance(x - s * u, x - s * c, [x - s * f1], [0.3], w, 900, K)
    torch.testing.assert_close(x0, x - s * model_guidance(u, c, [f1], [0.3], w, 900, K), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        model_guidance(u, c, [f1], [0.3, 0.2], w, 900, K)


def test_alternating_choice_by_step_index_not_timestep_parity():
    assert [alternating_choice(i) for i in range(5)] == [0, 1, 0, 1, 0]
    assert [alternating_choice(i, 1) for i in range(4)] == [1, 0, 1, 0]
    sd_ddim_timesteps = list(range(981, 0, -20))
    assert all(t % 2 == 1 for t in sd_ddim_timesteps)  # the trap: literal t % 2 never alternates
    with pytest.raises(ValueError):
        alternating_choice(0, 2)


def run_diffusers_scheduler(name: str, steps: int = 8) -> tuple[list[int], list[str]]:
    """Drive a real diffusers sampler; return the step index our clock gives each model call."""
    import diffusers

    from core.diffusion import sd_alphas_cumprod

    sched = getattr(diffusers, name)(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                     beta_end=0.012)
    sched.set_timesteps(steps)
    ab = sd_alphas_cumprod()
    if hasattr(sched, "sigmas") and sched.sigmas is not None and name != "DDIMScheduler":
        grid = sched.sigmas.double()
        sigma_of = lambda i, t: float(sched.sigmas[sched.step_index if sched.step_index is not None else 0])
    else:  # DDIM: sigma of each timestep (ComfyUI's ddim = euler on these sigmas)
        grid = torch.cat([((1 - ab[sched.timesteps]) / ab[sched.timesteps]).sqrt(), torch.zeros(1, dtype=ab.dtype)])
        sigma_of = lambda i, t: float(((1 - ab[t]) / ab[t]).sqrt())
    clock = StepClock("test")
    x = torch.zeros(1, 1, 2, 2)
    seen, warns = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, t in enumerate(sched.timesteps):
            sigma = sigma_of(i, int(t))
            seen.append(clock(grid, sigma))
            x = sched.step(torch.zeros_like(x), t, x).prev_sample
        warns = [str(w.message) for w in caught]
    return seen, warns


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_step_index_follows_real_samplers_and_restarts_per_run(name):
    for _ in range(2):  # a second run with the same schedule starts again at 0
        seen, warns = run_diffusers_scheduler(name)
        assert seen == list(range(8)), seen
        assert not warns


def test_step_clock_warns_on_off_grid_evaluations():
    sig = torch.tensor([14.6, 5.0, 1.3, 0.03, 0.0])
    clock = StepClock("test")
    with pytest.warns(UserWarning, match="more than once per step"):
        got = [clock(sig, s) for s in (14.6, 1.3, 5.0, 1.3)]  # heun-like: corrector at the next sigma
    assert got == [0, 2, 1, 2]
    assert step_index(sig, 5.0) == 1 and step_index(sig, 4.0) == 1 and step_index(sig, 20.0) == 0


def test_guided_ddim_with_views_runs_the_finetuned_branch_only_where_eq3_needs_it(sd):
    _, _, c = inputs(sd, 1)
    u = sd.encode_text([""])
    loras = random_loras(sd, 5)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    calls = {"ft": 0}
    K, steps = 400, 10
    with torch.no_grad(), sd.views(ViewSpec(loras)) as (base, tuned):
        def rule(x, t, i):
            e_u, e_c = base.eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([u, c])).chunk(2)
            fts = []
            if int(t[0]) > K:
                calls["ft"] += 1
                fts = [tuned.eps(x, t, c)]
            return model_guidance(e_u, e_c, fts, [0.3] * len(fts), 5.0, int(t[0]), K)

        out = ddim_loop(rule, x_T, sd.alphas_cumprod, steps)
        # the same first step by hand
        t0 = torch.tensor([901])
        first = rule(x_T, t0, 0)
        e_u, e_c = sd.eps(x_T, t0, u), sd.eps(x_T, t0, c)
    with torch.no_grad(), sd.adapted(loras) as m:
        e_f = m.eps(x_T, t0, c)
    torch.testing.assert_close(first, e_u + 5.0 * (0.7 * e_c + 0.3 * e_f - e_u), rtol=1e-4, atol=1e-5)
    assert calls["ft"] == 1 + sum(1 for t in range(901, 0, -100) if t > K)  # +1: the hand-made first step
    assert out.shape == x_T.shape and torch.isfinite(out).all()
