"""Writes tests/data/imagic_port_reference.json by running the diffusers community Imagic pipeline's ``train()``.

    python tests/reference/make_imagic_reference.py PORT_FILE [--commit HASH] [--check]

There is no official Imagic code (the paper used Imagen); the public reference is the diffusers community
pipeline ``examples/community/imagic_stable_diffusion.py`` (``ImagicStableDiffusionPipeline``).  ``PORT_FILE``
is a local copy of that file kept OUTSIDE this repository; the stored numbers were made from
huggingface/diffusers commit 14bb45e4e8902e10c9e1d1b877972b83c054a8fb (the commit
/work/shared/reference/methods.md section 3 names), extracted with

    git --git-dir /work/.mirror/huggingface+diffusers/repo show \\
        14bb45e4e8902e10c9e1d1b877972b83c054a8fb:examples/community/imagic_stable_diffusion.py \\
        > /work/team/reference/imagic_stable_diffusion.py

(sha256 of the file: see ``PORT_SHA256``; ``--commit`` records another origin).  The file is imported by path
(importlib) and never copied into this repository; nothing in it is edited.  ``--check`` recomputes and
compares with the stored file instead of writing it (exit status 1 on any difference beyond 1e-6 relative).

What is run: ``ImagicStableDiffusionPipeline.train(prompt, image, height=128, width=128, generator=...,
embedding_learning_rate=1e-3, diffusion_model_learning_rate=2e-6, text_embedding_optimization_steps=N_EMB,
model_fine_tuning_optimization_steps=N_FT)``, i.e. the port's own default learning rates, on the CPU, fp32,
on a random-weight model that keeps Stable Diffusion 1.5's structure at a reduced width (:func:`configs`):
the shipped SD 1.5 UNet config (four blocks, three of them cross-attention, two layers per block, the
cross-attention mid block, 8 heads) with channels (32, 64, 64, 64), a 4-block VAE and a 2-layer CLIP text
encoder of width 32 that keeps CLIP's 49,408-token vocabulary (the shipped tokenizer), the shipped SD 1.5
scheduler (scaled linear, T = 1000).  The pack's single-file loader reads the same modules (the test loads
them through ``core.sd.load_sd15``).  Every weight comes from :func:`fill`: a SplitMix64 counter hash of
(seed, parameter name, index) made uniform with the variance 1/fan_in (norm scales 1 + U(-0.1, 0.1), biases
U(-0.05, 0.05)), pure integer and IEEE arithmetic in numpy, so that the test rebuilds bit-identical weights
anywhere without storing them (their sha256 is stored and checked).

How the draws are recorded: while ``train()`` runs, ``torch.randn`` and ``torch.randint`` are wrapped (the
real functions are called, with the global generator seeded by ``torch.manual_seed(DRAW_SEED)``) and every
call without a ``generator`` argument is recorded; the port calls ``torch.randn(latent shape)`` (eps) then
``torch.randint(1000, (1,))`` (t) once per step, first N_EMB steps of stage 1, then N_FT of stage 2.  The
scheduler's ``add_noise`` is wrapped too, and the script asserts that it received exactly the recorded
(eps, t) of each step and the same image latent every time (the one VAE posterior sample the port draws with
``generator``); that latent is stored.  The loss of every step is recorded by a subclass of accelerate's
``Accelerator`` whose ``backward`` notes ``loss.item()`` and then calls the real one (the pipeline looks the
class up in its module's namespace, where the subclass is put for the call).

accelerate: the port constructs ``Accelerator(mixed_precision="fp16")``.  On the CPU accelerate creates no
GradScaler and ``backward`` is ``loss.backward()`` (accelerate 1.16.0, ``Accelerator.__init__``: the fp16
branch requires a non-CPU device); this is the behaviour recorded.  (On CUDA it would scale the loss by the
GradScaler's 65536 and never unscale the gradients, since nothing is ``prepare()``d: Adam's update is then
that of eps = 1e-8 / 65536.  ``--cuda-scaler`` runs that variant on the CPU and prints how far it lands from
the stored run: 0.54% of e_opt's change, up to 3.8% of a recorded weight's change after 5 steps.)
accelerate is not a dependency of the pack; the script imports it from ``--pylib`` (default
/work/team/reference/pylib, e.g.
``pip install --target DIR --no-deps accelerate psutil``) or from the environment, and, where it is missing,
replaces it with a stub that does what the real one does on the CPU (plain ``backward``; noted in the output).
The port's other imports resolve in diffusers 0.42.1 / transformers 5 unchanged.

Recorded (tensors as base64 of little-endian float32 with their shape; losses as floats):

* ``latent``: the image latent the port trained on (0.18215 x a VAE posterior sample) [1, 4, 16, 16];
* ``draws``: per step of each stage, t and eps;
* ``e_tgt``: the target text embedding the port started from (``text_embeddings_orig``) [1, 77, 32];
* ``e_opt``: the embedding after stage 1 (``text_embeddings``);
* ``losses``: the port's loss per step of each stage;
* ``weights``: a few UNet parameters (diffusers names) after stage 2, whole (before: :func:`build_model`);
* ``delta_norms``: for every UNet parameter, the float64 L2 norm of (after - before);
* ``unet_sha256``: digest of the initial UNet weights (name order), which the test checks first.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import importlib.util
import json
import subprocess
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "imagic_port_reference.json"
REPO = "huggingface/diffusers"
PORT_PATH = "examples/community/imagic_stable_diffusion.py"
KNOWN_COMMIT = "14bb45e4e8902e10c9e1d1b877972b83c054a8fb"
PORT_SHA256 = "2abb4fd309176a3c9f175ec82ad1e1de69759265db3e5fece81d9123e49c2b17"
DEFAULT_PYLIB = "/work/team/reference/pylib"

SEED = 0  # weights
DRAW_SEED = 1234  # torch.manual_seed before train(): the port's (t, eps) come from the global generator
VAE_SEED = 7  # the generator passed to train(): the VAE posterior sample
PROMPT = "a photo of a cup of green matcha tea"
SIZE = 128  # image side in pixels; latent 16 x 16
N_EMB, N_FT = 5, 5
EMB_LR, FT_LR = 1e-3, 2e-6  # the port's defaults (train()'s signature)
IMAGE = ROOT / "core" / "sinddm" / "data" / "coffee_128x100.png"

# Whole parameters recorded before/after stage 2: the first conv, cross-attention key/value (they see the
# embedding), a self-attention query, a time-embedding bias, a mid-block norm, the last conv.
WEIGHTS = ["conv_in.weight",
           "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
           "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q.weight",
           "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.weight",
           "time_embedding.linear_1.bias",
           "mid_block.attentions.0.norm.weight",
           "conv_out.weight", "conv_out.bias"]


# -- the random-weight model ------------------------------------------------------------------------------------
def configs() -> dict[str, dict]:
    """unet / vae / text_encoder configs: the shipped SD 1.5 ones at a reduced width (same block structure)."""
    shipped = ROOT / "core" / "sd" / "configs" / "sd15"
    unet = json.loads((shipped / "unet" / "config.json").read_text())
    unet.update(block_out_channels=[32, 64, 64, 64], norm_num_groups=8, cross_attention_dim=32, sample_size=SIZE // 8)
    vae = json.loads((shipped / "vae" / "config.json").read_text())
    vae.update(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=SIZE)
    text = json.loads((shipped / "text_encoder" / "config.json").read_text())
    text.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    return {"unet": unet, "vae": vae, "text_encoder": text}


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniform(seed: int, name: str, n: int) -> np.ndarray:
    """n float64 values in [-1, 1), a pure function of (seed, name, index)."""
    key = np.uint64((zlib.crc32(f"{seed}:{name}".encode()) << 20) ^ seed)
    with np.errstate(over="ignore"):
        x = _splitmix64(key * _GOLDEN + np.arange(n, dtype=np.uint64))
    return (x >> np.uint64(11)).astype(np.float64) * (2.0 / 2**53) - 1.0


@torch.no_grad()
def fill(module: torch.nn.Module, seed: int, prefix: str) -> None:
    """Overwrite every parameter of ``module`` deterministically (see the module docstring)."""
    for name, p in module.named_parameters():
        u = uniform(seed, f"{prefix}.{name}", p.numel()).reshape(tuple(p.shape))
        if p.ndim >= 2:
            std = 0.02 if "embedding" in name else 1.0 / np.sqrt(p[0].numel())
            v = u * (np.sqrt(3.0) * std)
        elif name.endswith("bias"):
            v = u * 0.05
        else:
            v = 1.0 + 0.1 * u
        p.copy_(torch.from_numpy(v.astype(np.float32)))


def build_model(seed: int = SEED):
    """(unet, vae, text_encoder): diffusers/transformers modules with :func:`fill`'s weights, eval mode, fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = configs()
    unet = UNet2DConditionModel.from_config({k: v for k, v in cfg["unet"].items() if not k.startswith("_")})
    vae = AutoencoderKL.from_config({k: v for k, v in cfg["vae"].items() if not k.startswith("_")})
    text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg["text_encoder"].items()
                                           if k not in ("architectures", "transformers_version")}))
    for module, prefix in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        fill(module, seed, prefix)
    return unet.float().eval(), vae.float().eval(), text.float().eval()


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()


