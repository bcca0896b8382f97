"""SinDDM (Kulikov et al., ICML 2023): a diffusion model trained on a single image.

Public API::

    from core.sinddm import build_pyramid, train, TrainConfig, NetConfig, SinDDM, sample, save, load

    pyr = build_pyramid(Image.open("image.png"))
    result = train(pyr, NetConfig(width=160), TrainConfig(steps=120_000), device="cuda")
    model = SinDDM.create(result.net, pyr, result.info())
    images = sample(model, count=4, seed=0, scale_mul=(1.0, 2.0))   # [4, 3, H, 2W] in [0, 1]

Command line: ``python -m core.sinddm demo`` (see ``--help``).
"""

from ..fit import Interrupted
from .artifact import SinDDM, load, save
from .edit import edit_training_image, harmonize, style_transfer
from .guidance import Guidance, ROIGuidance
from .model import NetConfig, SinDDMNet
from .pyramid import Pyramid, PyramidSpec, build_pyramid
from .sample import inject, output_sizes, resume, sample
from .schedule import MultiScaleSchedule
from .train import TrainConfig, TrainResult, train

__all__ = [
    "SinDDM", "load", "save", "edit_training_image", "harmonize", "style_transfer", "Guidance", "ROIGuidance",
    "NetConfig", "SinDDMNet",
    "Pyramid", "PyramidSpec", "build_pyramid", "inject", "output_sizes", "resume", "sample", "MultiScaleSchedule",
    "Interrupted", "TrainConfig", "TrainResult", "train",
]
