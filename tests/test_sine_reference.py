"""SINE's positional map F(v) against numbers computed by the OFFICIAL code.

tests/data/sine_positional_reference.json was written by
tests/reference/make_sine_positional_reference.py, which imported
``ldm/modules/diffusionmodules/positional_encoding.py`` (``SinusoidalPositionalEmbedding``) and
``ldm/modules/diffusionmodules/openaimodel.py`` (``UNetModelPatch.forward``) of zhang-zx/SINE at
c0df950 and recorded the map that forward adds after ``input_blocks[0]``: the full 320 x 128 x 128
grid, three crop boxes resized to a 64 x 64 latent, and the whole grid resized to a 96 x 128 latent
(a 768 x 1024 image), in the bilinear (align_corners=True) and nearest modes.  Here
``core.sine.positional`` must give every recorded value and checksum.

Box conventions: the official ``crop_boxes`` are ``[y1, x1, y2, x2]`` (slices ``y1:y2, x1:x2`` of the
grid); ours (core.seam.Features.crop_box, core.sine.positional) are ``(top, left, height, width)``,
so the official box maps to ``(y1, x1, y2 - y1, x2 - x1)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference.make_sine_positional_reference import OUT, load_reference

from core.sine.positional import PositionalMap, crop_map, positional_grid, whole_map

REF = load_reference(OUT)
ATOL = 1e-5
SUM_RTOL = 1e-6
MODES = ("bilinear", "nearest")


def ours_box(official: list[int]) -> list[int]:
    y1, x1, y2, x2 = official
    return [y1, x1, y2 - y1, x2 - x1]


def check(t: torch.Tensor, ref: dict, what: str) -> None:
    """t [C, H, W] against a recorded summary: shape, every point, float64 sum and sum of squares."""
    assert list(t.shape) == ref["shape"], what
    for c, r, k, v in ref["points"]:
        assert abs(float(t[c, r, k]) - v) <= ATOL, f"{what}: (c={c}, row={r}, col={k}) ours {float(t[c, r, k])!r}, official {v!r}"
    d = t.detach().to(torch.float64)
    assert float(d.sum()) == pytest.approx(ref["sum"], rel=SUM_RTOL, abs=1e-6), f"{what}: sum"
    assert float((d * d).sum()) == pytest.approx(ref["sumsq"], rel=SUM_RTOL), f"{what}: sum of squares"


def test_reference_provenance():
    off = REF["official"]
    assert off["repo"] == "zhang-zx/SINE"
    assert off["commit"].startswith("c0df9502b622fe36823ccf3622c8df381e801dd8")
    assert off["config"]["model_channels"] == 320 and off["config"]["init_size"] == 128
    assert "UNetModelPatch.forward" in off["functions"]


def test_full_grid_matches_official():
    grid = positional_grid()
    assert grid.shape == (1, 320, 128, 128) and grid.dtype == torch.float32
    check(grid[0], REF["grid"], "grid")


@pytest.mark.parametrize("mode", MODES)
def test_crop_maps_match_official(mode):
    crops = REF["crops"]
    boxes = torch.tensor([ours_box(b) for b in crops["boxes_official"]])
    size = tuple(crops["latent"])
    maps = crop_map(positional_grid(), boxes, size, mode)
    via_features = PositionalMap(mode=mode)(torch.zeros(len(boxes), 320, *size), boxes)
    for i, (box, ref) in enumerate(zip(crops["boxes_official"], crops["modes"][mode])):
        check(maps[i], ref, f"crop_map {mode} official box {box}")
        check(via_features[i], ref, f"PositionalMap {mode} official box {box}")


@pytest.mark.parametrize("mode", MODES)
def test_whole_map_matches_official(mode):
    whole = REF["whole"]
    size = tuple(whole["latent"])
    assert whole["image"] == [768, 1024] and size == (96, 128)
    check(whole_map(positional_grid(), size, mode)[0], whole["modes"][mode], f"whole_map {mode}")
    check(PositionalMap(mode=mode)(torch.zeros(1, 320, *size))[0], whole["modes"][mode], f"PositionalMap {mode}")


def test_whole_map_is_the_grid_resized_not_tiled():
    grid = positional_grid()
    ours = whole_map(grid, (96, 128))
    assert torch.equal(ours, F.interpolate(grid, (96, 128), mode="bilinear", align_corners=True))
    # Tiling the 128-cell grid over the 96 x 128 latent would keep rows 1..96 (and repeat them beyond 128).
    tiled = grid.repeat(1, 1, 2, 2)[:, :, :96, :128]
    assert (ours - tiled)[:, 160:].abs().max() > 0.5
    # Resized: the last latent row is grid position 128 (the image's bottom edge), the first is position 1.
    assert torch.allclose(ours[:, 160:, -1], grid[:, 160:, -1], atol=ATOL)  # float32 weights: ~7e-6
    assert torch.allclose(ours[:, 160:, 0], grid[:, 160:, 0], atol=1e-6)
    assert not torch.allclose(ours[:, 160:, -1], tiled[:, 160:, -1], atol=1e-3)
    # The width is already 128 cells, so the x half (a function of the column only) is the grid's own.
    assert torch.allclose(ours[:, :160], grid[:, :160, :96], atol=1e-6)
    # Larger than the grid: still one stretched copy, not 2 x 2 tiles.
    big = whole_map(grid, (192, 256))
    assert torch.equal(big, F.interpolate(grid, (192, 256), mode="bilinear", align_corners=True))
    assert (big - grid.repeat(1, 1, 2, 2)[:, :, :192, :256]).abs().max() > 0.5
