"""The two implementations of the seam agree on a real-architecture SD 1.5 checkpoint.

``nodes.comfy_bridge.ComfySD`` wraps ComfyUI's own MODEL / CLIP / VAE (loaded by
ComfyUI from the file); ``core.sd`` loads the same file with diffusers modules.  Both
must give the same text encoding, epsilon prediction, VAE latents and decoded images
(up to float32 round-off between two attention implementations).  Runs in ComfyUI's
Python because it needs ``comfy``; skipped without COMFYUI_DIR.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from comfy_server import REPO, comfyui_dir, comfyui_python, run_in_comfyui, skip_reason

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


def random_checkpoint(name: str, builder: str, timeout: float = 900) -> Path:
    """A random-weight checkpoint ``name`` in the test cache, built once by ``builder`` (a script in
    tests/integration run with ComfyUI's Python: it uses ComfyUI's own classes)."""
    cache = Path(os.environ.get("SIE_TEST_CACHE", Path.home() / ".cache" / "comfyui-single-image-edit"))
    path = cache / name
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(comfyui_python(comfyui_dir())), str(REPO / "tests/integration" / builder),
                        str(path), "--comfyui", str(comfyui_dir())], check=True, timeout=timeout)
    return path


def random_sd15() -> Path:
    """The random-weight SD 1.5 checkpoint, built once with ComfyUI's classes and cached."""
    return random_checkpoint("random_sd15.safetensors", "make_random_sd15.py")


SCRIPT = textwrap.dedent("""
    import comfy.sd
    from sie_pack.nodes.comfy_bridge import ComfySD
    from sie_pack.core.sd.loader import load_sd15
    from sie_pack.core.seam import LatentDiffusion
    path = sys.argv[2]
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    a = ComfySD(model, clip, vae)
    b = load_sd15(path, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    img = torch.rand(1, 3, 64, 64, generator=g)
    out = {"comfy_config": type(model.model.model_config).__name__,
           "protocol": [isinstance(a, LatentDiffusion), isinstance(b, LatentDiffusion)],
           "context_dim": [a.context_dim, b.context_dim]}
    with torch.no_grad():
        ca, cb = a.encode_text(["a photo of a cat"] * 3), b.encode_text(["a photo of a cat"] * 3)
        ea, eb = a.eps(x, t, cb), b.eps(x, t, cb)
        la, lb = a.encode(img), b.encode(img)
        da, db = a.decode(lb), b.decode(lb)
    out.update(cond=rel(ca, cb), eps=rel(ea, eb), latent=rel(la, lb), image=float((da - db).abs().max()),
               schedule=float((a.alphas_cumprod - b.alphas_cumprod).abs().max()),
               shapes=[list(ea.shape), list(la.shape), list(da.shape)], eps_scale=float(eb.abs().mean()))
    print("RESULT " + json.dumps(out))
""")


def test_comfy_bridge_matches_diffusers_backend(tmp_path):
    ckpt = random_sd15()
    r = run_in_comfyui(SCRIPT, str(ckpt), timeout=900, tmp_dir=tmp_path)
    assert r["comfy_config"] == "SD15"  # ComfyUI's checkpoint loader detects the file as SD 1.5
    assert r["protocol"] == [True, True] and r["context_dim"] == [768, 768]
    assert r["shapes"] == [[3, 4, 8, 8], [1, 4, 8, 8], [1, 3, 64, 64]]
    assert r["schedule"] < 1e-6
    assert r["eps_scale"] > 0.01  # the comparison is not between two zero tensors
    # relative to the largest value; fp32 with different attention kernels (measured: ~1e-6)
    assert r["cond"] < 1e-5, r
    assert r["eps"] < 1e-5, r
    assert r["latent"] < 1e-5, r
    assert r["image"] < 1e-5, r
