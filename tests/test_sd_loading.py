"""Offline SD 1.x loading: tokenizer, key map, single file, diffusers folder, bad files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from core.sd import keymap  # noqa: E402
from core.sd.checkpoint import CheckpointError, inspect_checkpoint  # noqa: E402
from core.sd.loader import CONFIG_DIR, build_modules, load_sd15, read_config  # noqa: E402
from core.sd.tokenizer import SHIPPED_DIR, clip_vocab_from_bpe, load_clip_tokenizer, tokenize  # noqa: E402
from core.seam import LatentDiffusion  # noqa: E402
from tiny_sd import build_tiny, write_config_dir, write_diffusers_folder, write_single_file  # noqa: E402

DATA = Path(__file__).parent / "data"
PROMPTS = [
    "a photo of a cat",
    "A PHOTO of   a café, déjà vu!! 123 (tag:1.2) emoji 🎉",
    "don't stop\tthe\nmusic",
    "word " * 100,  # longer than 77 tokens: truncated, EOS kept last
    "",
]


# ------------------------------------------------------------------------------ tokenizer
def test_shipped_tokenizer_files_are_derived_from_open_clip_bpe():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.tokenizer import default_bpe

    vocab, merges = clip_vocab_from_bpe(default_bpe())
    shipped = json.loads((SHIPPED_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert shipped == vocab
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    lines = (SHIPPED_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[1:] == merges and len(merges) == 48894
    assert open_clip is not None


def test_tokenizer_gives_sd15_ids_with_eos_padding():
    open_clip = pytest.importorskip("open_clip")
    ours = tokenize(load_clip_tokenizer(), PROMPTS)
    ref = open_clip.get_tokenizer("ViT-L-14")(PROMPTS)  # same BPE; pads with 0 instead of EOS
    assert ours.shape == (len(PROMPTS), 77)
    for row, r in zip(ours, ref):
        n = int((r != 0).sum())
        assert row[:n].tolist() == r[:n].tolist()
        assert (row[n:] == 49407).all(), "SD 1.5 pads with <|endoftext|>"
    assert ours[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ours[3, -1].item() == 49407  # truncated prompt still ends with EOS


# ------------------------------------------------------------------------------ key map
def test_full_sd15_architecture_maps_every_original_key():
    """Meta-device SD 1.5 (no weights) against the key list ComfyUI writes (tests/data)."""
    ref = json.loads((DATA / "sd15_original_keys.json").read_text())["keys"]
    ucfg, vcfg, tcfg = read_config("unet"), read_config("vae"), read_config("text_encoder")
    unet, vae, text = build_modules(ucfg, vcfg, tcfg, "meta")
    orig = keymap.to_original(unet.state_dict(), vae.state_dict(), text.state_dict(), ucfg, vcfg)
    assert set(orig) == set(ref), (sorted(set(ref) - set(orig))[:5], sorted(set(orig) - set(ref))[:5])
    assert {k: list(v.shape) for k, v in orig.items()} == ref
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    # and back: every diffusers tensor is found in the original layout, with its shape
    meta = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    targets = (unet.state_dict(), vae.state_dict(), text.state_dict())
    u, v, t, missing = keymap.to_diffusers(meta, *(d.keys() for d in targets), ucfg, vcfg)
    assert missing == []
    for got, want in zip((u, v, t), targets):
        assert set(got) == {k for k in want if not k.endswith("position_ids")}
        assert all(got[k].shape == want[k].shape for k in got)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(seed=0)


def test_key_map_agrees_with_diffusers_own_converter(tiny):
    """diffusers' original->diffusers converters invert our diffusers->original map."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet, vae, text = tiny
    orig = keymap.to_original(unet.state_dict(), vae.state_dict(), text.state_dict(), unet.config, vae.config)
    u = convert_ldm_unet_checkpoint(dict(orig), dict(unet.config))
    assert set(u) == set(unet.state_dict())
    assert all(torch.equal(u[k], unet.state_dict()[k]) for k in u)
    v = convert_ldm_vae_checkpoint(dict(orig), dict(vae.config))
    assert set(v) == set(vae.state_dict())
    assert all(torch.equal(v[k].reshape(vae.state_dict()[k].shape), vae.state_dict()[k]) for k in v)


