"""What one training step of a full-size UNet keeps for backward, counted on PyTorch's meta device.

    python benchmarks/unet_saved_tensors.py --out benchmarks/results/unet_saved_tensors_meta.json

SD 1.5 and SDXL UNets are built from the shipped configs on the meta device (no memory, no weights,
seconds on a CPU) and run forward once with ``saved_tensors_hooks`` counting the bytes of every tensor
autograd saves, in three classes:

* ``weights``: the parameters themselves (or views of them).  The diffusers back end saves no copy,
  but ComfyUI computes a training step with a per-call copy of each weight (its weight wrappers copy),
  so on ComfyUI's back end these bytes are *extra* memory until backward;
* ``self_attention_probs``: the [N, N] softmax of self-attention, quadratic in the tokens; a GPU's
  memory-efficient attention keeps O(N) instead;
* ``activations``: everything else, linear in the latent's pixels.

fp32, batch 1, with and without gradient checkpointing (diffusers' own, which keeps block inputs only;
the one block being recomputed during backward is not counted).  The ratio SDXL / SD 1.5 of the linear
part per latent pixel scales the pack's SD 1.5 activation estimate (``core.resources``) to SDXL.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import header, write_result  # noqa: E402
from core.sd.loader import CONFIG_DIR, XL_CONFIG_DIR, read_config  # noqa: E402

MODELS = {"sd15": (CONFIG_DIR, 768, False), "sdxl": (XL_CONFIG_DIR, 2048, True)}


def saved_bytes(family: str, latent_hw: tuple[int, int], checkpointing: bool) -> dict[str, int]:
    """Bytes autograd saves in one forward of the family's UNet at ``latent_hw``, by class."""
    from diffusers import UNet2DConditionModel

    root, ctx, xl = MODELS[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read_config("unet", root))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = {id(p) for p in unet.parameters()}
    tokens = {latent_hw[0] * latent_hw[1] // 4**k for k in range(4)}
    out = {"weights": 0, "self_attention_probs": 0, "activations": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        base = t._base if t._base is not None else t
        if id(t) in params or id(base) in params:
            out["weights"] += n
        elif t.ndim >= 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] in tokens:
            out["self_attention_probs"] += n
        else:
            out["activations"] += n
        return t

    x = torch.randn(1, 4, *latent_hw, device="meta", requires_grad=True)
    kw = {"encoder_hidden_states": torch.randn(1, 77, ctx, device="meta")}
    if xl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, device="meta"),
                                   "time_ids": torch.randn(1, 6, device="meta")}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, torch.tensor([500], device="meta"), **kw)
    out["unet_bytes_fp32"] = sum(p.numel() for p in unet.parameters()) * 4
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    for family, sizes in (("sd15", [(32, 32), (64, 64)]), ("sdxl", [(64, 64), (128, 128)])):
        for hw in sizes:
            for ck in (False, True):
                r = saved_bytes(family, hw, ck)
                row = {"family": family, "latent": list(hw), "checkpointing": ck, **r,
                       "activations_mib_per_latent_pixel": r["activations"] / 2**20 / (hw[0] * hw[1]),
                       "weights_saved_fraction": r["weights"] / r["unet_bytes_fp32"]}
                rows.append(row)
                print(f"{family} {hw} {'ckpt' if ck else '    '}  activations {r['activations'] / 2**30:6.2f} GiB "
                      f"({row['activations_mib_per_latent_pixel']:.3f} MiB/latent px)  self-attn probs "
                      f"{r['self_attention_probs'] / 2**30:6.2f} GiB  weights saved {r['weights'] / 2**30:5.2f} GiB "
                      f"({row['weights_saved_fraction']:.2f} of the UNet)")
    lin = {f: max(r["activations_mib_per_latent_pixel"] for r in rows if r["family"] == f and not r["checkpointing"])
           for f in MODELS}
    ratio = lin["sdxl"] / lin["sd15"]
    print(f"SDXL / SD 1.5 linear activations per latent pixel: {ratio:.2f}")
    if a.out:
        write_result(a.out, {**header(), "rows": rows, "sdxl_over_sd15_activations_per_pixel": ratio})


if __name__ == "__main__":
    main()
