"""Checkpoints of the one fit loop (core.checkpoint, core.fit): N steps then a resume for M more equal N + M
uninterrupted, bit for bit on the CPU, however the first run stopped; foreign or broken files are refused."""

from __future__ import annotations

import json

import pytest
import torch

from core import checkpoint as ckpt
from core.checkpoint import Checkpointing, ResumeError, fingerprint
from core.fit import FitConfig, Interrupted, Term, fit

META = {"method": "toy", "stage": "fit", "config": {"lr": 0.05}, "fingerprint": "abc"}


class Toy:
    """Two trained tensors in two parameter groups, a loss with noise and a random index drawn per step from one
    generator, and an EMA kept beside them: everything a trainer's state can hold."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(1234)
        self.a = torch.randn(3, 4, requires_grad=True)
        self.b = torch.randn(4, requires_grad=True)
        self.target = torch.randn(5, 3, 4)
        self.gen = torch.Generator().manual_seed(seed)
        self.ema = torch.zeros(3, 4)

    def groups(self):
        return [{"params": [self.a], "lr": 0.05}, {"params": [self.b], "lr": 0.02}]

    def batches(self, step):
        i = int(torch.randint(0, 5, (), generator=self.gen))
        return self.target[i], torch.randn(3, 4, generator=self.gen)

    def terms(self):
        return [Term("fit", lambda b: ((self.a + self.b - b[0] + 0.1 * b[1]) ** 2).mean()),
                Term("l1", lambda b: self.a.abs().mean(), 0.1)]

    def after_step(self, step):
        with torch.no_grad():
            self.ema.mul_(0.9).add_(self.a.detach(), alpha=0.1)

    def extra(self):
        return (lambda: {"ema": self.ema}, lambda d: self.ema.copy_(d["ema"]))


def config(steps, schedule="step", in_backward=False):
    kw = {"decay_every": 3, "decay_gamma": 0.5} if schedule == "step" else {"milestones": (4, 7), "decay_gamma": 0.3}
    return FitConfig(steps=steps, lr=0.05, step_in_backward=in_backward, **kw)


def run(toy, steps, ck=None, schedule="step", in_backward=False, **kw):
    return fit(toy.groups(), toy.batches, toy.terms(), config(steps, schedule, in_backward),
               after_step=toy.after_step, checkpointing=ck, extra_state=toy.extra(), **kw)


def checkpointing(tmp_path, toy, **kw):
    return Checkpointing(tmp_path, "toy", META, rngs={"noise": toy.gen}, **kw)


def assert_same(toy_a, res_a, toy_b, res_b):
    assert torch.equal(toy_a.a, toy_b.a) and torch.equal(toy_a.b, toy_b.b) and torch.equal(toy_a.ema, toy_b.ema)
    assert res_a.losses == res_b.losses and res_a.terms == res_b.terms
    assert res_a.steps_done == res_b.steps_done


@pytest.mark.parametrize("in_backward", [False, True], ids=["step", "step_in_backward"])
@pytest.mark.parametrize("schedule", ["step", "milestones"])
def test_resume_equals_uninterrupted(tmp_path, schedule, in_backward):
    """Also with the optimiser step inside backward (full fine-tunes): after a resume it must take the learning
    rate the restored scheduler sets, not that of the parameter groups the optimiser had before loading."""
    whole = Toy()
    res_whole = run(whole, 10, schedule=schedule, in_backward=in_backward)
    first = Toy()
    res_first = run(first, 4, checkpointing(tmp_path, first, every=4), schedule=schedule, in_backward=in_backward)
    assert res_first.checkpoint == tmp_path / "toy_step0000004.safetensors"
    second = Toy()  # a new process: fresh tensors and generator, everything from the file
    res = run(second, 10, checkpointing(tmp_path, second, resume=res_first.checkpoint), schedule=schedule,
              in_backward=in_backward)
    assert res.resumed_from == 4
    assert_same(whole, res_whole, second, res)


def test_a_cancel_between_steps_keeps_the_steps_done(tmp_path):
    whole = Toy()
    res_whole = run(whole, 9)
    first = Toy()
    stop_at = {"calls": 0}

    def should_stop():
        stop_at["calls"] += 1
        return stop_at["calls"] > 5  # polled before each step: stops before step 6

    with pytest.raises(Interrupted):
        run(first, 9, checkpointing(tmp_path, first, every=0), should_stop=should_stop)
    (saved,) = list(tmp_path.iterdir())
    assert saved.name == "toy_step0000005.safetensors"
    second = Toy()
    res = run(second, 9, checkpointing(tmp_path, second, resume=saved))
    assert_same(whole, res_whole, second, res)


def test_a_failure_inside_a_step_saves_the_generators_as_before_that_step(tmp_path):
    """Step 6 draws its batch, then fails in the forward pass (a ComfyUI interrupt inside the model, out of
    memory): it did not count, so the checkpoint is step 5 with the generator as before step 6's draw."""
    whole = Toy()
    res_whole = run(whole, 8)
    first = Toy()
    calls = {"n": 0}
    terms = first.terms()

    def failing(b):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("stop")
        return terms[0].fn(b)

    with pytest.raises(KeyboardInterrupt):
        fit(first.groups(), first.batches, [Term("fit", failing), terms[1]], config(8),
            after_step=first.after_step, checkpointing=checkpointing(tmp_path, first), extra_state=first.extra())
    (saved,) = list(tmp_path.iterdir())
    assert saved.name == "toy_step0000005.safetensors"
    second = Toy()
    res = run(second, 8, checkpointing(tmp_path, second, resume=saved))
    assert_same(whole, res_whole, second, res)