def encode(t: torch.Tensor) -> dict:
    a = t.detach().cpu().float().contiguous().numpy().astype("<f4")
    return {"shape": list(a.shape), "f32": base64.b64encode(a.tobytes()).decode("ascii")}


def decode(d: dict) -> torch.Tensor:
    a = np.frombuffer(base64.b64decode(d["f32"]), dtype="<f4").reshape(d["shape"])
    return torch.from_numpy(a.copy())


def load_reference(path: Path = OUT) -> dict:
    return json.loads(Path(path).read_text())


def draws_of(ref: dict, stage: str):
    """The recorded (t [1], eps) of each step of ``stage`` ("embedding" | "finetune") as a ``draws(step)``."""
    steps = [(torch.tensor(d["t"], dtype=torch.long), decode(d["eps"])) for d in ref["draws"][stage]]
    return lambda step: steps[step - 1]


# -- running the port ---------------------------------------------------------------------------------------------
class _StubAccelerator:
    """accelerate's Accelerator as it behaves on the CPU for this pipeline (used only when accelerate is absent)."""

    is_main_process = is_local_main_process = sync_gradients = True

    def __init__(self, *a, **k):
        pass

    def init_trackers(self, *a, **k):
        pass

    def accumulate(self, *a, **k):
        return contextlib.nullcontext()

    def backward(self, loss, **k):
        loss.backward(**k)

    def log(self, *a, **k):
        pass

    def wait_for_everyone(self):
        pass


