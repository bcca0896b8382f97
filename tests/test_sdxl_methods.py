"""SINE, LayerDiffusion and the rectifier on SDXL: their equations hold as on SD 1.5 (issue 21).

On the tiny SDXL of :func:`tiny_sd.tiny_sdxl_model` (diffusers back end, the "text_time" added
conditioning, 32 channels out of the first block), at realistic settings: classifier-free guidance
scales != 1, batches > 1 with distinct prompts, distinct images and masks, non-square latents
[B, 4, 8, 12] (a 64 x 96 image: size conditioning h != w).  The conditioning is the seam's packed
tensor [B, 78, 64]: the context in rows 0..76, the pooled vector in the first 24 entries of row 77.

Every expected value comes from separate model calls: :func:`hand`, the diffusers UNet called by
hand with the context, the pooled vector and the size conditioning sliced and spelt out here (not
through the back end or :func:`core.seam.unpack_cond`); where a method changes the network, on copies
of the UNet that the test adapts itself (LoRA factors merged from the ComfyUI-layout file keys, the
rectifier's per-sample offsets, SINE's positional map added after ``conv_in``).  The rectifier's
layer list is also counted on a full-size SDXL UNet built on the meta device (33 kernels; SD 1.5: 43).
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from core.diffusion import q_sample, timesteps  # noqa: E402
from core.layerdiffusion import (  # noqa: E402
    OBJECT,
    OPT,
    GuidanceConfig,
    LayeredFineTuneConfig,
    LayerEmbeddingConfig,
    finetune_layered,
    interpolate_layers,
    iterative_sample,
    optimize_layers,
    schedule,
)
from core.lora import LoRAConfig  # noqa: E402
from core.losses import NoiseDraw, denoising_loss  # noqa: E402
from core.rectifier import modulated_layers, new_rectifier, rectified  # noqa: E402
from core.rectifier.layers import full_values, generated_values  # noqa: E402
from core.sampling import ddim_loop  # noqa: E402
from core.seam import Features  # noqa: E402
from core.sine import (  # noqa: E402
    PatchConfig,
    PositionalMap,
    SineFineTuneConfig,
    edit,
    finetune_sine,
    first_block_channels,
    load_sine,
    positional_grid,
    save_sine,
)
from core.sine.patches import PatchSampler  # noqa: E402
from helpers import ROOT  # noqa: E402
from tiny_sd import TINY_XL_POOLED, tiny_sdxl_model  # noqa: E402
from test_rectifier_core import perturbed  # noqa: E402  (the A heads made nonzero, one definition)

P = TINY_XL_POOLED  # the pooled vector's width (24); the context is 77 tokens of 64
IMAGE = ROOT / "core/sinddm/data/coffee_128x100.png"
PATCH = PatchConfig(high_resolution=128, size=64)  # a 16 x 16 positional grid, 8 x 8 latent crops
SHAPE = (2, 4, 8, 12)  # batch 2, non-square: a 64 x 96 image
SMALL = dict(encoder_layers=(1, 1, 1, 1), width=8)  # a small rectifier encoder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny networks run far faster on one thread (and do not fight a busy machine for cores); module-wide,
    so that the module's fixtures (the SINE fine-tune) run on one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def xl():
    return tiny_sdxl_model(0)


@pytest.fixture(scope="module")
def real_sdxl():
    """Full-size SDXL UNet parameters (meta device) under their canonical (original-layout) names."""
    from core.sd.keymap import unet_names
    from core.sd.loader import XL_CONFIG_DIR, build_modules, read_config

    ucfg = read_config("unet", XL_CONFIG_DIR)
    unet, _, _ = build_modules(ucfg, read_config("vae", XL_CONFIG_DIR), read_config("text_encoder", XL_CONFIG_DIR),
                               "meta")
    p = dict(unet.named_parameters())
    names = unet_names(p, ucfg)
    return {names[k]: v for k, v in p.items()}


# ------------------------------------------------------------------------------------- by hand
def hand(unet, x, t, cond):
    """SDXL's eps as diffusers' pipeline calls the UNet, from a packed cond sliced by hand: encoder states
    = rows 0..N-1, text_embeds = the first 24 entries of the last row, time_ids = (original h, w, crop
    top, left, target h, w) of the 8x larger image.  A cond of batch 1 is repeated over x's batch."""
    b, h, w = x.shape[0], x.shape[-2] * 8, x.shape[-1] * 8
    cond = cond.expand(b, -1, -1) if cond.shape[0] == 1 else cond
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(b, 1)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond[:, :-1],
                    added_cond_kwargs={"text_embeds": cond[:, -1, :P], "time_ids": time_ids}).sample