def test_a_cancel_from_the_progress_callback_keeps_that_step(tmp_path):
    first = Toy()

    def on_step(i, n, info):
        if i == 3:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        run(first, 6, checkpointing(tmp_path, first), on_step=on_step)
    (saved,) = list(tmp_path.iterdir())
    assert saved.name == "toy_step0000003.safetensors"
    whole, second = Toy(), Toy()
    res_whole = run(whole, 6)
    assert_same(whole, res_whole, second, run(second, 6, checkpointing(tmp_path, second, resume=saved)))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    toy = Toy()
    run(toy, 10, checkpointing(tmp_path, toy, every=2, keep=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy_step0000008.safetensors", "toy_step0000010.safetensors"]


def test_a_failed_write_leaves_no_file_and_does_not_hide_the_cancel(tmp_path, monkeypatch):
    from core import artifact_io

    def broken(tensors, path, metadata=None):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"partial")
        tmp.unlink()  # what atomic_save_safetensors does on failure
        raise OSError("disk full")

    toy = Toy()
    monkeypatch.setattr(ckpt, "atomic_save_safetensors", broken)
    with pytest.raises(Interrupted):
        run(toy, 6, checkpointing(tmp_path, toy), should_stop=lambda: len(toy.ema.nonzero()) > 0)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(ckpt, "atomic_save_safetensors", artifact_io.atomic_save_safetensors)


def saved_checkpoint(tmp_path):
    toy = Toy()
    return run(toy, 3, checkpointing(tmp_path, toy, every=3)).checkpoint


@pytest.mark.parametrize("key,value,named", [("method", "other", "method"), ("stage", "embedding", "stage"),
                                             ("config", {"lr": 0.1}, "config.lr"),
                                             ("fingerprint", "def", "fingerprint")])
def test_a_checkpoint_of_another_run_is_refused_naming_the_difference(tmp_path, key, value, named):
    path = saved_checkpoint(tmp_path)
    toy = Toy()
    ck = Checkpointing(tmp_path, "toy", {**META, key: value}, rngs={"noise": toy.gen}, resume=path)
    with pytest.raises(ResumeError, match=rf"{path.name} is from another run: {named}:"):
        run(toy, 6, ck)


def test_broken_foreign_and_mismatched_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = saved_checkpoint(tmp_path)
    toy = Toy()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    foreign = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    for bad, message in ((truncated, "not a readable safetensors file"), (foreign, "not a training checkpoint"),
                         (tmp_path / "missing.safetensors", "no such checkpoint file")):
        with pytest.raises(ResumeError, match=message):
            run(toy, 6, checkpointing(tmp_path, toy, resume=bad))
    with pytest.raises(ResumeError, match="ask for more steps than 3"):
        run(Toy(), 2, checkpointing(tmp_path, toy, resume=path))
    other = Toy()
    other.a = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(ResumeError, match=r"trained tensor 0 has shape \(3, 4\), this run's \(2, 4\)"):
        run(other, 6, checkpointing(tmp_path, other, resume=path))


def test_the_file_is_safetensors_with_a_json_header(tmp_path):
    from safetensors import safe_open

    path = saved_checkpoint(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[ckpt.FORMAT])
        keys = set(f.keys())
    assert header["step"] == 3 and header["meta"] == META and header["rngs"] == ["noise"]
    assert {"param.0", "param.1", "opt.0.exp_avg", "opt.1.exp_avg_sq", "rng.noise", "extra.ema", "curve.total",
            "curve.fit", "curve.l1"} <= keys


def test_fingerprint_sees_names_shapes_and_values():
    w = {"x": torch.arange(10.0), "y": torch.ones(2, 3)}
    base = fingerprint(w.items())
    assert fingerprint(w.items()) == base
    assert fingerprint({"x": torch.arange(10.0), "z": torch.ones(2, 3)}.items()) != base
    assert fingerprint({"x": torch.arange(10.0), "y": torch.ones(3, 2)}.items()) != base
    assert fingerprint({"x": torch.arange(10.0) + 1, "y": torch.ones(2, 3)}.items()) != base


# --------------------------------------------------------------------------------------
# The trainers: each stage, N steps then a resume, equals N + M (tiny SD model, CPU)

@pytest.fixture(scope="module")
def tiny():
    from tiny_sd import tiny_sd_model

    model = tiny_sd_model(0)
    g = torch.Generator().manual_seed(5)
    latent = torch.randn(1, 4, 16, 16, generator=g)
    return model, latent, model.encode_text(["a photo of a dog"])


def stop_after(n):
    """should_stop for a run cancelled after n steps (polled before each step)."""
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > n

    return should_stop


def test_imagic_embedding_resumes_exactly(tiny, tmp_path):
    from core.checkpoint import Plan
    from core.imagic import EmbeddingConfig, optimize_embedding

    model, latent, e_tgt = tiny
    cfg = EmbeddingConfig(steps=7, lr=1e-2, seed=3)
    whole = optimize_embedding(model, latent, e_tgt, cfg)
    plan = Plan(tmp_path)
    with pytest.raises(Interrupted):
        optimize_embedding(model, latent, e_tgt, cfg, should_stop=stop_after(4), checkpoints=plan)
    (saved,) = list(tmp_path.iterdir())
    assert saved.name == "imagic_embedding_step0000004.safetensors"
    res = optimize_embedding(model, latent, e_tgt, cfg, checkpoints=Plan(tmp_path, resume=saved))
    assert torch.equal(res.e_opt, whole.e_opt) and res.losses == whole.losses
    with pytest.raises(ResumeError, match=r"config\.lr"):  # another learning rate
        optimize_embedding(model, latent, e_tgt, EmbeddingConfig(steps=7, lr=2e-2, seed=3),
                           checkpoints=Plan(tmp_path, resume=saved))
    with pytest.raises(ResumeError, match=r"config\.latent"):  # another image
        optimize_embedding(model, latent.flip(-1), e_tgt, cfg, checkpoints=Plan(tmp_path, resume=saved))


def test_runs_sharing_a_folder_keep_their_own_files_when_named_by_identity(tiny, tmp_path):
    """With identify (the nodes' shared checkpoints folder), a run's files carry a digest of its identity: the same
    for its resume, which continues the same series and prunes only it; another run's files are left alone."""
    from core.checkpoint import Plan
    from core.imagic import EmbeddingConfig, optimize_embedding

    model, latent, e_tgt = tiny
    cfg = EmbeddingConfig(steps=6, lr=1e-2, seed=3)
    optimize_embedding(model, latent, e_tgt, EmbeddingConfig(steps=4, lr=1e-2, seed=4),
                       checkpoints=Plan(tmp_path, every=2, keep=1, identify=True))
    (other,) = list(tmp_path.iterdir())  # another seed: another run
    with pytest.raises(Interrupted):
        optimize_embedding(model, latent, e_tgt, cfg, should_stop=stop_after(4),
                           checkpoints=Plan(tmp_path, every=2, keep=1, identify=True))
    (mine,) = [p for p in tmp_path.iterdir() if p != other]
    assert mine.name.startswith("imagic_embedding_") and mine.name.endswith("_step0000004.safetensors")
    assert mine.name[:-len("_step0000004.safetensors")] != other.name[:-len("_step0000004.safetensors")]
    optimize_embedding(model, latent, e_tgt, cfg, checkpoints=Plan(tmp_path, every=2, keep=1, resume=mine,
                                                                   identify=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, mine.name.replace("04.", "06.")])


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_imagic_finetune_resumes_exactly(tiny, tmp_path, mode):
    from core.checkpoint import Plan
    from core.imagic import FineTuneConfig, finetune
    from tiny_sd import tiny_sd_model

    model, latent, e_tgt = tiny
    cfg = FineTuneConfig(mode=mode, steps=6, lr=1e-3, seed=2)
    whole = finetune(model, latent, e_tgt, cfg)
    first = finetune(model, latent, e_tgt, FineTuneConfig(mode=mode, steps=3, lr=1e-3, seed=2),
                     checkpoints=Plan(tmp_path, every=3))
    assert first.checkpoint.name == "imagic_finetune_step0000003.safetensors"
    res = finetune(model, latent, e_tgt, cfg, checkpoints=Plan(tmp_path, resume=first.checkpoint))
    assert res.losses == whole.losses
    assert all(torch.equal(res.deltas[k], whole.deltas[k]) for k in whole.deltas)
    other = tiny_sd_model(1)  # the same architecture with other weights
    with pytest.raises(ResumeError, match="fingerprint"):
        finetune(other, latent, e_tgt, cfg, checkpoints=Plan(tmp_path, resume=first.checkpoint))


def test_the_imagic_cli_resumes_from_its_checkpoints(tmp_path):
    """python -m core.imagic with --checkpoint-every, then --resume with more fine-tune steps, gives the delta an
    uninterrupted run with those steps gives (a tiny SD single file; both stages continue from their files)."""
    import subprocess
    import sys

    from PIL import Image
    from safetensors.torch import load_file

    from helpers import ROOT
    from tiny_sd import build_tiny, write_config_dir, write_single_file

    unet, vae, text = build_tiny(0)
    configs = write_config_dir(tmp_path / "configs", unet, vae, text)
    ckpt_file = write_single_file(tmp_path / "tiny.safetensors", unet, vae, text)
    Image.new("RGB", (64, 64), (200, 120, 40)).save(tmp_path / "in.png")

    def cli(out: str, ft_steps: int, *extra: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "core.imagic", "--checkpoint", str(ckpt_file), "--config-dir", str(configs),
                "--image", str(tmp_path / "in.png"), "--prompt", "a dog", "--size", "64", "--emb-steps", "3",
                "--ft-steps", str(ft_steps), "--steps", "2", "--device", "cpu", "--out", str(tmp_path / out),
                "--save-delta", str(tmp_path / (out + ".safetensors")), *extra]
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc

    cli("whole.png", 5)
    cli("part.png", 3, "--checkpoint-every", "2", "--checkpoint-dir", str(tmp_path / "ck"))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "imagic_embedding_step0000002.safetensors", "imagic_embedding_step0000003.safetensors",
        "imagic_finetune_step0000002.safetensors", "imagic_finetune_step0000003.safetensors"]
    out = cli("resumed.png", 5, "--checkpoint-dir", str(tmp_path / "ck"), "--resume").stdout
    assert "stage 1 (embedding, 3 steps, continued from step 3)" in out, out
    assert "stage 2 (fine-tune, 5 steps, continued from step 3," in out, out
    whole, resumed = load_file(tmp_path / "whole.png.safetensors"), load_file(tmp_path / "resumed.png.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    proc = subprocess.run([sys.executable, "-m", "core.imagic", "--checkpoint", str(ckpt_file), "--config-dir",
                           str(configs), "--image", str(tmp_path / "in.png"), "--prompt", "a cat", "--size", "64",
                           "--emb-steps", "3", "--ft-steps", "5", "--device", "cpu", "--out", str(tmp_path / "x.png"),
                           "--checkpoint-dir", str(tmp_path / "ck"), "--resume"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2 and "is from another run: config.e_tgt" in proc.stderr, proc.stderr


def half_mask(size: int = 16) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[..., :, : size // 2] = 1
    return m


def test_layerdiffusion_embedding_resumes_exactly(tiny, tmp_path):
    from core.checkpoint import Plan
    from core.layerdiffusion import LayerEmbeddingConfig, optimize_layers

    model, latent, e_a = tiny
    e_b = model.encode_text(["a garden"])
    cfg = LayerEmbeddingConfig(steps=6, lr=1e-2, seed=4)
    whole = optimize_layers(model, latent, e_a, e_b, half_mask(), cfg)
    with pytest.raises(Interrupted):
        optimize_layers(model, latent, e_a, e_b, half_mask(), cfg, should_stop=stop_after(2),
                        checkpoints=Plan(tmp_path))
    (saved,) = list(tmp_path.iterdir())
    assert saved.name == "layerdiffusion_embedding_step0000002.safetensors"
    res = optimize_layers(model, latent, e_a, e_b, half_mask(), cfg, checkpoints=Plan(tmp_path, resume=saved))
    assert torch.equal(res.e_a, whole.e_a) and torch.equal(res.e_b, whole.e_b)
    assert res.losses == whole.losses and res.terms == whole.terms
    with pytest.raises(ResumeError, match=r"config\.mask"):  # another object mask
        optimize_layers(model, latent, e_a, e_b, 1 - half_mask(), cfg, checkpoints=Plan(tmp_path, resume=saved))


def test_layerdiffusion_finetune_resumes_exactly(tiny, tmp_path):
    from core.checkpoint import Plan
    from core.layerdiffusion import LayeredFineTuneConfig, finetune_layered

    model, latent, e_opt = tiny
    reference = latent.flip(-1)
    cfg = LayeredFineTuneConfig(steps=5, lr=1e-3, seed=1)
    whole = finetune_layered(model, latent, reference, e_opt, half_mask(), 1 - half_mask(), cfg)
    first = finetune_layered(model, latent, reference, e_opt, half_mask(), 1 - half_mask(),
                             LayeredFineTuneConfig(steps=2, lr=1e-3, seed=1), checkpoints=Plan(tmp_path, every=2))
    (saved,) = list(tmp_path.iterdir())
    assert saved.name == "layerdiffusion_finetune_step0000002.safetensors" and first.losses == whole.losses[:2]
    res = finetune_layered(model, latent, reference, e_opt, half_mask(), 1 - half_mask(), cfg,
                           checkpoints=Plan(tmp_path, resume=saved))
    assert res.losses == whole.losses and res.terms == whole.terms
    assert all(torch.equal(res.deltas[k], whole.deltas[k]) for k in whole.deltas)
    with pytest.raises(ResumeError, match=r"config\.lambda_obj"):
        finetune_layered(model, latent, reference, e_opt, half_mask(), 1 - half_mask(),
                         LayeredFineTuneConfig(steps=5, lr=1e-3, seed=1, lambda_obj=3.0),
                         checkpoints=Plan(tmp_path, resume=saved))


@pytest.mark.parametrize("patches", [False, True])
def test_sine_finetune_resumes_exactly(tiny, tmp_path, patches):
    """Whole-image and patch fine-tuning (the patch crops come from their own generator, saved too)."""
    from core.checkpoint import Plan
    from core.sine import PatchConfig, SineFineTuneConfig, finetune_sine

    model, _, cond = tiny
    g = torch.Generator().manual_seed(9)
    image = torch.rand(1, 3, 64, 64, generator=g)
    patch = PatchConfig(high_resolution=64, size=32)
    cfg = SineFineTuneConfig(steps=5, lr=5e-3, patches=patches, patch=patch, seed=6)
    whole = finetune_sine(model, image, cond, cfg)
    with pytest.raises(Interrupted):
        finetune_sine(model, image, cond, cfg, should_stop=stop_after(3), checkpoints=Plan(tmp_path))
    (saved,) = list(tmp_path.iterdir())
    assert saved.name == "sine_finetune_step0000003.safetensors"
    res = finetune_sine(model, image, cond, cfg, checkpoints=Plan(tmp_path, resume=saved))
    assert res.losses == whole.losses and res.terms == whole.terms
    assert all(torch.equal(res.deltas[k], whole.deltas[k]) for k in whole.deltas)
    with pytest.raises(ResumeError, match=r"config\.image"):
        finetune_sine(model, image.flip(-1), cond, cfg, checkpoints=Plan(tmp_path, resume=saved))


def test_rectifier_training_resumes_exactly(tmp_path):
    """The rectifier's batches come from a generator seeded per step, so the optimiser, its step-decay schedule
    and R's weights are the whole state (tiny pixel DDPM, the paper's Adam with weight decay and step decay)."""
    pytest.importorskip("diffusers")
    from core.checkpoint import Plan
    from core.diffusion import alphas_cumprod
    from core.pixel import DiffusersPixel
    from core.rectifier import TrainConfig, new_rectifier, train_rectifier
    from test_engine import tiny_pixel_unet

    pixel = DiffusersPixel(tiny_pixel_unet(), alphas_cumprod(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)))
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    cfg = TrainConfig(steps=6, batch=2, lr=1e-3, decay_every=2, seed=3)

    def rectifier():
        torch.manual_seed(0)
        return new_rectifier(pixel.unet_parameters(), 3, encoder_layers=(1, 1, 1, 1), width=8)

    r_whole = rectifier()
    whole = train_rectifier(pixel, r_whole, x0, cfg)
    r_first = rectifier()
    with pytest.raises(Interrupted):
        train_rectifier(pixel, r_first, x0, cfg, should_stop=stop_after(4), checkpoints=Plan(tmp_path))
    (saved,) = list(tmp_path.iterdir())
    assert saved.name == "rectifier_recon_step0000004.safetensors"
    r = rectifier()
    res = train_rectifier(pixel, r, x0, cfg, checkpoints=Plan(tmp_path, resume=saved))
    assert res.losses == whole.losses
    assert all(torch.equal(a, b) for a, b in zip(r.state_dict().values(), r_whole.state_dict().values()))
    with pytest.raises(ResumeError, match=r"config\.batch"):
        train_rectifier(pixel, rectifier(), x0, TrainConfig(steps=6, batch=4, lr=1e-3, decay_every=2, seed=3),
                        checkpoints=Plan(tmp_path, resume=saved))


def test_a_rectifier_edit_checkpoint_is_refused_for_another_text_direction(tmp_path):
    """Edit mode trains toward the source -> target text direction: a checkpoint of one direction is refused for
    another (a stand-in for DirectionalCLIP: its direction and a loss that reads it)."""
    pytest.importorskip("diffusers")
    from core.checkpoint import Plan
    from core.diffusion import alphas_cumprod
    from core.pixel import DiffusersPixel
    from core.rectifier import TrainConfig, new_rectifier, train_rectifier
    from test_engine import tiny_pixel_unet

    class Direction:
        def __init__(self, value: float):
            self.text_direction = torch.full((8,), value)

        def loss(self, image, source):  # [B]
            return ((image - source).mean(dim=(1, 2, 3)) - self.text_direction.sum()).abs()

    pixel = DiffusersPixel(tiny_pixel_unet(), alphas_cumprod(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)))
    x0 = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    cfg = TrainConfig(mode="edit", steps=3, batch=2, seed=3)
    r = new_rectifier(pixel.unet_parameters(), 3, encoder_layers=(1, 1, 1, 1), width=8)
    with pytest.raises(Interrupted):
        train_rectifier(pixel, r, x0, cfg, clip=Direction(0.1), to_image=lambda x: (x + 1) / 2,
                        should_stop=stop_after(1), checkpoints=Plan(tmp_path))
    (saved,) = list(tmp_path.iterdir())
    with pytest.raises(ResumeError, match=r"config\.text_direction"):
        train_rectifier(pixel, r, x0, cfg, clip=Direction(0.2), to_image=lambda x: (x + 1) / 2,
                        checkpoints=Plan(tmp_path, resume=saved))


