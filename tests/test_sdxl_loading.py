"""SDXL on the diffusers back end: key map, OpenCLIP-G conversion, loaders, the packed conditioning.

The back end's eps and text encoding are compared with the diffusers UNet and the two text
encoders called by hand (SDXL's conventions spelt out here, not taken from the code under test),
and the OpenCLIP conversion with open_clip's own text tower.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from core.sd import keymap  # noqa: E402
from core.sd.checkpoint import CheckpointError, inspect_checkpoint  # noqa: E402
from core.sd.loader import XL_CONFIG_DIR, family_of, load_sd, load_sd15, load_sdxl, read_config  # noqa: E402
from core.sd.openclip import hf_to_openclip, openclip_to_hf  # noqa: E402
from core.sd.tokenizer import load_clip_tokenizer, tokenize  # noqa: E402
from core.seam import LatentDiffusion, pack_cond, unpack_cond  # noqa: E402
from tiny_sd import (TINY_XL_POOLED, build_tiny_xl, tiny_sdxl_model, write_config_dir_xl,  # noqa: E402
                     write_diffusers_folder_xl, write_single_file_xl)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_xl(3)


@pytest.fixture(scope="module")
def model():
    return tiny_sdxl_model(3)


def hand_eps(unet, x, t, context, pooled, hw):
    """SDXL's eps as diffusers' pipeline calls the UNet: the added conditioning is the pooled
    text vector and the micro-conditioning (original h, w, crop top, left, target h, w)."""
    time_ids = torch.tensor([[hw[0], hw[1], 0, 0, hw[0], hw[1]]], dtype=torch.float32).repeat(x.shape[0], 1)
    return unet(x, t, encoder_hidden_states=context,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


# ------------------------------------------------------------------------------ packing
def test_pack_cond_round_trips_and_keeps_zeros_out_of_the_gradient():
    ctx, pooled = torch.randn(2, 5, 8), torch.randn(2, 3)
    c = pack_cond(ctx, pooled)
    assert c.shape == (2, 6, 8) and (c[:, -1, 3:] == 0).all()
    back_ctx, back_pooled = unpack_cond(c, 3)
    assert torch.equal(back_ctx, ctx) and torch.equal(back_pooled, pooled)
    assert unpack_cond(ctx, 0) == (ctx, None)
    with pytest.raises(ValueError, match="wider"):
        pack_cond(torch.randn(1, 5, 2), torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"N \+ 1"):
        unpack_cond(torch.randn(1, 5), 3)


# ------------------------------------------------------------------------------ text encoders
def test_openclip_layout_converts_to_transformers_with_the_same_outputs():
    """open_clip's own text tower (causal mask, argmax pooling, x @ text_projection) against the
    transformers model loaded through :func:`openclip_to_hf`: penultimate states and pooled vector."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import TextTransformer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from tiny_sd import TINY_XL_TEXT_2

    torch.manual_seed(0)
    tower = TextTransformer(context_length=77, vocab_size=49408, width=32, heads=4, layers=3, mlp_ratio=2.0, output_dim=24,
                            act_layer=torch.nn.GELU).eval()
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = tower.state_dict()
    hf = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_XL_TEXT_2)).eval()
    missing, unexpected = hf.load_state_dict(openclip_to_hf(sd), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)

    ids = tokenize(load_clip_tokenizer(pad_token="!"), ["a photo of a cat", "an oil painting"])
    with torch.no_grad():
        x = tower.token_embedding(ids) + tower.positional_embedding
        mask = tower.attn_mask
        for block in tower.transformer.resblocks[:-1]:
            x = block(x, attn_mask=mask)
        penultimate = x
        pooled = tower(ids)  # [B, 24]: ln_final, the end-of-text token, then the projection
        out = hf(ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-2], penultimate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.text_embeds, pooled, rtol=1e-5, atol=1e-5)
    assert open_clip is not None
    # and back, bit for bit (in_proj rows re-joined, the projection transposed back)
    back = hf_to_openclip(openclip_to_hf(sd))
    assert set(back) == set(sd) - {"attn_mask"}
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_second_tokenizer_pads_with_zero():
    ids = tokenize(load_clip_tokenizer(pad_token="!"), ["a photo of a cat"])[0]
    assert ids[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[7:] == 0).all()


