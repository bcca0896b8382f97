"""Checkpoints, resume and previews for the training nodes (Optimize Text Embedding, Fine-Tune Model, Train
Rectifier, SinDDM: Train).

Each training node appends three optional inputs (optional, so that API prompts written before them keep
validating):

* ``checkpoint_every``: write the run's state every N steps (0: only when the run is cancelled or fails);
* ``resume_from``: a checkpoint of the same run to continue, listed from ComfyUI's
  ``models/single_image_edit/checkpoints/<method>/`` (the registered ``sie_checkpoints`` folder);
* ``preview_every`` (the latent methods): the model's one-step x0 of the training image every N steps,
  decoded by the VAE and shown as the node's preview (:mod:`core.previews`).

Checkpoints are named ``<method>_<stage>_<run>_stepNNNNNNN.safetensors``, ``<run>`` being 8 hex digits of
the run's identity (:func:`core.checkpoint.identity`: the image, the base model, the settings and the seed),
so the runs sharing the folder keep their own last :data:`KEEP` files, and a resumed run continues its own
series.  A cancelled run keeps its steps: the fit loop writes the file before ComfyUI reports the interrupt,
logs it, and hands it to the plan's ``on_kept``, which says on the node which file to pick in ``resume_from``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from comfy_api.latest import io

from ..core.checkpoint import Plan, ResumeError
from ..core.previews import Previews
from . import comfy_bridge as bridge
from .common import NodeInputError

FOLDER = "sie_checkpoints"
KEEP = 2  # the newest checkpoint and the one before it, per run
NONE = "none"


def checkpoint_inputs(methods: Iterable[str] | None, stages: Iterable[str] | None = None) -> list:
    """The appended ``checkpoint_every`` and ``resume_from`` inputs; ``resume_from`` lists the checkpoints of
    ``methods`` and ``stages`` (None: any) in the checkpoints folder."""
    return [
        io.Int.Input("checkpoint_every", default=0, min=0, max=1_000_000, optional=True,
                     tooltip="Write the training state every N steps into models/single_image_edit/checkpoints "
                             "(the trained weights, the optimiser, the step, the random generators; the last "
                             f"{KEEP} per run are kept). 0: only when the run is cancelled or fails. To continue "
                             "after a crash or a cancel, pick the file in resume_from and queue again."),
        io.Combo.Input("resume_from", options=resume_choices(methods, stages), default=NONE, optional=True,
                       tooltip="Continue a run from one of its checkpoints: the same image, model, settings and "
                               "seed, with steps set to the total wanted (the run goes on from the checkpoint's "
                               "step). none: start from the beginning. Refresh (r) to list new files."),
    ]


def preview_input() -> io.Int.Input:
    return io.Int.Input("preview_every", default=0, min=0, max=1_000_000, optional=True,
                        tooltip="Every N steps show the model's one-step estimate of the training image at t = "
                                "250, 500 and 750 (decoded by the VAE) as the node's preview: it sharpens as "
                                "training goes. Costs three UNet calls and a VAE decode each time; never changes "
                                "the result. 0: off (the loss curve is shown instead).")


def resume_choices(methods: Iterable[str] | None, stages: Iterable[str] | None = None) -> list[str]:
    """``none`` and the folder's checkpoints of ``methods`` and ``stages`` (None: any)."""
    def alternatives(names):
        return "|".join(map(re.escape, names)) if names is not None else r"[a-z0-9]+"

    name = re.compile(rf"(?:.*[/\\])?({alternatives(methods)})_({alternatives(stages)})_[0-9a-f]{{8}}"
                      r"_step\d+\.safetensors")
    return [NONE] + sorted(f for f in bridge.list_models(FOLDER) if name.fullmatch(f))


def plan(method: str, checkpoint_every, resume_from, progress: bridge.Progress) -> Plan:
    """The run's checkpoint plan from the node's inputs (always one: a cancelled run keeps its steps); when
    the run stops early, ``progress`` shows on the node which file holds its steps."""
    every = int(checkpoint_every or 0)
    if every < 0:
        raise NodeInputError("checkpoint_every", f"must be 0 (only on cancel) or more, got {every}",
                             "set it to 0, or to a number of steps")
    resume = None
    if resume_from not in (None, "", NONE):
        try:
            resume = Path(bridge.model_path(FOLDER, str(resume_from)))
        except FileNotFoundError as e:
            raise NodeInputError("resume_from", str(e), "refresh the node list (r) and pick a listed checkpoint, "
                                                        "or none") from None

    def kept(path: Path) -> None:
        progress.text(f"stopped: the steps done are kept in {path.parent.name}/{path.name}; pick it in "
                      "resume_from to continue")

    return Plan(bridge.default_dir(FOLDER) / method, every, KEEP, resume, identify=True,  # made when written
                on_kept=kept)


def previews(every, sd, progress: bridge.Progress) -> Previews | None:
    """The node's previews: each x0_hat [k, 4, h, w] decoded by ``sd``'s VAE and shown side by side."""
    every = int(every or 0)
    if every < 0:
        raise NodeInputError("preview_every", f"must be 0 (off) or more, got {every}", "set it to 0 or more")
    if every == 0:
        return None

    def show(step: int, x0: torch.Tensor) -> None:
        images = sd.decode(x0)  # [k, 3, H, W] in [0, 1]
        progress.show(torch.cat(list(images), dim=-1))  # [3, H, k * W]

    return Previews(every, show)


@contextmanager
def resume_errors() -> Iterator[None]:
    """A checkpoint the run refuses becomes an error naming ``resume_from``."""
    try:
        yield
    except ResumeError as e:
        raise NodeInputError("resume_from", str(e), "pick a checkpoint of this run (the same image, model, "
                                                    "settings and seed), or none") from None
