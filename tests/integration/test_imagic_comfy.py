"""Imagic nodes on a real ComfyUI MODEL (random-weight SD 1.5), run as ComfyUI's executor runs them.

The checkpoint is loaded and every node called inside ``torch.inference_mode()``, as in
the server, so the weights are inference tensors.  Checks: training through the bridge
works, the input MODEL's weights are bit-identical afterwards, a saved LoRA loaded with
ComfyUI's own LoraLoaderModelOnly predicts exactly like the node's patched MODEL, and
bad inputs give errors naming the input.  Runs in ComfyUI's Python; skipped without
COMFYUI_DIR.
"""

from __future__ import annotations

import textwrap

import pytest

from comfy_server import run_in_comfyui, skip_reason
from test_bridge import random_sd15

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

SCRIPT = textwrap.dedent("""
    import os, tempfile
    import comfy.sd, comfy.model_management, folder_paths, nodes as comfy_nodes
    from sie_pack.nodes.comfy_bridge import ComfySD
    from sie_pack.nodes.common import NodeInputError
    from sie_pack.nodes.imagic import save_trained
    N = pack.NODE_CLASS_MAPPINGS
    out = {}

    def unet_digest(model):  # as loaded (ComfyUI patches a loaded clone's weights in place)
        comfy.model_management.load_models_gpu([model])
        return digest(model.model.diffusion_model)

    def eps_of(model, cond):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=g)
        with torch.inference_mode(False), torch.no_grad():
            return ComfySD(model).eps(x, torch.tensor([400]), cond)

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
        out["inference_weights"] = any(p.is_inference() for p in model.model.diffusion_model.parameters())
        target = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        before = unet_digest(model)
        e_opt, curve1, _ = N["SIE_OptimizeEmbedding"].execute(model, vae, image, target, 3, 1e-2, 0)
        model_ft, curve2, trained, _ = N["SIE_FineTune"].execute(model, vae, image, e_opt, "lora", 3, 1e-3, 4, 0)
        out["weights_unchanged"] = unet_digest(model) == before
        out["e_opt_moved"] = float((e_opt[0][0] - target[0][0]).abs().max())
        out["curves"] = [list(curve1.shape), list(curve2.shape)]
        mixed = N["SIE_InterpolateConditioning"].execute(target, e_opt, 1.2)[0]
        out["interp_ok"] = bool(torch.allclose(mixed[0][0], 1.2 * target[0][0] - 0.2 * e_opt[0][0], atol=1e-5))
        latents = N["SIE_EtaSweep"].execute(model_ft, target, e_opt, negative, {"samples": torch.zeros(1, 4, 8, 8)},
                                          "0.5, 1.0", 7, 2, 5.0, "ddim", "ddim_uniform")[0]["samples"]
        out["sweep_shape"] = list(latents.shape)
        out["sweep_differs"] = float((latents[0] - latents[1]).abs().max())
        cond = e_opt[0][0]
        base_eps, ft_eps = eps_of(model, cond), eps_of(model_ft, cond)
        out["ft_changes_eps"] = float((ft_eps - base_eps).abs().max())
        # save -> ComfyUI's own LoraLoaderModelOnly -> identical predictions
        loras = tempfile.mkdtemp()
        folder_paths.add_model_folder_path("loras", loras)
        save_trained(trained, os.path.join(loras, "imagic_test.safetensors"))
        native = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "imagic_test.safetensors", 1.0)[0]
        out["native_vs_ours"] = float((eps_of(native, cond) - ft_eps).abs().max())
        out["weights_unchanged_after_all"] = unet_digest(model) == before
        # the training path (LoRA on layer outputs via object patches) == ComfyUI's weight-space LoRA patches
        from sie_pack.core.lora import LoRAConfig, lora_state_dict, make_loras
        from sie_pack.nodes.comfy_bridge import apply_delta
        with torch.inference_mode(False):
            sd = ComfySD(model)
            loras = make_loras({k: tuple(v.shape) for k, v in sd.unet_parameters().items()}, LoRAConfig(4, 4.0), 0)
            for lora in loras.values():
                torch.nn.init.normal_(lora.up, std=0.02)
            x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            with torch.no_grad(), sd.adapted(loras) as view:
                train_path = view.eps(x, torch.tensor([400]), cond)
            patched = apply_delta(model, lora_state_dict(loras))
        out["train_vs_patch"] = float((eps_of(patched, cond) - train_path).abs().max() / train_path.abs().max())
        errors = {}
        for name, call in {
            "conditioning": lambda: N["SIE_OptimizeEmbedding"].execute(model, vae, image, [[torch.zeros(1, 77, 1024), {}]], 1, 1e-3, 0),
            "image": lambda: N["SIE_FineTune"].execute(model, vae, torch.rand(1, 64, 64, 4), e_opt, "lora", 1, 0.0, 4, 0),
            "steps": lambda: N["SIE_FineTune"].execute(model, vae, image, e_opt, "lora", -1, 0.0, 4, 0),  # 0: default
            "empty": lambda: N["SIE_OptimizeEmbedding"].execute(model, vae, torch.rand(1, 0, 64, 3), target, 1, 1e-3, 0),
        }.items():
            try:
                call()
                errors[name] = "no error"
            except NodeInputError as e:
                errors[name] = str(e)
        out["errors"] = errors
    print("RESULT " + json.dumps(out))
""")