# ------------------------------------------------------------------------------ key map
def test_single_file_layout_has_sdxl_keys_and_round_trips(tiny):
    unet, vae, text, text_2 = tiny
    orig = keymap.to_original_xl(unet.state_dict(), vae.state_dict(), text.state_dict(), text_2.state_dict(),
                                 unet.config, vae.config)
    for key in ("model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                "model.diffusion_model.input_blocks.4.1.proj_in.weight",
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.positional_embedding",
                "first_stage_model.decoder.conv_out.weight"):
        assert key in orig, key
    assert orig["model.diffusion_model.input_blocks.4.1.proj_in.weight"].ndim == 2  # linear projections
    assert not any("input_blocks.1.1." in k for k in orig)  # SDXL's first block has no attention
    targets = [m.state_dict() for m in tiny]
    u, v, t, t2, missing = keymap.to_diffusers_xl(orig, *(d.keys() for d in targets), unet.config, vae.config)
    assert missing == []
    for got, want in zip((u, v, t, t2), targets):
        assert set(got) == {k for k in want if not k.endswith("position_ids")}
        assert all(torch.equal(got[k], want[k]) for k in got)


def test_full_sdxl_architecture_maps_every_original_key():
    """Meta-device SDXL built from the shipped configs against the key list ComfyUI's own SDXL classes
    write (tests/data/sdxl_original_keys.json, tests/integration/make_random_sdxl.py --keys)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from core.sd.loader import build_modules

    ref = json.loads((DATA / "sdxl_original_keys.json").read_text())["keys"]
    ucfg, vcfg = read_config("unet", XL_CONFIG_DIR), read_config("vae", XL_CONFIG_DIR)
    unet, vae, text = build_modules(ucfg, vcfg, read_config("text_encoder", XL_CONFIG_DIR), "meta")
    with torch.device("meta"):
        t2cfg = {k: v for k, v in read_config("text_encoder_2", XL_CONFIG_DIR).items() if not k.startswith("_")}
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**t2cfg))
    orig = keymap.to_original_xl(unet.state_dict(), vae.state_dict(), text.state_dict(), text_2.state_dict(),
                                 ucfg, vcfg)
    ignorable = {k for k in ref if k.endswith(("logit_scale", "position_ids"))}
    assert set(orig) == set(ref) - ignorable, (sorted(set(ref) - ignorable - set(orig))[:5],
                                               sorted(set(orig) - set(ref))[:5])
    assert {k: list(v.shape) for k, v in orig.items()} == {k: ref[k] for k in orig}
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684


# ------------------------------------------------------------------------------ loaders
def test_single_file_and_folder_load_to_the_same_model(tiny, model, tmp_path):
    write_single_file_xl(tmp_path / "xl.safetensors", *tiny, dtype=torch.float16)
    write_config_dir_xl(tmp_path / "cfg", *tiny)
    write_diffusers_folder_xl(tmp_path / "folder", *tiny)
    info = inspect_checkpoint(tmp_path / "xl.safetensors")
    assert info.family == "sdxl" and info.context_dim == 64
    assert family_of(tmp_path / "folder") == "sdxl"
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([5, 800])
    c = model.encode_text(["a cat", "a dog on a beach"])
    want = model.eps(x, t, c)
    from_file = load_sd(tmp_path / "xl.safetensors", device="cpu", config_dir=tmp_path / "cfg")
    from_folder = load_sdxl(tmp_path / "folder", device="cpu")
    for m, tol in ((from_file, 2e-2), (from_folder, 0)):
        assert isinstance(m, LatentDiffusion) and m.pooled_dim == TINY_XL_POOLED and m.context_dim == 64
        assert next(m.unet.parameters()).dtype == torch.float32
        torch.testing.assert_close(m.eps(x, t, c), want, rtol=0, atol=tol + 1e-6)
        assert (m.encode_text(["a cat", "a dog on a beach"]) - c).abs().max() <= tol + 1e-6
    with pytest.raises(CheckpointError, match="XL"):
        load_sd15(tmp_path / "xl.safetensors", device="cpu", config_dir=tmp_path / "cfg")
    with pytest.raises(CheckpointError, match="load_sdxl"):
        load_sd15(tmp_path / "folder", device="cpu")


def test_fp16_load_keeps_the_vae_in_fp32(tiny, tmp_path):
    write_diffusers_folder_xl(tmp_path / "folder", *tiny)
    write_single_file_xl(tmp_path / "xl.safetensors", *tiny)
    write_config_dir_xl(tmp_path / "cfg", *tiny)
    for m in (load_sdxl(tmp_path / "folder", device="cpu", dtype=torch.float16),
              load_sdxl(tmp_path / "xl.safetensors", device="cpu", dtype=torch.float16, config_dir=tmp_path / "cfg")):
        assert next(m.unet.parameters()).dtype == torch.float16
        assert next(m.text_encoder_2.parameters()).dtype == torch.float16
        assert {p.dtype for p in m.vae.parameters()} == {torch.float32}  # SDXL's VAE overflows in fp16


def test_incomplete_and_other_sdxl_models_are_named(tiny, tmp_path):
    write_diffusers_folder_xl(tmp_path / "refiner", *tiny)
    import shutil

    shutil.rmtree(tmp_path / "refiner" / "text_encoder")
    with pytest.raises(CheckpointError, match="refiner"):
        load_sd(tmp_path / "refiner", device="cpu")
    unet, vae, text, text_2 = tiny
    sd = keymap.to_original_xl(unet.state_dict(), vae.state_dict(), text.state_dict(), text_2.state_dict(),
                               unet.config, vae.config)
    from safetensors.torch import save_file

    cases = {
        "no_g": ({k: v for k, v in sd.items() if not k.startswith("conditioner.embedders.1.")}, "OpenCLIP-G"),
        "no_vae": ({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, "VAE"),
        "inpaint": ({**sd, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}, "inpainting"),
    }
    write_config_dir_xl(tmp_path / "cfg", *tiny)
    for name, (tensors, words) in cases.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(CheckpointError, match=words):
            load_sdxl(tmp_path / f"{name}.safetensors", device="cpu", config_dir=tmp_path / "cfg")


def test_shipped_sdxl_configs():
    assert read_config("unet", XL_CONFIG_DIR)["projection_class_embeddings_input_dim"] == 1280 + 6 * 256
    assert read_config("unet", XL_CONFIG_DIR)["cross_attention_dim"] == 768 + 1280
    assert read_config("vae", XL_CONFIG_DIR)["scaling_factor"] == 0.13025
    assert read_config("text_encoder_2", XL_CONFIG_DIR)["projection_dim"] == 1280


# ------------------------------------------------------------------------------ the back end
def test_eps_is_the_unet_with_pooled_vector_and_size_conditioning(model):
    """Non-square latents (size conditioning h != w), batch 2, distinct prompts, t per sample."""
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([17, 640])
    c = model.encode_text(["a red car", "a watercolour of mountains"])
    ctx, pooled = c[:, :-1], c[:, -1, :TINY_XL_POOLED]
    want = hand_eps(model.unet, x, t, ctx, pooled, (64, 96))
    torch.testing.assert_close(model.eps(x, t, c), want, rtol=0, atol=0)
    # the pooled vector matters (the conditioning is not only the context)
    other = pack_cond(ctx, pooled.flip(0))
    assert (model.eps(x, t, other) - want).abs().max() > 1e-3


def test_text_encoding_is_both_penultimate_states_and_the_projected_pooled_vector(model):
    prompts = ["a photo of a cat", ""]
    ids = tokenize(load_clip_tokenizer(), prompts)
    ids_2 = tokenize(load_clip_tokenizer(pad_token="!"), prompts)
    with torch.no_grad():
        h_l = model.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out_g = model.text_encoder_2(ids_2, output_hidden_states=True)
    c = model.encode_text(prompts)
    assert c.shape == (2, 78, 64)
    torch.testing.assert_close(c[:, :77], torch.cat([h_l, out_g.hidden_states[-2]], -1), rtol=0, atol=0)
    torch.testing.assert_close(c[:, 77, :TINY_XL_POOLED], out_g.text_embeds, rtol=0, atol=0)
    assert (c[:, 77, TINY_XL_POOLED:] == 0).all()


def test_sdxl_back_end_does_not_offer_text_encoder_training(model):
    from core.seam import TrainableText

    assert not isinstance(model, TrainableText)
