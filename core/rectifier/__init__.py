"""The High-Fidelity rectifier (Hou, Wei, Chen, AAAI 2024): a hypernetwork that modulates the
denoiser's middle and up-block conv kernels at every step, theta_hat = theta (1 + Delta).

* :mod:`.layers`: which kernels are modulated;
* :mod:`.hypernet`: R(x_0, P_t, t) (ResNet-34 encoder, one separable branch per layer);
* :mod:`.modulation`: per-sample theta (1 + A C) through the engine's output-side modulation;
* :mod:`.sample`: the rectified model, DDPM / SDEdit / DDIM sampling and inversion;
* :mod:`.train`: reconstruction (eq. 3) and editing (Alg. 1) training, DDP-ready;
* :mod:`.clip_direction`: the directional CLIP loss (eq. 4);
* :mod:`.metrics`: L1, L2, SSIM (Table 1);
* :mod:`.artifact`: the ``sie.rectifier`` file.
"""

from .artifact import RectifierInfo, check_fits, load_rectifier, save_rectifier
from .hypernet import Rectifier, RectifierConfig, load_encoder_weights
from .layers import LayerSpec, layout, modulated_layers
from .modulation import SeparableModulation, modulation_functions
from .sample import Rectified, ddim_invert, ddim_sample, ddpm_sample, invert_and_sample, rectified
from .train import TrainConfig, train_rectifier


def new_rectifier(params, channels: int, **kw) -> Rectifier:
    """A fresh (Delta = 0) rectifier for a denoiser with canonical parameters ``params``."""
    return Rectifier(RectifierConfig(tuple(modulated_layers(params)), channels, **kw))


__all__ = [
    "LayerSpec", "Rectified", "Rectifier", "RectifierConfig", "RectifierInfo", "SeparableModulation",
    "TrainConfig", "check_fits", "ddim_invert", "ddim_sample", "ddpm_sample", "invert_and_sample", "layout",
    "load_encoder_weights",
    "load_rectifier", "modulated_layers", "modulation_functions", "new_rectifier", "rectified",
    "save_rectifier", "train_rectifier",
]