def merged_lora_unet(model, delta: dict[str, torch.Tensor]):
    """A copy of the model's UNet with every LoRA of a ComfyUI-layout delta merged into its weight:
    W += alpha / rank * up @ down (conv kernels through their flattened view, as ComfyUI applies them).
    ``diffusion_model.<original path>`` is mapped to the diffusers module by the back end's key map."""
    unet = copy.deepcopy(model.unet)
    names = model.canonical_names()
    params = dict(unet.named_parameters())
    downs = [k for k in delta if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith("diffusion_model.") for k in delta)
    with torch.no_grad():
        for k in downs:
            module = k[len("diffusion_model."):-len(".lora_down.weight")]
            down = delta[k].flatten(1)
            up = delta[f"diffusion_model.{module}.lora_up.weight"].flatten(1)
            alpha = float(delta[f"diffusion_model.{module}.alpha"])
            w = params[names[module + ".weight"]]
            w.add_((up @ down).reshape(w.shape) * (alpha / down.shape[0]))
    return unet


class AddWholeMap(torch.nn.Module):
    """conv_in followed by SINE's F(v) of the whole grid, resized (bilinear, corners aligned) to the latent."""

    def __init__(self, conv, grid):
        super().__init__()
        self.conv, self.grid = conv, grid

    def forward(self, x):
        h = self.conv(x)
        return h + F.interpolate(self.grid, h.shape[-2:], mode="bilinear", align_corners=True)


def photo_latent(hw=(8, 12)) -> torch.Tensor:
    """An image-like model-space latent [1, 4, h, w] from the bundled photo (as the LayerDiffusion tests)."""
    img = Image.open(IMAGE).convert("RGB").resize((hw[1] * 8, hw[0] * 8))
    x = torch.from_numpy(np.asarray(img).astype("float32") / 255).permute(2, 0, 1)[None] * 2 - 1
    small = F.avg_pool2d(x, 8)
    return torch.cat([small, small.mean(1, keepdim=True)], 1) * 1.5


def box(rows: slice, cols: slice, hw=(8, 12)) -> torch.Tensor:
    m = torch.zeros(1, 1, *hw)
    m[..., rows, cols] = 1
    return m


M_IMG = box(slice(1, 6), slice(2, 6))  # the photo's object
M_REF = box(slice(4, 8), slice(7, 11))  # the reference's object, elsewhere


