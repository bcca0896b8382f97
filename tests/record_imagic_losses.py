"""Records Imagic's fixed-seed losses on the tiny model (run once, before the engine refactor).

    python tests/record_imagic_losses.py   # writes tests/data/imagic_recorded_losses.json

The numbers in that file were produced by this script at commit eeb0d1c, with Imagic's
stage 1 and 2 still on the old ``core.training.fit_denoising`` loop; ``tests/test_fit.py``
checks that the engine's fit loop reproduces them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

STEPS = 12


def tiny_setup():
    from tiny_sd import tiny_sd_model

    model = tiny_sd_model(0)
    img = Image.open(ROOT / "core/sinddm/data/coffee_128x100.png").convert("RGB").resize((64, 64))
    x = torch.from_numpy(np.asarray(img).astype("float32") / 255).permute(2, 0, 1)[None] * 2 - 1
    small = F.avg_pool2d(x, 4)
    latent = torch.cat([small, small.mean(1, keepdim=True)], 1) * 1.5
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1
    return model, latent, model.encode_text(["a photo of a dog"]), mask


def record() -> dict:
    try:
        from core.imagic import EmbeddingConfig, FineTuneConfig, LoRAConfig, finetune, optimize_embedding
    except ImportError:
        from core.finetune import FineTuneConfig, finetune
        from core.lora import LoRAConfig
        from core.optimize_embedding import EmbeddingConfig, optimize_embedding

    torch.set_num_threads(1)
    model, latent, e_tgt, mask = tiny_setup()
    out = {}
    emb = optimize_embedding(model, latent, e_tgt, EmbeddingConfig(steps=STEPS, lr=1e-2, seed=3))
    out["embedding"] = emb.losses
    out["embedding_masked"] = optimize_embedding(model, latent, e_tgt, EmbeddingConfig(steps=STEPS, lr=1e-2, seed=3),
                                                 mask=mask).losses
    lora = finetune(model, latent, emb.e_opt, FineTuneConfig(mode="lora", steps=STEPS, lr=5e-3, seed=4,
                                                              lora=LoRAConfig(rank=4, alpha=4)))
    out["finetune_lora"] = lora.losses
    full = finetune(model, latent, emb.e_opt, FineTuneConfig(mode="full", steps=STEPS, lr=1e-4, seed=5))
    out["finetune_full"] = full.losses
    return out


if __name__ == "__main__":
    path = ROOT / "tests/data/imagic_recorded_losses.json"
    data = {"about": "Imagic stage 1/2 losses on the tiny model, recorded by tests/record_imagic_losses.py at "
                     "commit eeb0d1c (old loop core.training.fit_denoising), 1 thread.", **record()}
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data, indent=1))