def import_port(path: Path, pylib: str | None):
    """The port's module, loaded by path; (module, accelerate version or "stub")."""
    if pylib and Path(pylib).is_dir() and pylib not in sys.path:
        sys.path.append(pylib)
    try:
        import accelerate

        version = accelerate.__version__
    except ImportError:
        stub = types.ModuleType("accelerate")
        stub.Accelerator = _StubAccelerator
        sys.modules["accelerate"] = stub
        version = "stub (plain backward, as accelerate on the CPU)"
    spec = importlib.util.spec_from_file_location("imagic_port_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, version


def run_port(port_file: Path, pylib: str | None, loss_scale: float = 1.0) -> dict:
    from diffusers import PNDMScheduler
    from PIL import Image

    from core.sd.tokenizer import SHIPPED_DIR, load_clip_tokenizer

    torch.set_num_threads(1)
    mod, acc_version = import_port(port_file, pylib)
    unet, vae, text = build_model()
    before = {k: v.detach().clone() for k, v in unet.named_parameters()}
    unet_sha = digest(unet)
    scheduler = PNDMScheduler.from_pretrained(str(ROOT / "core/sd/configs/sd15/scheduler"))
    tokenizer = load_clip_tokenizer(SHIPPED_DIR)
    pipe = mod.ImagicStableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(IMAGE).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)

    recorded: list[tuple[str, torch.Tensor]] = []
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    losses: list[float] = []
    real_randn, real_randint, real_add_noise = torch.randn, torch.randint, scheduler.add_noise

    def randn(*a, **k):
        out = real_randn(*a, **k)
        if k.get("generator") is None:
            recorded.append(("randn", out.detach().clone()))
        return out

    def randint(*a, **k):
        out = real_randint(*a, **k)
        if k.get("generator") is None:
            recorded.append(("randint", out.detach().clone()))
        return out

    def add_noise(original, noise, timesteps):
        seen.append((original.detach().clone(), noise.detach().clone(), timesteps.detach().clone()))
        return real_add_noise(original, noise, timesteps)

    base = mod.Accelerator

    class Recording(base):
        def backward(self, loss, **k):
            losses.append(loss.item())
            return super().backward(loss * loss_scale if loss_scale != 1.0 else loss, **k)

    torch.manual_seed(DRAW_SEED)
    torch.randn, torch.randint, scheduler.add_noise, mod.Accelerator = randn, randint, add_noise, Recording
    try:
        pipe.train(PROMPT, image, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(VAE_SEED),
                   embedding_learning_rate=EMB_LR, diffusion_model_learning_rate=FT_LR,
                   text_embedding_optimization_steps=N_EMB, model_fine_tuning_optimization_steps=N_FT)
    finally:
        torch.randn, torch.randint, scheduler.add_noise, mod.Accelerator = real_randn, real_randint, real_add_noise, base

    n = N_EMB + N_FT
    kinds = [k for k, _ in recorded]
    if kinds != ["randn", "randint"] * n or len(seen) != n or len(losses) != n:
        raise RuntimeError(f"unexpected draws: {kinds}, {len(seen)} add_noise calls, {len(losses)} losses")
    latent = seen[0][0]
    draws = []
    for i, (orig, noise, t) in enumerate(seen):
        eps, t_rec = recorded[2 * i][1], recorded[2 * i + 1][1]
        if not (torch.equal(orig, latent) and torch.equal(noise, eps) and torch.equal(t, t_rec)):
            raise RuntimeError(f"step {i}: add_noise did not receive the recorded draws")
        draws.append({"t": [int(v) for v in t_rec], "eps": encode(eps)})
    after = dict(unet.named_parameters())
    return {
        "latent": encode(latent),
        "draws": {"embedding": draws[:N_EMB], "finetune": draws[N_EMB:]},
        "e_tgt": encode(pipe.text_embeddings_orig),
        "e_opt": encode(pipe.text_embeddings),
        "losses": {"embedding": losses[:N_EMB], "finetune": losses[N_EMB:]},
        "weights": {k: encode(after[k]) for k in WEIGHTS},
        "delta_norms": {k: float((after[k].detach().double() - before[k].double()).norm()) for k in before},
        "unet_sha256": unet_sha,
        "accelerate": acc_version,
    }