def test_lora_module_names_are_comfyui_keys():
    cfg = read_config("unet")
    assert (
        keymap.lora_module_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", cfg)
        == "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    )
    assert (
        keymap.lora_module_name("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0", cfg)
        == "diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0"
    )
    assert keymap.lora_module_name("mid_block.attentions.0.proj_in", cfg) == "diffusion_model.middle_block.1.proj_in"


# ------------------------------------------------------------------------------ round trips
def _outputs(model: LatentDiffusion, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    img = torch.rand(1, 3, 64, 48, generator=g)
    with torch.no_grad():
        cond = model.encode_text(["a photo of a cat", "a dog"])
        return cond, model.eps(x, t, cond), model.encode(img), model.decode(torch.randn(1, 4, 8, 6, generator=g))


def _reference(tiny):
    from core.sd.backend import DiffusersSD

    unet, vae, text = tiny
    return DiffusersSD(unet=unet, vae=vae, text_encoder=text, tokenizer=load_clip_tokenizer())


def test_single_file_round_trip_gives_identical_outputs(tiny, tmp_path):
    cfg = write_config_dir(tmp_path / "cfg", *tiny)
    path = write_single_file(tmp_path / "tiny.safetensors", *tiny)
    info = inspect_checkpoint(path)
    assert info.family == "ldm" and info.context_dim == 32
    loaded = load_sd15(path, device="cpu", config_dir=cfg)
    assert isinstance(loaded, LatentDiffusion)
    assert loaded.context_dim == 32
    for a, b in zip(_outputs(loaded), _outputs(_reference(tiny))):
        assert torch.equal(a, b)
    cond, eps, lat, img = _outputs(loaded)
    assert cond.shape == (2, 77, 32) and eps.shape == (2, 4, 8, 8)
    assert lat.shape == (1, 4, 8, 6) and img.shape == (1, 3, 64, 48)
    assert 0 <= img.min() and img.max() <= 1
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_fp16_single_file_loads_as_fp32(tiny, tmp_path):
    cfg = write_config_dir(tmp_path / "cfg", *tiny)
    path = write_single_file(tmp_path / "tiny16.safetensors", *tiny, dtype=torch.float16)
    assert set(inspect_checkpoint(path).dtypes.values()) == {"F16"}
    loaded = load_sd15(path, device="cpu", config_dir=cfg)
    w = loaded.unet.conv_in.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, tiny[0].conv_in.weight.half().float())


def test_diffusers_folder_round_trip(tiny, tmp_path):
    root = write_diffusers_folder(tmp_path / "pipe", *tiny)
    loaded = load_sd15(root, device="cpu")
    for a, b in zip(_outputs(loaded), _outputs(_reference(tiny))):
        assert torch.equal(a, b)


def test_seam_rejects_bad_images(tiny):
    model = _reference(tiny)
    with pytest.raises(ValueError, match="alpha"):
        model.encode(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="empty"):
        model.encode(torch.rand(1, 3, 0, 16))


# ------------------------------------------------------------------------------ bad files
def _fake(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in keys.items()}, str(path))
    return path


UNET = "model.diffusion_model."
ATTN2 = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
FAKES = {
    "sdxl": ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (4,), ATTN2: (4, 2048)}, "XL"),
    "sd2": ({ATTN2: (320, 1024), "cond_stage_model.model.ln_final.weight": (4,)}, "2.x"),
    "sd3": ({UNET + "joint_blocks.0.x_block.attn.qkv.weight": (4, 4)}, "Stable Diffusion 3"),
    "flux": ({"double_blocks.0.img_attn.qkv.weight": (4, 4)}, "Flux"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (4, 1)}, "LoRA"),
    "inpaint": ({ATTN2: (320, 768), UNET + "input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
    "unet_only": ({"input_blocks.0.0.weight": (4, 4), "middle_block.0.in_layers.0.weight": (4,)}, "UNet on its own"),
    "no_vae": ({ATTN2: (320, 768), "cond_stage_model.transformer.text_model.final_layer_norm.weight": (4,)}, "VAE"),
}


@pytest.mark.parametrize("name", sorted(FAKES))
def test_unsupported_checkpoints_are_named(name, tmp_path):
    keys, words = FAKES[name]
    path = _fake(tmp_path / f"{name}.safetensors", keys)
    with pytest.raises(CheckpointError, match=words):
        load_sd15(path, device="cpu")


def test_truncated_file_is_reported(tmp_path, tiny):
    path = write_single_file(tmp_path / "full.safetensors", *tiny)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_sd15(cut, device="cpu")


def test_pickle_files_are_refused_without_unpickling(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_sd15(ckpt, device="cpu")
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="pickle"):
        load_sd15(disguised, device="cpu")


def test_garbage_and_missing_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(CheckpointError, match="JSON"):
        load_sd15(junk, device="cpu")
    with pytest.raises(CheckpointError, match="not found"):
        load_sd15(tmp_path / "nope.safetensors", device="cpu")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="diffusers"):
        load_sd15(tmp_path / "folder", device="cpu")


def test_sdxl_diffusers_folder_is_refused(tmp_path):
    root = tmp_path / "xl"
    for sub in ("unet", "vae", "text_encoder"):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text("{}")
    (root / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 2048, "in_channels": 4,
                                                           "addition_embed_type": "text_time"}))
    with pytest.raises(CheckpointError, match="2048"):
        load_sd15(root, device="cpu")


def test_shipped_configs_are_complete():
    for sub in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
        assert (CONFIG_DIR / sub).is_dir()
    assert read_config("unet")["cross_attention_dim"] == 768
    assert read_config("vae")["scaling_factor"] == 0.18215
    assert json.loads((CONFIG_DIR / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 77