def test_imagic_nodes_on_a_real_comfyui_model(tmp_path):
    ckpt = random_sd15()
    r = run_in_comfyui(SCRIPT, str(ckpt), timeout=1800, tmp_dir=tmp_path)
    assert r["inference_weights"], "expected ComfyUI to load inference-mode weights, as its executor does"
    assert r["weights_unchanged"] and r["weights_unchanged_after_all"], r
    assert r["e_opt_moved"] > 0 and r["ft_changes_eps"] > 0, r
    assert r["curves"][0][0] == 1 and r["curves"][0][-1] == 3
    assert r["interp_ok"]
    assert r["sweep_shape"] == [2, 4, 8, 8] and r["sweep_differs"] > 0
    assert r["native_vs_ours"] == 0.0, r  # the native loader gives exactly our patched MODEL
    assert r["train_vs_patch"] < 1e-4, r  # what training optimised is what the patched MODEL computes
    errs = r["errors"]
    assert "input 'conditioning'" in errs["conditioning"] and "1024" in errs["conditioning"], errs
    assert "input 'image'" in errs["image"] and "alpha" in errs["image"], errs
    assert "input 'steps'" in errs["steps"], errs
    assert "input 'image'" in errs["empty"] and "empty" in errs["empty"], errs


CROSS = textwrap.dedent("""
    import comfy.sd
    from sie_pack.core.lora import LoRAConfig, lora_state_dict, make_loras
    from sie_pack.core.sd.loader import load_sd15
    from sie_pack.nodes.comfy_bridge import ComfySD, apply_delta
    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=False, output_clip=False)
    ours = load_sd15(sys.argv[2], device="cpu", dtype=torch.float32)
    loras = make_loras({k: tuple(v.shape) for k, v in ours.unet_parameters().items()}, LoRAConfig(4, 4.0), 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in loras.values():
            lora.up.copy_(torch.randn(lora.up.shape, generator=g) * 0.02)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([300])
    cond = torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        with ours.adapted(loras) as view:
            a = view.eps(x, t, cond)
        b = ComfySD(apply_delta(model, lora_state_dict(loras))).eps(x, t, cond)
        base = ours.eps(x, t, cond)
    print("RESULT " + json.dumps({"diff": float((a - b).abs().max() / a.abs().max()),
                                  "effect": float((a - base).abs().max() / a.abs().max()),
                                  "keys": len(loras)}))
""")


def test_a_lora_trained_outside_comfyui_loads_in_comfyui_identically(tmp_path):
    """Standalone (diffusers) adapters, saved in the pack's layout, patch ComfyUI's MODEL to the same predictions."""
    r = run_in_comfyui(CROSS, str(random_sd15()), timeout=900, tmp_dir=tmp_path)
    assert r["keys"] == 282  # every conv and linear weight of the SD 1.5 UNet
    assert r["effect"] > 1e-3  # the adapters change the prediction...
    assert r["diff"] < 1e-5, r  # ...identically in both back ends