def test_sinddm_training_resumes_exactly(tmp_path):
    """SinDDM: the network, Adam, the milestone schedule, the generator of scales, t and eps, and the EMA (updated
    every step at this length, so a lost EMA would show); its step count is part of the run's identity, since the
    EMA and learning-rate schedules are scaled to it."""
    from PIL import Image

    from core.checkpoint import Plan
    from core.sinddm import NetConfig, TrainConfig, build_pyramid, train
    from helpers import ROOT

    pyramid = build_pyramid(Image.open(ROOT / "core/sinddm/data/coffee_128x100.png"))
    cfg = TrainConfig(steps=12, batch_size=2, seed=1, precision="fp32")
    assert cfg.ema_every == 1 and cfg.ema_start <= 1
    whole = train(pyramid, NetConfig(8), cfg)
    with pytest.raises(Interrupted):
        train(pyramid, NetConfig(8), cfg, should_stop=stop_after(7), checkpoints=Plan(tmp_path))
    (saved,) = list(tmp_path.iterdir())
    assert saved.name == "sinddm_train_step0000007.safetensors"
    res = train(pyramid, NetConfig(8), cfg, checkpoints=Plan(tmp_path, resume=saved))
    assert res.losses == whole.losses
    assert all(torch.equal(a, b) for a, b in zip(res.net.state_dict().values(), whole.net.state_dict().values()))
    with pytest.raises(ResumeError, match=r"config\.steps"):
        train(pyramid, NetConfig(8), TrainConfig(steps=20, batch_size=2, seed=1, precision="fp32"),
              checkpoints=Plan(tmp_path, resume=saved))
