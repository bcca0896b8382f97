"""SDXL in a real ComfyUI: a random-weight SDXL base checkpoint built with ComfyUI's own classes.

Heavy (a 6.9 GB file; each script holds the model in fp32 on the CPU, about 14 GB), so the tests are
marked ``sdxl`` and run only when asked: ``SIE_SDXL=1 COMFYUI_DIR=... python -m pytest -m sdxl``
(on both supported ComfyUI versions).  The checkpoint is built once (about a minute, 8 GB of memory)
and cached beside the random SD 1.5.

* the seam over ComfyUI's MODEL / CLIP / VAE (``ComfySD``) agrees with the diffusers back end
  (``core.sd.load_sdxl``) on the same file: text conditioning (context and pooled vector), eps with
  the added conditioning, VAE; each side runs in its own process (two fp32 SDXLs do not fit in 24 GB);
* the nodes run on the SDXL MODEL at a small size with the input MODEL untouched, and their
  equations hold there (named in each test).  These scripts load the UNet in bf16 (ComfyUI's
  ``--bf16-unet``): training through ComfyUI computes with per-call copies of the weights that autograd
  keeps for backward, and fp32 SDXL with them does not fit in 24 GB.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from comfy_server import REPO, comfyui_dir, comfyui_python, run_in_comfyui, skip_reason

SDXL_REASON = None if os.environ.get("SIE_SDXL") == "1" else (
    "heavy SDXL checks (a 6.9 GB random SDXL, ~16 GB of memory): run by hand with SIE_SDXL=1")
pytestmark = [pytest.mark.integration, pytest.mark.sdxl,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
              pytest.mark.skipif(SDXL_REASON is not None, reason=SDXL_REASON or "")]


def random_sdxl() -> Path:
    """The random-weight SDXL checkpoint, built once with ComfyUI's classes and cached."""
    cache = Path(os.environ.get("SIE_TEST_CACHE", Path.home() / ".cache" / "comfyui-single-image-edit"))
    path = cache / "random_sdxl.safetensors"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(comfyui_python(comfyui_dir())), str(REPO / "tests/integration/make_random_sdxl.py"),
                        str(path), "--comfyui", str(comfyui_dir())], check=True, timeout=1800)
    return path


INPUTS = """
g = torch.Generator().manual_seed(0)
x = torch.randn(3, 4, 8, 12, generator=g)            # non-square: the size conditioning has h != w
t = torch.tensor([10, 500, 990])
img = torch.rand(1, 3, 64, 96, generator=g)
prompts = ["a photo of a cat", "an oil painting of a harbour", ""]
"""

COMFY_SIDE = textwrap.dedent("""
    import comfy.sd
    from sie_pack.nodes.comfy_bridge import ComfySD
    from sie_pack.core.seam import LatentDiffusion
""") + INPUTS + textwrap.dedent("""
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
    sd = ComfySD(model, clip, vae)
    ours = torch.load(sys.argv[3], weights_only=True)
    with torch.no_grad():
        cond = sd.encode_text(prompts)
        eps = sd.eps(x, t, ours["cond"])
        latent = sd.encode(img)
        image = sd.decode(ours["latent"])
    out = {"config": type(model.model.model_config).__name__, "protocol": isinstance(sd, LatentDiffusion),
           "dims": [sd.context_dim, sd.pooled_dim], "cond_shape": list(cond.shape),
           "context": rel(cond[:, :-1], ours["cond"][:, :-1]), "pooled": rel(cond[:, -1], ours["cond"][:, -1]),
           "eps": rel(eps, ours["eps"]), "latent": rel(latent, ours["latent"]),
           "image": float((image - ours["image"]).abs().max()), "eps_scale": float(ours["eps"].abs().mean()),
           "schedule": float((sd.alphas_cumprod - ours["schedule"]).abs().max())}
    print("RESULT " + json.dumps(out))
""")

DIFFUSERS_SIDE = textwrap.dedent("""
    from sie_pack.core.sd.loader import load_sd
""") + INPUTS + textwrap.dedent("""
    m = load_sd(sys.argv[2], device="cpu", dtype=torch.float32)
    with torch.no_grad():
        cond = m.encode_text(prompts)
        eps = m.eps(x, t, cond)
        latent = m.encode(img)
        image = m.decode(latent)
    torch.save({"cond": cond, "eps": eps, "latent": latent, "image": image, "schedule": m.alphas_cumprod}, sys.argv[3])
    print("RESULT " + json.dumps({"type": type(m).__name__, "vae": str(next(m.vae.parameters()).dtype)}))
""")


def test_sdxl_bridge_matches_diffusers_backend(tmp_path):
    ckpt = random_sdxl()
    saved = tmp_path / "diffusers_side.pt"
    d = run_in_comfyui(DIFFUSERS_SIDE, str(ckpt), str(saved), timeout=1800, tmp_dir=tmp_path)
    assert d["type"] == "DiffusersSDXL"
    r = run_in_comfyui(COMFY_SIDE, str(ckpt), str(saved), timeout=1800, tmp_dir=tmp_path)
    assert r["config"] == "SDXL" and r["protocol"]  # ComfyUI's checkpoint loader detects the file as SDXL
    assert r["dims"] == [2048, 1280] and r["cond_shape"] == [3, 78, 2048]
    assert r["schedule"] < 1e-6
    assert r["eps_scale"] > 0.01
    print("SDXL bridge vs diffusers:", {k: r[k] for k in ("context", "pooled", "eps", "latent", "image")})
    for key in ("context", "pooled", "eps", "latent", "image"):
        assert r[key] < 1e-4, r