FP16 = textwrap.dedent("""
    import os, tempfile
    from pathlib import Path
    import comfy.sd, folder_paths, nodes as comfy_nodes
    import sie_pack.nodes.comfy_bridge as bridge
    from sie_pack.core.imagic.artifact import Trained
    from sie_pack.core.lora import diff_state_dict
    from sie_pack.core.seam import DeltaFunction
    from sie_pack.nodes.comfy_bridge import ComfySD
    N = pack.NODE_CLASS_MAPPINGS
    folder = tempfile.mkdtemp()
    for name in ("loras", "sie_trained"):
        folder_paths.add_model_folder_path(name, folder, is_default=True)
    bridge.save_dir = lambda name: Path(folder)  # Save Trained writes here, not into the ComfyUI install
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([150, 700])

    def eps_of(model, cond, fns=None):
        with torch.inference_mode(False), torch.no_grad():
            sd = ComfySD(model)
            if fns is None:
                return sd.eps(x, t, cond.expand(2, -1, -1))
            with sd.adapted(fns) as view:
                return view.eps(x, t, cond.expand(2, -1, -1))

    out = {}
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
        target = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
        cond = target[0][0].float()
        image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        _, _, lora, _ = N["SIE_FineTune"].execute(model, vae, image, target, "lora", 2, 1e-3, 4, 0)
        with torch.inference_mode(False):
            params = ComfySD(model).unet_parameters()
            # a full fine-tune's layout (.diff / .diff_b) on every parameter of three parts of the UNet
            names = [k for k in params if k.startswith(("input_blocks.1.", "middle_block.", "out."))]
            deltas = {k: torch.randn(params[k].shape, generator=g) * 1e-3 for k in names}
        full = Trained(diff_state_dict(deltas), "full", cond.cpu(), {})
        base = eps_of(model, cond)
        for kind, trained in (("lora", lora), ("full", full)):
            files = {p: N["SIE_SaveTrained"].execute(trained, kind, p).ui["text"][0] for p in ("fp32", "fp16")}
            native = {p: comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, f, 1.0)[0]
                      for p, f in files.items()}
            e = {p: eps_of(m, cond) for p, m in native.items()}
            ours = eps_of(N["SIE_LoadTrained"].execute(model, files["fp16"], 1.0)[0], cond)
            r = {"sizes": {p: os.path.getsize(os.path.join(folder, f)) for p, f in files.items()},
                 "effect": float((e["fp32"] - base).abs().max()), "fp16_vs_fp32": float((e["fp16"] - e["fp32"]).abs().max()),
                 "load_trained_vs_native": float((ours - e["fp16"]).abs().max()), "keys": len(trained.delta)}
            if kind == "full":  # independent of ComfyUI's loader: the deltas, rounded to float16, as weight functions
                rounded = eps_of(model, cond, {k: DeltaFunction(v.half().float()) for k, v in deltas.items()})
                r["native_fp16_vs_weight_functions"] = float((e["fp16"] - rounded).abs().max())
                r["params"] = sum(v.numel() for v in deltas.values())
            out[kind] = r
    print("RESULT " + json.dumps(out))
""")


def test_fp16_saved_edits_load_in_comfyuis_lora_loader(tmp_path):
    """Save Trained's precision fp16: the LoRA and the full-fine-tune (.diff) layouts, written in float16, load in
    ComfyUI's own LoraLoaderModelOnly and in Load Trained, and predict like the float32 file to within float16's
    rounding of what the delta changes; the .diff file halves.

    Tolerances: the trained LoRA changes eps coherently while float16's rounding errors (each within 2^-11 of its
    entry) are independent, so the difference stays under 2^-11 of the change (measured 2.4e-5 of it).  The full
    delta here is random (N(0, 1e-3), 102 M entries): its change of eps is itself a sum of independent terms, so
    the rounding error is about its rms, 2^-11 / sqrt(3) = 2.8e-4 of the change (measured 2.1e-4); allowed 2^-10."""
    r = run_in_comfyui(FP16, str(random_sd15()), timeout=1800, tmp_dir=tmp_path)
    for kind in ("lora", "full"):
        k = r[kind]
        print(kind, k)
        assert k["effect"] > 1e-4, k
        assert k["load_trained_vs_native"] == 0.0, k  # Load Trained patches as ComfyUI's loader does
    assert r["lora"]["fp16_vs_fp32"] <= 2.0 ** -11 * r["lora"]["effect"], r["lora"]
    full = r["full"]
    assert full["fp16_vs_fp32"] <= 2.0 ** -10 * full["effect"], full
    ratio = full["sizes"]["fp16"] / full["sizes"]["fp32"]
    assert abs(ratio - 0.5) < 0.01, full  # e_opt (77 x 768 float32) is the only part that stays
    # every key of the float16 .diff file was applied: ComfyUI's patched model equals the same rounded deltas applied
    # independently, to float32 arithmetic
    assert full["native_fp16_vs_weight_functions"] <= 1e-5 * full["effect"], full