def git_commit(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path.parent), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def make(port_file: Path, commit: str | None, pylib: str | None, loss_scale: float = 1.0) -> dict:
    import diffusers
    import transformers

    sha = hashlib.sha256(port_file.read_bytes()).hexdigest()
    if commit is None:
        commit = KNOWN_COMMIT if sha == PORT_SHA256 else git_commit(port_file)
    if commit is None:
        raise SystemExit(f"{port_file}: not the known copy (sha256 {sha}) and not in a git checkout; pass --commit")
    data = run_port(port_file, pylib, loss_scale)
    meta = {
        "source": {"repository": REPO, "path": PORT_PATH, "commit": commit, "sha256": sha,
                   "function": "ImagicStableDiffusionPipeline.train"},
        "generator": "tests/reference/make_imagic_reference.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "accelerate": data.pop("accelerate")},
        "settings": {"prompt": PROMPT, "size": SIZE, "n_emb": N_EMB, "n_ft": N_FT, "embedding_learning_rate": EMB_LR,
                     "diffusion_model_learning_rate": FT_LR, "seed": SEED, "draw_seed": DRAW_SEED,
                     "vae_seed": VAE_SEED, "image": str(IMAGE.relative_to(ROOT)), "device": "cpu", "dtype": "float32",
                     "configs": configs()},
    }
    return {**meta, **data}


