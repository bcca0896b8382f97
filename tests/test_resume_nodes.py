"""The training nodes' checkpoint_every / resume_from / preview_every inputs (issue 22), called directly (no
server): a cancelled SinDDM: Train keeps its steps in the checkpoints folder and says which file to pick; resuming
from it in a second run gives the uninterrupted run's model; a checkpoint of another run or a broken file is
refused naming resume_from; the shared training nodes hand the recipe the plan and the previews, which decode
x0_hat with the VAE and show it on the node.  The same through a real ComfyUI (interrupt, then a second prompt):
tests/integration/test_resume_comfy.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_sinddm_nodes import comfy_image
from test_sine_nodes import SD15, fake_model
from test_training_nodes import ToyRecipe, bridged  # noqa: F401  (the fixture)

from helpers import load_pack

PACK = load_pack()
N = PACK.NODE_CLASS_MAPPINGS
bridge = sys.modules[PACK.__name__ + ".nodes.comfy_bridge"]
resume = sys.modules[PACK.__name__ + ".nodes.resume"]
NodeInputError = sys.modules[PACK.__name__ + ".nodes.common"].NodeInputError
Plan = sys.modules[PACK.__name__ + ".core.checkpoint"].Plan


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """The registered checkpoints folder, here a temporary one (listing and paths as ComfyUI's folder_paths)."""
    root = tmp_path / "checkpoints"
    real = bridge.default_dir
    monkeypatch.setattr(bridge, "default_dir", lambda name: root if name == resume.FOLDER else real(name))
    monkeypatch.setattr(bridge, "list_models", lambda name: sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")) if name == resume.FOLDER else [])

    def model_path(name, file_name):
        p = root / file_name
        if not p.is_file():
            raise FileNotFoundError(f"'{file_name}' is not in the {name} folders ({root})")
        return str(p)

    monkeypatch.setattr(bridge, "model_path", model_path)
    return root


class StopAt:
    """A progress bar whose user presses Cancel after step ``at`` (ComfyUI's interrupt raises in the callback)."""

    texts: list[str] = []

    def __init__(self, at: int | None):
        self.at = at

    def step(self, i, total=None, info=None):
        if self.at is not None and i == self.at:
            raise KeyboardInterrupt("cancelled")

    def text(self, text):
        StopAt.texts.append(text)

    def should_stop(self):
        return False


def sinddm_train(steps=6, seed=0, **kw):
    model, curve = N["SIE_SinDDMTrain"].execute(comfy_image(), steps=steps, batch_size=2, width=16, learning_rate=1e-3,
                                                seed=seed, preview_every=0, precision="fp32", **kw)
    return model, curve


def cancelled_progress(monkeypatch, at):
    """Progress bars whose user presses Cancel after step ``at`` (None: never)."""
    stop = StopAt(at)

    class P:
        def __init__(self, steps):
            pass

        __call__ = staticmethod(stop.step)
        should_stop = staticmethod(stop.should_stop)
        text = staticmethod(stop.text)

    monkeypatch.setattr(bridge, "Progress", P)


def test_a_cancelled_sinddm_run_resumes_from_the_node_to_the_uninterrupted_model(folder, monkeypatch):
    whole, whole_curve = sinddm_train()
    assert not folder.exists() or not any(folder.rglob("*.safetensors"))  # checkpoint_every 0: nothing written
    cancelled_progress(monkeypatch, 3)
    StopAt.texts.clear()
    with pytest.raises(KeyboardInterrupt):
        sinddm_train()
    (kept,) = folder.rglob("*.safetensors")
    name = kept.relative_to(folder).as_posix()
    assert name.startswith("sinddm/sinddm_train_") and name.endswith("_step0000003.safetensors")
    assert StopAt.texts and name in StopAt.texts[-1] and "resume_from" in StopAt.texts[-1]
    choices = N["SIE_SinDDMTrain"].INPUT_TYPES()["optional"]["resume_from"][1]["options"]
    assert choices == ["none", name]
    assert N["SIE_FineTune"].INPUT_TYPES()["optional"]["resume_from"][1]["options"] == ["none"]  # not its stage
    cancelled_progress(monkeypatch, None)
    resumed, resumed_curve = sinddm_train(resume_from=name)
    for (k, a), (_, b) in zip(whole.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(whole_curve, resumed_curve)  # the same losses, the first three from the checkpoint
    with pytest.raises(NodeInputError, match=r"seed") as e:  # another run's checkpoint
        sinddm_train(seed=1, resume_from=name)
    assert e.value.input_name == "resume_from"


def test_checkpoints_every_n_steps_keep_the_newest_two_of_the_run(folder):
    sinddm_train(checkpoint_every=2)
    names = sorted(p.name for p in folder.rglob("*.safetensors"))
    assert len(names) == 2 and names[0].endswith("_step0000004.safetensors") and names[1].endswith("06.safetensors")
    assert names[0].split("_step")[0] == names[1].split("_step")[0]


def test_a_broken_or_missing_checkpoint_is_refused_naming_resume_from(folder):
    bad = folder / "sinddm" / "sinddm_train_0123abcd_step0000002.safetensors"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a safetensors file")
    for name, match in [(bad.relative_to(folder).as_posix(), "not a readable"), ("sinddm/gone.safetensors", "gone")]:
        with pytest.raises(NodeInputError, match=match) as e:
            sinddm_train(resume_from=name)
        assert e.value.input_name == "resume_from"
    with pytest.raises(NodeInputError) as e:
        sinddm_train(checkpoint_every=-1)
    assert e.value.input_name == "checkpoint_every"


def test_the_shared_training_nodes_hand_the_recipe_a_plan_and_vae_decoded_previews(bridged, folder, monkeypatch):
    shown = []

    class P:
        def __init__(self, steps):
            pass

        def __call__(self, *a):
            pass

        def show(self, image):
            shown.append(image)

        def should_stop(self):
            return False

    monkeypatch.setattr(bridge, "Progress", P)
    decoded = []

    def decode(x0):  # the VAE: [k, 4, h, w] -> [k, 3, 8h, 8w]
        decoded.append(x0)
        return torch.nn.functional.interpolate(x0[:, :3].sigmoid(), scale_factor=8)

    monkeypatch.setattr(bridge, "ComfySD", lambda model, clip=None, vae=None: SimpleNamespace(
        context_dim=768, pooled_dim=0, model=model, clip=clip, vae=vae, decode=decode))
    model, image, cond = fake_model(SD15), torch.rand(1, 64, 48, 3), [[torch.randn(1, 77, 768), {}]]
    kept = folder / "toy" / "toy_finetune_0123abcd_step0000010.safetensors"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"x")
    toy = ToyRecipe()
    N["SIE_FineTune"].execute(model, "vae", image, cond, "lora", 20, 0.0, 4, 0, toy, None, torch.ones(1, 64, 48),
                              checkpoint_every=5, resume_from="toy/" + kept.name, preview_every=3)
    r = toy.seen[-1][1]
    assert r.checkpoints == Plan(folder / "toy", 5, resume.KEEP, kept, identify=True)
    assert r.previews.every == 3 and r.previews.timesteps == (250, 500, 750)
    x0 = torch.randn(3, 4, 8, 6)
    r.previews.show(3, x0)
    assert torch.equal(decoded[0], x0) and shown[0].shape == (3, 64, 3 * 48)  # three estimates side by side
    N["SIE_OptimizeEmbedding"].execute(model, "vae", image, cond, 3, 1e-3, 0, None, None, toy)
    r = toy.seen[-1][1]
    assert r.previews is None and r.checkpoints == Plan(folder / "toy", 0, resume.KEEP, None, identify=True)
    assert N["SIE_FineTune"].INPUT_TYPES()["optional"]["resume_from"][1]["options"] == ["none",
                                                                                        "toy/" + kept.name]
    assert N["SIE_OptimizeEmbedding"].INPUT_TYPES()["optional"]["resume_from"][1]["options"] == ["none"]


def test_resume_lists_only_checkpoint_names_of_the_nodes_methods_and_stages(folder):
    for name in ["imagic/imagic_embedding_0123abcd_step0000100.safetensors",
                 "sine/sine_finetune_89abcdef_step0000200.safetensors",
                 "rectifier/rectifier_recon_00000000_step0000500.safetensors",
                 "other/model.safetensors", "imagic/imagic_embedding_step0000100.safetensors"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    assert resume.resume_choices(None, ["embedding"]) == ["none",
                                                         "imagic/imagic_embedding_0123abcd_step0000100.safetensors"]
    assert resume.resume_choices(None, ["finetune"])[1:] == ["sine/sine_finetune_89abcdef_step0000200.safetensors"]
    assert resume.resume_choices(["rectifier"])[1:] == ["rectifier/rectifier_recon_00000000_step0000500.safetensors"]
    assert resume.resume_choices(["sinddm"]) == ["none"]
    assert Path(resume.plan("imagic", 0, "none", None).folder) == folder / "imagic"


def test_a_trainers_preview_replaces_the_loss_curve_on_the_node(monkeypatch):
    monkeypatch.setattr(bridge, "_progress_text", lambda text: None)
    sent = []
    progress = bridge.Progress(10)
    progress._bar = SimpleNamespace(update_absolute=lambda i, n, preview: sent.append((i, preview)))  # in a server
    progress.CURVE_EVERY = 0.0
    progress(1, 10, {"loss": 1.0})
    progress(2, 10, {"loss": 0.5})
    assert sent[-1][1][0] == "JPEG" and sent[-1][1][1].size == (480, 240)  # the loss curve
    progress.show(torch.rand(3, 16, 48))
    assert sent[-1][0] == 2 and sent[-1][1][1].size == (48, 16) and sent[-1][1][2] == 512
    progress(3, 10, {"loss": 0.25})
    assert sent[-1] == (3, None)  # the preview stays: no curve over it