FULL = textwrap.dedent("""
    import comfy.sd, comfy.model_management
    import torch.nn.functional as F
    from sie_pack.core.diffusion import q_sample
    from sie_pack.core.lora import delta_weights
    from sie_pack.core.losses import NoiseDraw
    from sie_pack.core.seam import ReplaceFunction
    from sie_pack.core.seeds import derive_seed
    from sie_pack.nodes.comfy_bridge import ComfySD
    N = pack.NODE_CLASS_MAPPINGS
    lr = 1e-4
    out = {}
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=True, output_clip=True)
        target = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
        image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        comfy.model_management.load_models_gpu([model])
        before = digest(model.model.diffusion_model)
        # the node: one full fine-tune step, Adam's step taken inside backward, with gradient checkpointing on
        _, _, trained, _ = N["SIE_FineTune"].execute(model, vae, image, target, "full", 1, lr, 4, 0,
                                                     gradient_checkpointing="on")
        comfy.model_management.load_models_gpu([model])
        out["weights_unchanged"] = digest(model.model.diffusion_model) == before
        got = delta_weights(trained.delta)
        # independently: eq. 2's gradient w.r.t. some weights from one forward / backward at the node's draw, and
        # Adam's first step from it, lr * g / (|g| + 1e-8) (bias-corrected moments m = g, v = g^2)
        with torch.inference_mode(False):
            sd = ComfySD(model, None, vae)
            latent = sd.encode(image.permute(0, 3, 1, 2).clone())
            t, eps = NoiseDraw(derive_seed(0, 1), len(sd.alphas_cumprod))(latent)
            a = sd.alphas_cumprod.to(latent.device)[t]
            params = sd.unet_parameters()
            names = [k for k in params if k.startswith(("input_blocks.1.1.", "middle_block.0.", "out."))]
            fns = {k: ReplaceFunction(params[k]) for k in names}
            with sd.adapted(fns) as m:
                cond = target[0][0].clone().float()  # an ordinary tensor (the node clones it too)
                loss = F.mse_loss(m.eps(q_sample(latent, a, eps), t, cond), eps)
                loss.backward()
        worst, sure, most = 0.0, 0, 0.0
        for k in names:
            g = fns[k].param.grad
            want = -lr * g / (g.abs() + 1e-8)
            d = got[k].reshape(g.shape)
            # the delta is (w + step) - w in float32: within two float32 ulps of |w| of the step itself
            ulps = 2 * torch.finfo(torch.float32).eps * params[k].detach().abs()
            big = g.abs() > 1e-5  # where the sign of g is not within float rounding of the two runs
            sure += int(big.sum())
            worst = max(worst, float(((d - want).abs() - ulps)[big].max()) if big.any() else 0.0)
            most = max(most, float((d.abs() - ulps).max()))
        out["max_step"] = most
        out.update(names=len(names), checked=sure, worst=worst, moved=len(got), all_params=len(params),
                   unmoved=sorted(set(params) - set(got)))
    print("RESULT " + json.dumps(out))
""")


def test_a_full_fine_tune_in_comfyui_takes_adams_step_inside_backward(tmp_path):
    """A full fine-tune through Fine-Tune Model on a ComfyUI MODEL (the float32 copy path, each weight's Adam step
    taken inside backward, gradient checkpointing on): after one step every checked weight moved by Adam's first
    step computed here from eq. 2's gradient at the node's draw, and the input MODEL is unchanged."""
    r = run_in_comfyui(FULL, str(random_sd15()), timeout=1800, tmp_dir=tmp_path)
    print(r)
    assert r["weights_unchanged"], r
    # every UNet parameter was stepped but two: at 64x64 the middle block sees a 1x1 grid, so its self-attention
    # has one key, the softmax is 1 whatever q and k are, and their gradient is exactly zero
    assert r["unmoved"] == ["middle_block.1.transformer_blocks.0.attn1.to_k.weight",
                            "middle_block.1.transformer_blocks.0.attn1.to_q.weight"], r
    assert r["moved"] == r["all_params"] - 2, r
    assert r["checked"] > 10_000 and r["worst"] <= 1e-5 * 1e-4, r  # measured 5.9e-8 before the ulp allowance
    assert r["max_step"] <= 1e-4 * (1 + 1e-6), r  # Adam's first step is at most lr
