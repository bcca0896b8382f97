"""OpenCLIP's text-transformer layout <-> transformers' ``CLIPTextModelWithProjection`` layout.

SDXL's second text encoder (OpenCLIP ViT-bigG/14's text tower) is stored in single-file
checkpoints in open_clip's own layout (``conditioner.embedders.1.model.*``); diffusers loads
it as a transformers ``CLIPTextModelWithProjection``.  The same weights, named and packed
differently:

=========================================  ==============================================
open_clip                                  transformers
=========================================  ==============================================
``token_embedding.weight``                 ``text_model.embeddings.token_embedding.weight``
``positional_embedding`` [77, D]           ``text_model.embeddings.position_embedding.weight``
``transformer.resblocks.i.ln_1``           ``text_model.encoder.layers.i.layer_norm1``
``transformer.resblocks.i.attn.in_proj_*`` ``...self_attn.{q,k,v}_proj.*`` (rows split in three)
``transformer.resblocks.i.attn.out_proj``  ``...self_attn.out_proj``
``transformer.resblocks.i.ln_2``           ``text_model.encoder.layers.i.layer_norm2``
``transformer.resblocks.i.mlp.c_fc``       ``text_model.encoder.layers.i.mlp.fc1``
``transformer.resblocks.i.mlp.c_proj``     ``text_model.encoder.layers.i.mlp.fc2``
``ln_final``                               ``text_model.final_layer_norm``
``text_projection`` [D, P] (x @ P)         ``text_projection.weight`` [P, D] (a Linear: P^T)
=========================================  ==============================================

``logit_scale`` and the attention-mask buffer have no counterpart in the text model and are
not read.  Both functions are pure renames (plus the split/concatenation and transpose
above), so a round trip is bit-exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias"}
_RESBLOCK = "transformer.resblocks."
_HF_LAYER = "text_model.encoder.layers."


def _canonical(key: str) -> str:
    """transformers 5 drops the ``text_model.`` level of CLIP's parameter names: put it back."""
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def openclip_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip text-tower state dict (no prefix) -> transformers names (with ``text_model.``)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in _TOP:
            out[_TOP[k]] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif k.startswith(_RESBLOCK):
            i, rest = k[len(_RESBLOCK):].split(".", 1)
            base = f"{_HF_LAYER}{i}."
            if rest.startswith("attn.in_proj_"):
                leaf = rest[len("attn.in_proj_"):]  # weight [3D, D] or bias [3D]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{leaf}"] = part.contiguous()
                continue
            module, leaf = rest.rsplit(".", 1)
            if module not in _LAYER:
                raise KeyError(f"unexpected OpenCLIP text key {k}")
            out[f"{base}{_LAYER[module]}.{leaf}"] = v
        # logit_scale, attn_mask: not part of the text model
    return out


def hf_to_openclip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModelWithProjection`` state dict -> open_clip text-tower names."""
    top = {v: k for k, v in _TOP.items()}
    layer = {v: k for k, v in _LAYER.items()}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        k = _canonical(key)
        if k.endswith("position_ids"):
            continue
        if k in top:
            out[top[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        elif k.startswith(_HF_LAYER):
            i, rest = k[len(_HF_LAYER):].split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, leaf), {})[module[-6]] = v
                continue
            if module not in layer:
                raise KeyError(f"unexpected CLIP text key {key}")
            out[f"{_RESBLOCK}{i}.{layer[module]}.{leaf}"] = v
        else:
            raise KeyError(f"unexpected CLIP text key {key}")
    for (i, leaf), parts in qkv.items():
        out[f"{_RESBLOCK}{i}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