def check_grad_mask(grad: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    m = mask.expand_as(grad).bool()
    assert torch.equal(grad[~m], torch.zeros(int((~m).sum()))), f"{what}: gradient outside its mask"
    assert bool((grad[m] != 0).all()), f"{what}: no gradient inside its mask"


class Recorder:
    """The model as a stage sees it, recording every eps call (x_t, t, cond, the output with its gradient)."""

    def __init__(self, model, calls: list | None = None):
        self.model, self.calls = model, [] if calls is None else calls
        self.alphas_cumprod, self.device = model.alphas_cumprod, model.device

    def eps(self, x, t, cond=None, features=None):
        out = self.model.eps(x, t, cond, features)
        if out.requires_grad:
            out.retain_grad()
        self.calls.append(SimpleNamespace(x=x.detach().clone(), t=t.detach().clone(), cond=cond.detach().clone(),
                                          out=out))
        return out

    @contextmanager
    def adapted(self, weight_functions, gradient_checkpointing: bool = False):
        with self.model.adapted(weight_functions, gradient_checkpointing) as m:
            yield Recorder(m, self.calls)

    def __getattr__(self, name):
        return getattr(self.model, name)


def draw_of(call, latent, ab, row: int = 0):
    """(alpha_bar [1], eps) of a recorded call, if its row ``row`` noises ``latent``."""
    a = ab[call.t[:1].cpu()].float()
    eps = (call.x[row:row + 1] - a.sqrt() * latent) / (1 - a).sqrt()
    return a, eps


def masked_term(unet, x_t, t, cond, eps, mask) -> float:
    """|| mask * (eps - f(x_t, t, cond)) ||^2 / numel from a hand call (LayerDiffusion eqs. 2, 4, 5)."""
    pred = hand(unet, x_t, t, cond)
    return float(((eps - pred) ** 2 * mask).sum() / pred.numel())


# ============================================================================================ SINE
@pytest.fixture(scope="module")
def sine_cond(xl):
    return xl.encode_text(["a photo of a sks cup"])


@pytest.fixture(scope="module")
def sine_image():
    img = Image.open(IMAGE).convert("RGB")
    return torch.from_numpy(np.asarray(img).astype("float32") / 255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def sine_tuned(xl, sine_image, sine_cond):
    return finetune_sine(xl, sine_image, sine_cond,
                         SineFineTuneConfig(steps=20, lr=5e-3, patches=True, patch=PATCH, seed=0))


def fixed_patch_loss(model, image, cond, n: int = 8) -> float:
    """eps-MSE with F(v) at fixed boxes and fixed (t, eps) draws, never used in training."""
    sampler, gen, draw = PatchSampler(image, PATCH), torch.Generator().manual_seed(999), NoiseDraw(12345)
    pmap, out = PositionalMap(32, PATCH.grid), []
    with torch.no_grad():
        for _ in range(n):
            crop, b = sampler(1, gen)
            z0 = model.encode(crop)
            out.append(denoising_loss(model, z0, cond, *draw(z0), features=Features(pmap, b)).item())
    return float(np.mean(out))


def test_sine_lora_finetune_on_sdxl_lowers_the_loss_with_comfyui_keys_and_channels_from_the_weights(
        xl, sine_image, sine_cond, sine_tuned, real_sdxl, tmp_path):
    """Patch fine-tuning (LoRA) on SDXL lowers the held-out patch loss; F(v) has the first block's channels read
    from the weights (32 here, 320 on the full SDXL UNet); the delta is ComfyUI's LoRA layout under SDXL's
    original module paths (a second-level transformer layer, label_emb); c^ is the packed conditioning."""
    before = {k: v.clone() for k, v in xl.unet.state_dict().items()}
    assert xl.unet.conv_in.out_channels == 32 and first_block_channels(xl) == 32
    assert first_block_channels(SimpleNamespace(unet_parameters=lambda: real_sdxl)) == 320
    res = sine_tuned
    assert res.positional and res.channels == 32 and res.grid_size == 16 and res.mode == "lora"
    assert len(res.losses) == 20 and all(np.isfinite(res.losses))
    base_loss = fixed_patch_loss(xl, sine_image, sine_cond)
    with xl.adapted(res.weight_functions()) as m:
        tuned_loss = fixed_patch_loss(m, sine_image, sine_cond)
    print(f"SINE on SDXL, held-out patch loss: base {base_loss:.4f}, tuned {tuned_loss:.4f}")
    assert tuned_loss < base_loss, (tuned_loss, base_loss)
    # ComfyUI's generic LoRA keys: diffusion_model.<original SDXL module path>.lora_{down,up}.weight / .alpha
    params = xl.unet_parameters()
    modules = {k[len("diffusion_model."):].rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in res.delta}
    assert all(k.startswith("diffusion_model.") for k in res.delta) and all(m + ".weight" in params for m in modules)
    assert not any(k.startswith(("diffusion_model.down_blocks", "diffusion_model.up_blocks")) for k in res.delta)
    for key in ("diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.lora_up.weight",
                "diffusion_model.input_blocks.4.1.transformer_blocks.1.ff.net.2.lora_down.weight",
                "diffusion_model.label_emb.0.0.lora_down.weight", "diffusion_model.input_blocks.0.0.alpha"):
        assert key in res.delta, key
    assert torch.equal(res.c_hat, sine_cond) and res.c_hat.shape == (1, 78, 64)
    back, _ = load_sine(save_sine(res, "a photo of a sks cup", tmp_path / "xl.safetensors"))
    assert back.channels == 32 and back.grid_size == 16 and torch.equal(back.c_hat, res.c_hat)
    # any resolution: the whole-image fine-tune of a non-square image (64 x 96: an 8 x 12 latent) runs too
    wide = finetune_sine(xl, sine_image[..., :64, :96], sine_cond, SineFineTuneConfig(steps=2, lr=1e-3))
    assert not wide.positional and all(np.isfinite(wide.losses))
    assert all(torch.equal(before[k], v) for k, v in xl.unet.state_dict().items())  # the base is untouched


class Counter:
    def __init__(self, unet):
        self.n = 0
        self.handle = unet.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.n += 1


def test_sine_edit_on_sdxl_is_eq3_from_separate_runs(xl, sine_cond, sine_tuned, monkeypatch):
    """Every step of the SDXL edit (batch 2, two target prompts, 8 x 12 latents, w = 5) is eq. 3 computed from
    separate hand calls: the pretrained UNet at u and c, and for t > K a copy with the LoRA merged from the file
    keys and F(v) of the whole 16-cell grid added after conv_in, at c^; plain CFG for t <= K.  The fine-tuned
    model runs exactly once per step with t > K."""
    w, v, K, steps, seed = 5.0, 0.7, 400, 6, 5
    u = xl.encode_text([""])
    c = xl.encode_text(["a photo of a sks cup on a table", "a watercolour of a sks cup in the snow"])
    base = copy.deepcopy(xl.unet)
    ft = merged_lora_unet(xl, sine_tuned.delta)
    ft.conv_in = AddWholeMap(ft.conv_in, positional_grid(32, 16))
    seen = []

    def recording(rule, x, *args, **kwargs):
        def rule_and_record(x, tt, i):
            e = rule(x, tt, i)
            seen.append((x.clone(), tt.clone(), e.clone()))
            return e

        return ddim_loop(rule_and_record, x, *args, **kwargs)

    monkeypatch.setattr(sys.modules["core.sine.edit"], "ddim_loop", recording)
    count = Counter(xl.unet)
    try:
        out = edit(xl, sine_tuned, c, sine_cond, u, SHAPE, steps=steps, w=w, v=v, K=K, seed=seed)
    finally:
        count.handle.remove()
    ts = [int(t) for t in timesteps(1000, steps, "leading", steps_offset=1)]
    assert [int(tt[0]) for _, tt, _ in seen] == ts and any(t <= K for t in ts) and any(t > K for t in ts)
    assert count.n == steps + sum(t > K for t in ts)
    assert out.shape == SHAPE and torch.isfinite(out).all()
    for x, tt, e in seen:
        e_u, e_c = hand(base, x, tt, u), hand(base, x, tt, c)
        cfg = e_u + w * (e_c - e_u)
        if int(tt[0]) > K:
            ref = e_u + w * (v * e_c + (1 - v) * hand(ft, x, tt, sine_cond) - e_u)
            assert float((e - cfg).abs().max() / cfg.abs().max()) > 1e-3  # the fine-tuned branch matters
        else:
            ref = cfg
        assert float((e - ref).abs().max() / ref.abs().max()) < 1e-5, int(tt[0])


# ================================================================================= LayerDiffusion
@pytest.fixture(scope="module")
def ld_texts(xl):
    return xl.encode_text(["a photo of a jumping dog"]), xl.encode_text(["on a sandy beach at sunset"])


def other_latent(latent):
    """A reference latent unlike the image's (mirrored, channels rolled, rescaled)."""
    return torch.roll(latent.flip(-1), 1, dims=1) * -0.8 + 0.1


def test_layerdiffusion_stage1_on_sdxl_concatenates_the_contexts_and_keeps_one_pooled_vector(xl, ld_texts):
    """Eq. 2 (concat reading) on SDXL: the UNet sees e_a's and e_b's contexts side by side (154 tokens) and one
    pooled vector (e_a's, as ComfyUI's ConditioningConcat keeps conditioning_to's), never a pooled row as a
    context token; the first loss is || M (eps - f) ||^2 / N from a hand call, its gradient reaches the
    prediction through M only, and the trained embeddings stay valid packings.  The separate_reference
    reading (each embedding alone, e_b on the reference) matches its hand-computed terms too."""
    e_a, e_b = ld_texts
    latent = photo_latent()
    ab = xl.alphas_cumprod
    rec = Recorder(xl)
    res = optimize_layers(rec, latent, e_a, e_b, M_IMG, LayerEmbeddingConfig(steps=1, lr=1e-2))
    call = rec.calls[0]
    assert len(rec.calls) == 1 and call.cond.shape == (1, 155, 64)
    assert torch.equal(call.cond[:, :77], e_a[:, :77]) and torch.equal(call.cond[:, 77:154], e_b[:, :77])
    assert torch.equal(call.cond[:, 154, :P], e_a[:, 77, :P]) and not call.cond[:, 154, P:].any()
    a, eps = draw_of(call, latent, ab)
    joint = torch.cat([e_a[:, :77], e_b[:, :77], e_a[:, 77:]], dim=1)  # by hand
    want = masked_term(xl.unet, q_sample(latent, a, eps), call.t, joint, eps, M_IMG)
    assert res.losses[0] == pytest.approx(want, rel=1e-5)
    check_grad_mask(call.out.grad, M_IMG, "eq. 2 on SDXL")
    assert not torch.equal(res.e_a[:, :77], e_a[:, :77]) and not torch.equal(res.e_b[:, :77], e_b[:, :77])
    assert not torch.equal(res.e_a[:, 77, :P], e_a[:, 77, :P])  # e_a's pooled vector is trained
    assert not res.e_a[:, 77, P:].any() and not res.e_b[:, 77, P:].any()  # still packings
    # separate_reference: one batch-2 call, e_a alone on the photo under M, e_b alone on the reference under 1 - M_r
    ref = other_latent(latent)
    rec = Recorder(xl)
    res = optimize_layers(rec, latent, e_a, e_b, M_IMG, LayerEmbeddingConfig(steps=1, lr=1e-2,
                                                                              reading="separate_reference"),
                          reference_latent=ref, reference_mask=M_REF)
    call = rec.calls[0]
    assert torch.equal(call.cond, torch.cat([e_a, e_b]))
    a, eps = draw_of(call, latent, ab)
    assert torch.allclose(call.x[1:2], q_sample(ref, a, eps), atol=1e-5)
    check_grad_mask(call.out.grad[1:2], 1 - M_REF, "e_b on the reference")
    want_a = masked_term(xl.unet, q_sample(latent, a, eps), call.t[:1], e_a, eps, M_IMG)
    want_b = masked_term(xl.unet, q_sample(ref, a, eps), call.t[:1], e_b, eps, 1 - M_REF)
    assert res.terms["e_a"][0] == pytest.approx(want_a, rel=1e-5)
    assert res.terms["e_b"][0] == pytest.approx(want_b, rel=1e-5)
    assert not torch.equal(res.e_b[:, 77, :P], e_b[:, 77, :P])  # alone, e_b's pooled vector is trained


def test_layerdiffusion_stage2_on_sdxl_is_eqs_4_to_6_from_separate_calls(xl, ld_texts):
    """Eqs. 4-6 on SDXL with a distinct image and reference and distinct masks: row 0 (L_obj) noises the photo
    under M_t, row 1 (L_bg) the reference under 1 - M_r, at the same draw and the packed e_opt; the loss is
    2 L_obj + L_bg from hand calls; a few LoRA steps give a delta in ComfyUI's layout."""
    e_opt = interpolate_layers(*ld_texts)
    latent = photo_latent()
    ref = other_latent(latent)
    rec = Recorder(xl)
    res = finetune_layered(rec, latent, ref, e_opt, M_IMG, M_REF,
                           LayeredFineTuneConfig(mode="lora", steps=3, lr=1e-3, lora=LoRAConfig(4, 4)))
    call = rec.calls[0]
    assert len(rec.calls) == 3 and torch.equal(call.cond, torch.cat([e_opt, e_opt]))
    a, eps = draw_of(call, latent, xl.alphas_cumprod)
    assert torch.allclose(call.x[1:2], q_sample(ref, a, eps), atol=1e-5)
    check_grad_mask(call.out.grad[0:1], M_IMG, "L_obj")
    check_grad_mask(call.out.grad[1:2], 1 - M_REF, "L_bg")
    l_obj = masked_term(xl.unet, q_sample(latent, a, eps), call.t[:1], e_opt, eps, M_IMG)
    l_bg = masked_term(xl.unet, q_sample(ref, a, eps), call.t[:1], e_opt, eps, 1 - M_REF)
    assert res.terms["obj"][0] == pytest.approx(l_obj, rel=1e-5)
    assert res.terms["bg"][0] == pytest.approx(l_bg, rel=1e-5)
    assert res.losses[0] == pytest.approx(2 * l_obj + l_bg, rel=1e-5)
    assert all(np.isfinite(res.losses)) and any(k.endswith("lora_up.weight") for k in res.delta)
    assert all(k.startswith("diffusion_model.") for k in res.delta)
    assert "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_v.lora_up.weight" in res.delta


def test_layerdiffusion_eq3_interpolates_the_context_and_the_pooled_vector(xl, ld_texts):
    """e_opt = 0.7 e^_a + 0.3 e^_b on packed conds (batch 2, distinct prompts) is the interpolation of both parts,
    and the model at e_opt is the hand-called UNet at the interpolated context and pooled vector."""
    e_a = xl.encode_text(["a photo of a jumping dog", "a red vintage car"])
    e_b = xl.encode_text(["on a sandy beach at sunset", "in a snowy forest"])
    e_opt = interpolate_layers(e_a, e_b, 0.7)
    ctx = 0.7 * e_a[:, :77] + 0.3 * e_b[:, :77]
    pooled = 0.7 * e_a[:, 77, :P] + 0.3 * e_b[:, 77, :P]
    torch.testing.assert_close(e_opt[:, :77], ctx, rtol=0, atol=1e-6)
    torch.testing.assert_close(e_opt[:, 77, :P], pooled, rtol=0, atol=1e-6)
    assert not e_opt[:, 77, P:].any()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([120, 730])
    by_hand = torch.cat([ctx, torch.cat([pooled, torch.zeros(2, 64 - P)], 1)[:, None]], 1)
    with torch.no_grad():
        got = xl.eps(x, t, e_opt)
    torch.testing.assert_close(got, hand(xl.unet, x, t, by_hand), rtol=1e-5, atol=1e-6)
    only_ctx = by_hand.clone()
    only_ctx[:, 77, :P] = e_a[:, 77, :P]  # the context interpolated, the pooled vector not
    assert (got - hand(xl.unet, x, t, only_ctx)).abs().max() > 1e-4


def test_layerdiffusion_iterative_guidance_on_sdxl_uses_e_a_exactly_on_the_chosen_steps(xl, monkeypatch):
    """Eq. 8 on SDXL (batch 2, distinct prompts, 8 x 12 latents, CFG 3): the conditional half of every step's
    batched call is e^_a exactly on the steps alternating_choice picks and e_opt on the others, and every step's
    eps is CFG from separate hand calls at that step's embedding (and differs from the other embedding's)."""
    from core.layerdiffusion.guidance import start_parity_for

    e_a = xl.encode_text(["a photo of a jumping dog", "a red vintage car"])
    e_opt = interpolate_layers(e_a, xl.encode_text(["on a sandy beach", "in a snowy forest"]))
    u, w = xl.encode_text([""]), 3.0

    class Spy:
        def __init__(self, model):
            self.model, self.seen = model, []
            self.alphas_cumprod, self.device = model.alphas_cumprod, model.device

        def eps(self, x, t, cond, features=None):
            self.seen.append(cond[cond.shape[0] // 2:].clone())
            return self.model.eps(x, t, cond, features)

    steps_seen = []

    def recording(rule, x, *args, **kwargs):
        def rule_and_record(x, tt, i):
            e = rule(x, tt, i)
            steps_seen.append((x.clone(), tt.clone(), e.clone()))
            return e

        return ddim_loop(rule_and_record, x, *args, **kwargs)

    monkeypatch.setattr(sys.modules["core.layerdiffusion.guidance"], "ddim_loop", recording)
    for parity, steps in ((None, 5), (0, 4)):
        spy, trace = Spy(xl), []
        steps_seen.clear()
        out = iterative_sample(spy, e_a, e_opt, u, SHAPE, GuidanceConfig(steps, w, parity), seed=2, trace=trace)
        expected = schedule(steps, parity)
        assert trace == expected and len(spy.seen) == steps and out.shape == SHAPE
        assert OBJECT in expected and OPT in expected
        used = [OBJECT if torch.equal(c, e_a) else OPT if torch.equal(c, e_opt) else -1 for c in spy.seen]
        assert used == expected, (parity, used)
        p = start_parity_for(steps, parity)
        assert [i for i, k in enumerate(used) if k == OBJECT] == [i for i in range(steps) if (i - p) % 2 == 0]
        for i, (x, tt, e) in enumerate(steps_seen):
            e_u = hand(xl.unet, x, tt, u)
            chosen, other = (e_a, e_opt) if expected[i] == OBJECT else (e_opt, e_a)
            ref = e_u + w * (hand(xl.unet, x, tt, chosen) - e_u)
            assert float((e - ref).abs().max() / ref.abs().max()) < 1e-5, (parity, i)
            wrong = e_u + w * (hand(xl.unet, x, tt, other) - e_u)
            assert float((e - wrong).abs().max() / ref.abs().max()) > 1e-3, (parity, i)


# ===================================================================================== rectifier
def test_rectifier_modulated_layers_on_full_size_sdxl(real_sdxl, xl):
    """SDXL: 33 kernels (middle 4; output blocks 18 ResNet convs, 9 skips, 2 up-samplers), the SD 1.5 rule
    (43 kernels there) on SDXL's three levels; no attention projection, not the final conv.  The tiny SDXL: 23."""
    layers = modulated_layers(real_sdxl)
    expected = [f"output_blocks.{i}.0.{leaf}.weight" for i in range(9)
                for leaf in ("in_layers.2", "out_layers.3", "skip_connection")]
    expected += ["output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight"]
    expected += [f"middle_block.{i}.{leaf}.weight" for i in (0, 2) for leaf in ("in_layers.2", "out_layers.3")]
    print("SDXL modulated layers:", ", ".join(f"{s.name} {s.shape}" for s in layers))
    assert len(layers) == 33 and sorted(s.name for s in layers) == sorted(expected)
    assert all(tuple(real_sdxl[s.name].shape) == s.shape for s in layers)
    assert layers[0].shape == (1280, 2560, 3, 3) and dict((s.name, s.shape) for s in layers)[
        "output_blocks.8.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert full_values(layers) == 259_379_200 and generated_values(layers) == 449_280
    tiny = modulated_layers(xl.unet_parameters())
    assert len(tiny) == 23 and {s.name.split(".")[0] for s in tiny} == {"middle_block", "output_blocks"}


def test_rectifier_fresh_is_the_sdxl_base_model_bit_for_bit(xl):
    """Delta = 0 (a fresh rectifier), and strength 0 with Delta != 0: eps of the rectified SDXL is the hand-called
    UNet's, bit for bit, with P_t from the base or the modulated model (batch 2, two prompts, 8 x 12)."""
    g = torch.Generator().manual_seed(2)
    z, x0 = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([3, 777])
    c = xl.encode_text(["a photo of a cat", "a watercolour of mountains"])
    plain = hand(copy.deepcopy(xl.unet), z, t, c)
    r = new_rectifier(xl.unet_parameters(), 4, estimate_clip=4.0, **SMALL)
    with torch.no_grad():
        for estimate in ("base", "modulated"):
            with rectified(xl, r, x0, estimate=estimate) as R:
                assert torch.equal(R.eps(z, t, c), plain) and torch.equal(R.eps(z, t, c), plain), estimate
        with rectified(xl, perturbed(r), x0, strength=0.0) as R:
            assert torch.equal(R.eps(z, t, c), plain)
        with rectified(xl, perturbed(r), x0) as R:
            assert (R.eps(z, t, c) - plain).abs().max() > 1e-3  # and a Delta != 0 changes it


def test_rectifier_per_sample_modulation_on_sdxl_is_a_loop_over_samples(xl):
    """A batch of 3 (distinct prompts, x_0 and t) through the rectified SDXL equals, sample by sample, the
    hand-called UNet whose modulated kernels the test set to theta * (1 + A_b C_b) itself."""
    g = torch.Generator().manual_seed(3)
    shape = (3, 4, 8, 12)
    x, x0 = torch.randn(shape, generator=g), torch.randn(shape, generator=g).clamp(-1, 1)
    t = torch.tensor([10, 400, 900])
    c = xl.encode_text(["a photo of a cat", "a watercolour of mountains", ""])
    r = perturbed(new_rectifier(xl.unet_parameters(), 4, **SMALL), seed=4)
    with torch.no_grad(), rectified(xl, r, x0) as R:
        p = R.base_estimate(x, t, c)
        batched = R.eps_with(x, t, p, c)
        deltas = r(x0, p, t)
    assert set(deltas) == {s.name for s in modulated_layers(xl.unet_parameters())}
    names = xl.canonical_names()

    def modulated_unet(j):
        unet = copy.deepcopy(xl.unet)
        params = dict(unet.named_parameters())
        with torch.no_grad():
            for name, (a, cc) in deltas.items():
                wt = params[names[name]]
                wt.mul_(1 + a[j][:, None] * cc[j][None])  # [O, 1, k, k] * [1, I, k, k]: the separable offset
        return unet

    unets = [modulated_unet(j) for j in range(3)]
    loop = torch.cat([hand(unets[j], x[j:j + 1], t[j:j + 1], c[j:j + 1]) for j in range(3)])
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-5)
    assert (batched - hand(xl.unet, x, t, c)).abs().max() > 1e-2  # the modulation does something
    swapped = hand(unets[0], x[1:2], t[1:2], c[1:2])  # sample 1 under sample 0's offsets: not the same
    assert (batched[1:2] - swapped).abs().max() > 1e-3