BF16_UNET = """
from comfy.cli_args import args as _args
_args.bf16_unet = True  # the training scripts: fp32 SDXL plus the per-call weight copies of training exceed 24 GB
"""

IMAGIC = BF16_UNET + textwrap.dedent("""
    import os, tempfile
    import comfy.sd, comfy.model_management, comfy.sampler_helpers, comfy.samplers, folder_paths
    import nodes as comfy_nodes
    from sie_pack.nodes.comfy_bridge import ComfySD
    from sie_pack.nodes.imagic import save_trained
    from sie_pack.nodes.training import cond_tensor
    N = pack.NODE_CLASS_MAPPINGS
    out = {}

    def unet_digest(model):
        comfy.model_management.load_models_gpu([model])
        return digest(model.model.diffusion_model)

    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([400, 850])

    def eps_of(model, cond):
        with torch.inference_mode(False), torch.no_grad():
            return ComfySD(model).eps(x, t, cond)

    def sampler_y(model, conditioning, latent):  # the y ComfyUI's samplers compute for a CONDITIONING
        conds = comfy.sampler_helpers.convert_cond(conditioning)
        conds = comfy.samplers.encode_model_conds(model.model.extra_conds, conds, latent, torch.device("cpu"),
                                                  "positive")
        return conds[0]["model_conds"]["y"].cond

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
        target = enc(clip, "a photo of a cat")
        negative = enc(clip, "")
        image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))
        before = unet_digest(model)
        e_opt, _, _ = N["SIE_OptimizeEmbedding"].execute(model, vae, image, target, 3, 1e-2, 0)
        model_ft, _, trained, _ = N["SIE_FineTune"].execute(model, vae, image, e_opt, "lora", 2, 1e-3, 4, 0)
        out["weights_unchanged"] = unet_digest(model) == before
        out["context_moved"] = float((e_opt[0][0] - target[0][0]).abs().max())
        out["pooled_moved"] = float((e_opt[0][1]["pooled_output"] - target[0][1]["pooled_output"]).abs().max())
        out["e_opt_shape"] = [list(e_opt[0][0].shape), list(e_opt[0][1]["pooled_output"].shape)]
        mixed = N["SIE_InterpolateConditioning"].execute(target, e_opt, 1.2)[0]
        out["interp_context"] = rel(mixed[0][0], 1.2 * target[0][0] - 0.2 * e_opt[0][0])
        out["interp_pooled"] = rel(mixed[0][1]["pooled_output"],
                                   1.2 * target[0][1]["pooled_output"] - 0.2 * e_opt[0][1]["pooled_output"])
        with torch.inference_mode(False):
            packed = cond_tensor(mixed, model)[0]
            ours_y = ComfySD(model)._added_conditioning(packed, x)[1]
        out["y_vs_sampler"] = float((ours_y[:1] - sampler_y(model, mixed, x)).abs().max())
        latents = N["SIE_EtaSweep"].execute(model_ft, target, e_opt, negative, {"samples": torch.zeros(1, 4, 8, 12)},
                                          "0.5, 1.0", 7, 2, 5.0, "ddim", "ddim_uniform")[0]["samples"]
        out["sweep_shape"] = list(latents.shape)
        base_eps, ft_eps = eps_of(model, packed), eps_of(model_ft, packed)
        out["ft_changes_eps"] = float((ft_eps - base_eps).abs().max())
        loras = tempfile.mkdtemp()
        folder_paths.add_model_folder_path("loras", loras)
        save_trained(trained, os.path.join(loras, "imagic_sdxl.safetensors"))
        native = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "imagic_sdxl.safetensors", 1.0)[0]
        out["native_vs_ours"] = float((eps_of(native, packed) - ft_eps).abs().max())
        out["label_emb_trained"] = any(k.startswith("diffusion_model.label_emb.") for k in trained.delta)
        out["weights_unchanged_after_all"] = unet_digest(model) == before
        out["errors"] = {
            "no_pooled": error(lambda: N["SIE_OptimizeEmbedding"].execute(
                model, vae, image, [[target[0][0], {}]], 1, 1e-3, 0)),
            "sd15_width": error(lambda: N["SIE_OptimizeEmbedding"].execute(
                model, vae, image, [[torch.zeros(1, 77, 768), {}]], 1, 1e-3, 0)),
        }
    print("RESULT " + json.dumps(out))
""")


def test_imagic_nodes_on_sdxl(tmp_path):
    r = run_in_comfyui(IMAGIC, str(random_sdxl()), timeout=3600, tmp_dir=tmp_path)
    print("Imagic on SDXL:", r)
    assert r["weights_unchanged"] and r["weights_unchanged_after_all"], r
    assert r["e_opt_shape"] == [[1, 77, 2048], [1, 1280]]
    assert r["context_moved"] > 0 and r["pooled_moved"] > 0, r  # stage 1 optimises both parts
    assert r["interp_context"] < 1e-6 and r["interp_pooled"] < 1e-6, r  # eq. 3 on both parts
    assert r["y_vs_sampler"] == 0.0, r  # the added conditioning we train with is the sampler's
    assert r["sweep_shape"] == [2, 4, 8, 12]
    assert r["ft_changes_eps"] > 0 and r["label_emb_trained"], r
    assert r["native_vs_ours"] == 0.0, r  # ComfyUI's LoraLoaderModelOnly gives exactly our patched MODEL
    assert "input 'conditioning'" in r["errors"]["no_pooled"] and "pooled" in r["errors"]["no_pooled"], r
    assert "input 'conditioning'" in r["errors"]["sd15_width"] and "2048" in r["errors"]["sd15_width"], r