def compare(new: dict, old: dict, rtol: float = 1e-6) -> list[str]:
    problems = []

    def walk(a, b, path):
        if isinstance(a, dict) and "f32" in a:
            x, y = decode(a), decode(b)
            if x.shape != y.shape or not torch.allclose(x, y, rtol=rtol, atol=rtol * float(y.abs().max() + 1e-30)):
                problems.append(f"{path}: max abs difference {(x - y).abs().max().item():.3g}")
        elif isinstance(a, dict):
            for k in set(a) | set(b):
                if k in ("versions",):
                    continue
                if k not in a or k not in b:
                    problems.append(f"{path}.{k}: missing on one side")
                else:
                    walk(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, list) and a and isinstance(a[0], (dict, list)):
            if len(a) != len(b):
                problems.append(f"{path}: length {len(a)} vs {len(b)}")
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif isinstance(a, (float, int)) and isinstance(b, (float, int)) and not isinstance(a, bool):
            if abs(a - b) > rtol * max(abs(a), abs(b), 1e-12):
                problems.append(f"{path}: {a} vs {b}")
        elif isinstance(a, list) and all(isinstance(v, (int, float)) for v in a + b):
            if len(a) != len(b) or any(abs(x - y) > rtol * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b)):
                problems.append(f"{path}: {a} vs {b}")
        elif a != b:
            problems.append(f"{path}: {a!r} vs {b!r}")

    walk(new, old, "")
    return problems


def scaler_effect(scaled: dict, cpu: dict) -> dict:
    """Max |difference| / max |change| between two runs: e_opt - e_tgt, and each recorded weight after stage 2."""
    unet = dict(build_model()[0].named_parameters())
    e_tgt = decode(cpu["e_tgt"])

    def rel(a, b, start):
        return float((a - b).abs().max() / (b - start).abs().max())

    out = {"e_opt": rel(decode(scaled["e_opt"]), decode(cpu["e_opt"]), e_tgt)}
    for k in WEIGHTS:
        out[k] = rel(decode(scaled["weights"][k]), decode(cpu["weights"][k]), unet[k].detach())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("port", type=Path, help="local copy of examples/community/imagic_stable_diffusion.py")
    ap.add_argument("--commit", default=None, help="the diffusers commit the copy came from (default: recognised "
                                                   "by its sha256, or read from a git checkout)")
    ap.add_argument("--pylib", default=DEFAULT_PYLIB, help="extra folder on sys.path holding accelerate")
    ap.add_argument("--check", action="store_true", help="compare with the stored file instead of writing it")
    ap.add_argument("--cuda-scaler", action="store_true",
                    help="run the port as on CUDA (backward of 65536 x loss, gradients never unscaled) and print how "
                         "far that lands from the stored CPU run; writes nothing")
    a = ap.parse_args(argv)
    if not a.port.is_file():
        ap.error(f"{a.port}: no such file")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    data = make(a.port.resolve(), a.commit, a.pylib, 65536.0 if a.cuda_scaler else 1.0)
    if a.cuda_scaler:
        print(json.dumps(scaler_effect(data, load_reference()), indent=1))
        return 0
    if a.check:
        problems = compare(data, load_reference())
        print("\n".join(problems) if problems else f"{OUT.name}: reproduced")
        return 1 if problems else 0
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes); losses {data['losses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
