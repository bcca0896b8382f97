"""Writes tests/data/sine_positional_reference.json from the OFFICIAL SINE code (F(v), the positional map).

    python tests/reference/make_sine_positional_reference.py OFFICIAL [--check]

``OFFICIAL`` is either a checkout of zhang-zx/SINE (the folder holding ``ldm/``) or a bare git
directory of it (as the ``fetch`` tool leaves it, e.g. ``/work/.mirror/zhang-zx+SINE/repo``).  For a
bare directory the two files below are extracted with ``git --git-dir OFFICIAL show HEAD:<file>`` into
a temporary folder outside this repository (``/tmp/sine_official_*``), and the commit is read with
``git rev-parse HEAD``; for a folder of extracted files that is not a git checkout, pass
``--commit HASH`` to record the commit they came from.  The numbers in the stored file were made from commit
c0df9502b622fe36823ccf3622c8df381e801dd8 (HEAD of zhang-zx/SINE, "Update README.md").
``--check`` recomputes and compares with the stored file instead of writing it (exit status 1 on any
difference).  Only torch and numpy are needed (pydantic too if installed; it is stubbed otherwise).

The official files are imported by file path (importlib), never copied into this repository:

* ``ldm/modules/diffusionmodules/positional_encoding.py``: ``SinusoidalPositionalEmbedding`` (its
  ``get_embedding``, ``forward``, ``make_positions``, ``make_grid2d``, ``make_grid2d_like``).
* ``ldm/modules/diffusionmodules/openaimodel.py``: ``UNetModelPatch.forward``, the code that builds
  the grid, crops it to each sample's box and resizes it to the latent size.

openaimodel.py imports modules this computation does not use; they are replaced by stubs in
``sys.modules`` while it is loaded (and removed afterwards): ``ldm``, ``ldm.modules``,
``ldm.modules.diffusionmodules`` (empty packages), ``ldm.modules.diffusionmodules.util`` (the seven
imported names; ``timestep_embedding`` returns zeros), ``ldm.modules.attention``
(``SpatialTransformer``), and ``einops`` / ``pydantic`` only when they are not installed.
``ldm.modules.diffusionmodules.positional_encoding`` is the official file itself.

How the map is obtained from the official code: ``UNetModelPatch.forward`` is called unbound on a
stand-in ``self`` that holds the official ``SinusoidalPositionalEmbedding(embedding_dim=160,
padding_idx=0, init_size=128, div_half_dim=False, center_shift=100)`` (the UNetModelPatch
arguments of ``configs/stable-diffusion/v1-inference_patch.yaml``; model_channels 320) and the
official ``init_size`` / ``interpolation_mode``, and whose UNet blocks are trivial: the first input
block returns zeros, the middle block and ``out`` return their input, there are no output blocks.
The official ``h = input_blocks[0](...); h += head_grid`` therefore returns exactly the map F(v)
(``head_grid``) that the official UNet adds, for the given latent size and ``crop_boxes``.

Contents (every value float32 from the official code, sums in float64 over the whole tensor):

* ``grid``: the full [1, 320, 128, 128] grid (``head_position_encode(ones[1, 4, 128, 128])``, as
  ``forward`` builds it) at chosen (channel, row, col) points, plus sum and sum of squares.
* ``crops``: ``forward`` on a [3, 4, 64, 64] latent with three official boxes ``[y1, x1, y2, x2]``
  (grid units; the official ``crop_boxes`` of ``ldm/data/personalized.py``), in the official
  bilinear mode and the nearest mode: points and sums of each sample's [320, 64, 64] map.
* ``whole``: ``forward`` with ``crop_boxes=None`` on a [1, 4, 96, 128] latent (a 768 x 1024 image):
  points and sums, both modes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import types
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "sine_positional_reference.json"
REPO = "zhang-zx/SINE"
KNOWN_COMMIT = "c0df9502b622fe36823ccf3622c8df381e801dd8"
PE_FILE = "ldm/modules/diffusionmodules/positional_encoding.py"
UNET_FILE = "ldm/modules/diffusionmodules/openaimodel.py"
CONFIG = {"model_channels": 320, "padding_idx": 0, "init_size": 128, "div_half_dim": False, "center_shift": 100,
          "in_channels": 4, "source": "configs/stable-diffusion/v1-inference_patch.yaml (interpolation_mode "
                                      "bilinear); v1-inference_patch_nearest_interp.yaml (nearest)"}
MODES = ("bilinear", "nearest")

# (channel, row, col) in the 128 x 128 grid: corners, x-sin (0..79), x-cos (80..159), y-sin (160..239),
# y-cos (240..319).
GRID_POINTS = [(0, 0, 0), (0, 127, 127), (1, 5, 100), (79, 64, 1), (80, 3, 0), (100, 77, 33), (159, 127, 0),
               (160, 0, 0), (161, 100, 50), (239, 12, 127), (240, 0, 64), (300, 127, 5), (319, 127, 127)]
# Official boxes [y1, x1, y2, x2]: the full grid, the right half, an odd 12 x 37 box.
BOXES = [[0, 0, 128, 128], [0, 64, 128, 128], [101, 5, 113, 42]]
CROP_LATENT = (64, 64)
CROP_POINTS = [(0, 0, 0), (0, 63, 63), (5, 31, 17), (80, 10, 50), (123, 32, 32), (159, 63, 0), (160, 0, 63),
               (200, 40, 22), (240, 63, 63), (319, 7, 3)]
WHOLE_LATENT = (96, 128)
WHOLE_POINTS = [(0, 0, 0), (0, 95, 127), (7, 50, 3), (80, 95, 64), (159, 12, 127), (160, 0, 0), (160, 95, 0),
                (181, 47, 90), (239, 33, 33), (240, 95, 127), (270, 60, 10), (319, 95, 0)]


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _package(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []
    return mod


def _unused(*_a, **_k):
    raise RuntimeError("stub of an official import that the positional map does not use")


@contextmanager
def official_modules(folder: Path):
    """Yields (positional_encoding, openaimodel), the official files loaded by path with stubs around them."""
    util = types.ModuleType("ldm.modules.diffusionmodules.util")
    for name in ("checkpoint", "conv_nd", "linear", "avg_pool_nd", "zero_module", "normalization"):
        setattr(util, name, _unused)
    util.timestep_embedding = lambda t, dim, repeat_only=False: torch.zeros(len(t), dim)
    attention = types.ModuleType("ldm.modules.attention")
    attention.SpatialTransformer = type("SpatialTransformer", (), {"__init__": _unused})
    stubs = {"ldm": _package("ldm"), "ldm.modules": _package("ldm.modules"),
             "ldm.modules.diffusionmodules": _package("ldm.modules.diffusionmodules"),
             "ldm.modules.diffusionmodules.util": util, "ldm.modules.attention": attention}
    try:
        import einops  # noqa: F401
    except ImportError:
        stubs["einops"] = types.ModuleType("einops")
        stubs["einops"].rearrange = stubs["einops"].repeat = _unused
    try:
        import pydantic  # noqa: F401
    except ImportError:
        stubs["pydantic"] = types.ModuleType("pydantic")
        for name, t in (("StrictInt", int), ("StrictFloat", float), ("StrictBool", bool), ("StrictStr", str)):
            setattr(stubs["pydantic"], name, t)
    names = list(stubs) + ["ldm.modules.diffusionmodules.positional_encoding", "sine_official_openaimodel"]
    saved = {n: sys.modules[n] for n in names if n in sys.modules}
    sys.modules.update(stubs)
    try:
        pe = _load("ldm.modules.diffusionmodules.positional_encoding", folder / PE_FILE)
        unet = _load("sine_official_openaimodel", folder / UNET_FILE)
        yield pe, unet
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def official_map(pe, unet, latent: tuple[int, int], boxes: list[list[int]] | None, mode: str) -> torch.Tensor:
    """The official ``head_grid`` that ``UNetModelPatch.forward`` adds after input_blocks[0]."""
    c = CONFIG["model_channels"]
    spe = pe.SinusoidalPositionalEmbedding(embedding_dim=c // 2, padding_idx=CONFIG["padding_idx"],
                                           init_size=CONFIG["init_size"], div_half_dim=CONFIG["div_half_dim"],
                                           center_shift=CONFIG["center_shift"])
    b = 1 if boxes is None else len(boxes)
    h, w = latent
    fake = SimpleNamespace(
        num_classes=None, model_channels=c, dtype=torch.float32, predict_codebook_ids=False,
        head_position_encode=spe, init_size=CONFIG["init_size"], interpolation_mode=mode,
        time_embed=lambda e: e,
        input_blocks=[lambda x, emb, ctx: torch.zeros(x.shape[0], c, x.shape[2], x.shape[3])],
        middle_block=lambda x, emb, ctx: x, output_blocks=[], out=lambda x: x)
    x = torch.zeros(b, CONFIG["in_channels"], h, w)
    crop = None if boxes is None else torch.tensor(boxes, dtype=torch.long)
    with torch.no_grad():
        return unet.UNetModelPatch.forward(fake, x, timesteps=torch.zeros(b), context=None, crop_boxes=crop)


def official_grid(pe) -> torch.Tensor:
    """The full grid as ``forward`` makes it: ``head_position_encode(ones[B, 4, init, init])``."""
    c, n = CONFIG["model_channels"], CONFIG["init_size"]
    spe = pe.SinusoidalPositionalEmbedding(embedding_dim=c // 2, padding_idx=CONFIG["padding_idx"], init_size=n,
                                           div_half_dim=CONFIG["div_half_dim"], center_shift=CONFIG["center_shift"])
    with torch.no_grad():
        return spe(torch.ones([1, CONFIG["in_channels"], n, n], dtype=torch.float32))


def summary(t: torch.Tensor, points) -> dict:
    """t [C, H, W]: values at points, float64 sum and sum of squares, shape."""
    d = t.detach().to(torch.float64)
    return {"shape": list(t.shape), "points": [[c, r, k, float(t[c, r, k])] for c, r, k in points],
            "sum": float(d.sum()), "sumsq": float((d * d).sum())}


def commit_of(path: Path, bare: bool) -> str:
    cmd = ["git", f"--git-dir={path}"] if bare else ["git", "-C", str(path)]
    try:
        return subprocess.run(cmd + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{KNOWN_COMMIT} (not checked: the folder is not a git checkout)"


def extract(git_dir: Path, dest: Path) -> None:
    for f in (PE_FILE, UNET_FILE):
        text = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{f}"], capture_output=True, text=True,
                              check=True).stdout
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        (dest / f).write_text(text)


def compute_from(folder: Path, commit: str) -> dict:
    with official_modules(folder) as (pe, unet):
        grid = official_grid(pe)
        crops = {m: official_map(pe, unet, CROP_LATENT, BOXES, m) for m in MODES}
        whole = {m: official_map(pe, unet, WHOLE_LATENT, None, m) for m in MODES}
    assert grid.shape == (1, CONFIG["model_channels"], CONFIG["init_size"], CONFIG["init_size"]), grid.shape
    return {
        "source": (f"computed by tests/reference/make_sine_positional_reference.py from the official code of "
                   f"{REPO} at {commit} (torch {torch.__version__}, numpy {np.__version__}, CPU float32): "
                   f"SinusoidalPositionalEmbedding of {PE_FILE} and UNetModelPatch.forward of {UNET_FILE}, "
                   f"called on a stand-in UNet whose blocks are trivial so that forward returns head_grid"),
        "official": {"repo": REPO, "commit": commit, "files": [PE_FILE, UNET_FILE],
                     "functions": ["SinusoidalPositionalEmbedding.get_embedding", "SinusoidalPositionalEmbedding.forward",
                                   "SinusoidalPositionalEmbedding.make_positions",
                                   "SinusoidalPositionalEmbedding.make_grid2d",
                                   "SinusoidalPositionalEmbedding.make_grid2d_like", "UNetModelPatch.forward"],
                     "config": CONFIG},
        "box_convention": ("official crop_boxes are [y1, x1, y2, x2] in 128-grid units (ldm/data/personalized.py: "
                           "[crop_y, crop_x, crop_y + patch_size_y, crop_x + patch_size_x]), sliced as "
                           "grid[:, :, y1:y2, x1:x2]; points are (channel, row, col, value)"),
        "grid": summary(grid[0], GRID_POINTS),
        "crops": {"latent": list(CROP_LATENT), "boxes_official": BOXES,
                  "modes": {m: [summary(crops[m][i], CROP_POINTS) for i in range(len(BOXES))] for m in MODES}},
        "whole": {"latent": list(WHOLE_LATENT), "image": [WHOLE_LATENT[0] * 8, WHOLE_LATENT[1] * 8],
                  "modes": {m: summary(whole[m][0], WHOLE_POINTS) for m in MODES}},
    }


def compute(official: Path, commit: str | None = None) -> dict:
    bare = not (official / "ldm").is_dir() and (official / "HEAD").is_file()
    commit = commit or commit_of(official, bare)
    if not bare:
        return compute_from(official, commit)
    with tempfile.TemporaryDirectory(prefix="sine_official_") as tmp:
        extract(official, Path(tmp))
        return compute_from(Path(tmp), commit)


def differences(new, old, path="") -> list[str]:
    if isinstance(new, dict) and isinstance(old, dict):
        out = [f"{path}/{k}: only in one" for k in set(new) ^ set(old)]
        for k in set(new) & set(old):
            out += differences(new[k], old[k], f"{path}/{k}")
        return out
    if isinstance(new, list) and isinstance(old, list):
        if len(new) != len(old):
            return [f"{path}: length {len(new)} != {len(old)}"]
        return [d for i, (a, b) in enumerate(zip(new, old)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(new, float) and isinstance(old, float):
        return [] if new == old or abs(new - old) <= 1e-12 * abs(old) else [f"{path}: {new!r} != {old!r}"]
    return [] if new == old else [f"{path}: {new!r} != {old!r}"]


def load_reference(path: Path = OUT) -> dict:
    return json.loads(path.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("official", type=Path, help="checkout of zhang-zx/SINE (folder with ldm/) or its bare git dir")
    ap.add_argument("--commit", help="commit to record when OFFICIAL is an extracted copy, not a git checkout")
    ap.add_argument("--check", action="store_true", help="compare with the stored file instead of writing it")
    args = ap.parse_args()
    ref = compute(args.official.resolve(), args.commit)
    if args.check:
        diffs = [d for d in differences(ref, load_reference()) if not d.startswith("/source")]
        print("\n".join(diffs) if diffs else f"{OUT.name}: every number reproduced by the official code")
        return 1 if diffs else 0
    OUT.write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
