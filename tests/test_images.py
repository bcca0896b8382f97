"""The one tensor <-> PIL conversion (core/images.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.images import pil_to_tensor, tensor_to_pil


def test_round_trip_is_exact_and_rounds_to_nearest():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = pil_to_tensor(Image.fromarray(arr))
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(arr.astype(np.float32) / 255).permute(2, 0, 1))
    assert np.array_equal(np.asarray(tensor_to_pil(x)), arr)
    assert np.array_equal(np.asarray(tensor_to_pil(x[None])), arr)  # [1, 3, H, W]
    # rounding to nearest, clamping outside [0, 1]
    y = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 1.0, -0.5, 2.0]).reshape(1, 1, 6).expand(3, 1, 6)
    assert np.asarray(tensor_to_pil(y))[0, :, 0].tolist() == [0, 0, 1, 255, 0, 255]


def test_modes_and_shapes():
    assert pil_to_tensor(Image.new("L", (4, 2), 255)).shape == (3, 2, 4)
    assert tensor_to_pil(torch.zeros(3, 2, 4)).mode == "RGB"
    with pytest.raises(ValueError, match="batch of 2"):
        tensor_to_pil(torch.zeros(2, 3, 2, 4))
    with pytest.raises(ValueError, match="RGB"):
        tensor_to_pil(torch.zeros(1, 2, 4))


def test_one_helper_everywhere():
    """The old per-module copies are gone; their users call core.images."""
    import core.imagic.pipeline as pipeline
    import core.plot as plot
    import core.sinddm.pyramid as pyramid

    assert not hasattr(pipeline, "to_pil") and not hasattr(pyramid, "image_to_pil")
    assert plot.tensor_to_pil is tensor_to_pil and pyramid.tensor_to_pil is tensor_to_pil
