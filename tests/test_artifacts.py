"""The pack's trained files and outputs: one format-tag reader, atomic writes, names claimed atomically.

Loaders (Load Trained, Load SinDDM Model, ``core.sinddm.load``) answer a missing, corrupt or
foreign file with an error naming it and saying what it is; two saves at once never get
the same name; a failed write leaves nothing behind.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from core.artifact_io import ArtifactError, atomic_save_safetensors, atomic_write_image, read_artifact
from core.imagic.artifact import Trained, load_trained, save_trained
from core.sinddm import NetConfig, SinDDM, SinDDMNet, build_pyramid, load, save
from helpers import ROOT, load_pack

PACK = load_pack()
N = PACK.NODE_CLASS_MAPPINGS
common = sys.modules[PACK.__name__ + ".nodes.common"]
NodeInputError = common.NodeInputError
IMAGE = ROOT / "core/sinddm/data/coffee_128x100.png"


def lora_delta() -> dict[str, torch.Tensor]:
    return {"diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.randn(2, 8, 1, 1),
            "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.randn(8, 2, 1, 1),
            "diffusion_model.input_blocks.1.1.proj_in.alpha": torch.tensor(2.0)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of every kind a loader may be handed."""
    d = tmp_path_factory.mktemp("files")
    out = {"imagic": save_trained(Trained(lora_delta(), "lora", torch.randn(1, 77, 8), {"steps": 2}),
                                  d / "edit.safetensors")}
    small = Image.open(IMAGE).convert("RGB").resize((40, 32))
    out["sinddm"] = save(SinDDM.create(SinDDMNet(NetConfig(4)), build_pyramid(small)), d / "sinddm.safetensors")
    save_file(lora_delta(), str(d / "plain_lora.safetensors"))
    out["plain_lora"] = d / "plain_lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(d / "hf.safetensors"), metadata={"format": "pt"})
    out["hf"] = d / "hf.safetensors"
    (d / "notes.safetensors").write_text("these are my notes, not a model\n")
    out["text"] = d / "notes.safetensors"
    out["png"] = d / "picture.safetensors"
    out["png"].write_bytes(IMAGE.read_bytes())
    out["empty"] = d / "empty.safetensors"
    out["empty"].write_bytes(b"")
    whole = out["imagic"].read_bytes()
    out["truncated"] = d / "truncated.safetensors"
    out["truncated"].write_bytes(whole[: len(whole) - 100])
    header_len = int.from_bytes(whole[:8], "little")
    out["bad_json"] = d / "bad_json.safetensors"
    out["bad_json"].write_bytes(whole[:8] + b"!" * header_len + whole[8 + header_len:])
    newer = {**_meta(out["imagic"]), "version": "7"}
    save_file(lora_delta(), str(d / "newer.safetensors"), metadata=newer)
    out["newer"] = d / "newer.safetensors"
    out["missing"] = d / "missing.safetensors"
    out["folder"] = d / "folder.safetensors"
    out["folder"].mkdir()
    return out


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# ------------------------------------------------------------------------------------- the reader
@pytest.mark.parametrize("kind,expected,words", [
    ("missing", "sie.trained", ["not found"]),
    ("folder", "sie.trained", ["folder"]),
    ("text", "sie.trained", ["a text file", "not an Imagic edit"]),
    ("png", "sie.sinddm", ["a PNG image", "not a SinDDM model"]),
    ("empty", "sie.sinddm", ["an empty file"]),
    ("truncated", "sie.trained", ["truncated"]),
    ("bad_json", "sie.trained", ["not valid JSON"]),
    ("plain_lora", "sie.trained", ["a LoRA", "no 'format' tag", "not an Imagic edit"]),
    ("hf", "sie.sinddm", ["format tag 'pt'", "not a SinDDM model"]),
    ("sinddm", "sie.trained", ["this is a SinDDM model, not an Imagic edit"]),
    ("imagic", "sie.sinddm", ["this is an Imagic edit", "not a SinDDM model"]),
    ("newer", "sie.trained", ["version 7", "newer version of the pack"]),
])
def test_reader_names_the_file_and_what_it_is(files, kind, expected, words):
    with pytest.raises(ArtifactError) as info:
        read_artifact(files[kind], expected)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message.startswith(files[kind].name + ": "), message
    for word in words:
        assert word in message, message
    assert "\n" not in message


def test_reader_returns_tensors_and_metadata(files):
    tensors, meta = read_artifact(files["imagic"], "sie.trained")
    assert meta["format"] == "sie.trained" and meta["version"] == "1" and meta["mode"] == "lora"
    assert "sie.embedding" in tensors and len(tensors) == 4


def test_sinddm_load_uses_the_reader(files):
    assert isinstance(load(files["sinddm"]), SinDDM)
    for kind in ("missing", "text", "plain_lora", "imagic", "truncated"):
        with pytest.raises(ArtifactError, match=files[kind].name):
            load(files[kind])


def test_damaged_sinddm_contents_are_an_artifact_error(files, tmp_path):
    tensors, meta = read_artifact(files["sinddm"], "sie.sinddm")
    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "pyramid.0"}, str(broken), metadata=meta)
    with pytest.raises(ArtifactError, match="broken.safetensors: a SinDDM model with damaged contents"):
        load(broken)


# ------------------------------------------------------------------------------- Imagic's file
def test_imagic_writer_and_reader_are_shared_by_nodes_and_cli(files, tmp_path):
    imagic_nodes = sys.modules[PACK.__name__ + ".nodes.imagic"]
    # one writer and one reader (the engine's, as Imagic's and LayerDiffusion's stage 2 both write this file)
    assert imagic_nodes.save_trained.__module__.endswith("core.trained")
    assert imagic_nodes.load_trained.__module__.endswith("core.trained")
    assert save_trained.__module__ == "core.trained" and load_trained.__module__ == "core.trained"
    from core.imagic.pipeline import save_edit

    delta = lora_delta()
    e_opt = torch.randn(1, 77, 8)
    result = SimpleNamespace(tuned=SimpleNamespace(delta=delta, mode="lora", losses=[0.5, 0.25]),
                             embedding=SimpleNamespace(e_opt=e_opt))
    back = load_trained(save_edit(result, tmp_path / "cli.safetensors"))
    assert back.mode == "lora" and back.info == {"steps": 2, "final_loss": 0.25}
    assert torch.equal(back.embedding, e_opt) and all(torch.equal(back.delta[k], delta[k]) for k in delta)
    assert json.loads(_meta(tmp_path / "cli.safetensors")["info"])["final_loss"] == 0.25


def fake_sd15():
    config = type("SD15", (), {})()
    config.unet_config = {"context_dim": 768, "in_channels": 4, "adm_in_channels": None}
    return SimpleNamespace(model=SimpleNamespace(model_config=config, model_type=SimpleNamespace(name="EPS")))


@pytest.mark.parametrize("kind,words", [
    ("plain_lora", ["a LoRA", "LoraLoaderModelOnly"]),
    ("sinddm", ["a SinDDM model, not an Imagic edit"]),
    ("text", ["a text file"]),
    ("truncated", ["truncated"]),
    ("missing", ["not found"]),
])
def test_load_trained_node_turns_file_errors_into_input_errors(files, kind, words):
    with pytest.raises(NodeInputError) as info:
        N["SIE_LoadTrained"].execute(fake_sd15(), str(files[kind]), 1.0)
    assert info.value.input_name == "trained_name"
    for word in [files[kind].name, "Fix: pick a file written by Save Trained", *words]:
        assert word in str(info.value)


@pytest.mark.parametrize("kind,words", [
    ("imagic", ["an Imagic edit", "not a SinDDM model"]),
    ("png", ["a PNG image"]),
    ("newer", ["an Imagic edit"]),
    ("missing", ["not found"]),
])
def test_load_sinddm_node_turns_file_errors_into_input_errors(files, kind, words):
    with pytest.raises(NodeInputError) as info:
        N["SIE_LoadSinDDM"].execute(str(files[kind]))
    assert info.value.input_name == "model_name"
    for word in [files[kind].name, "Fix: pick a file saved by Save SinDDM Model", *words]:
        assert word in str(info.value)


# ----------------------------------------------------------------------------- atomic outputs
def test_two_saves_at_once_get_two_names_and_both_complete(tmp_path):
    """Both threads claim a name before either writes (the second barrier): with a check-then-write
    counter both would pick _00001 and one file would overwrite the other."""
    start, claimed = threading.Barrier(2, timeout=10), threading.Barrier(2, timeout=10)
    results, errors = {}, []

    def saver(k: int) -> None:
        def write(path):
            claimed.wait()  # both names are taken now
            atomic_save_safetensors({"value": torch.full((64,), float(k))}, path, {"writer": str(k)})

        try:
            start.wait()
            results[k] = common.save_output(tmp_path, "edits/cat", write, "test").ui["text"][0]
        except BaseException as e:  # noqa: B036 - reported below
            errors.append(e)

    threads = [threading.Thread(target=saver, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    assert sorted(results.values()) == ["edits/cat_00001.safetensors", "edits/cat_00002.safetensors"]
    for k, name in results.items():
        with safe_open(str(tmp_path / name), "pt") as f:
            assert f.metadata()["writer"] == str(k)
            assert torch.equal(f.get_tensor("value"), torch.full((64,), float(k)))
    assert sorted(p.name for p in (tmp_path / "edits").iterdir()) == ["cat_00001.safetensors",
                                                                     "cat_00002.safetensors"]


def test_a_name_taken_after_the_listing_is_skipped(tmp_path, monkeypatch):
    """O_EXCL, not the directory listing, decides: a file that appears in between is not overwritten."""
    real_glob = Path.glob

    def late_glob(self, pattern):
        found = list(real_glob(self, pattern))
        (tmp_path / "cat_00001.safetensors").write_bytes(b"someone else's")
        return iter(found)

    monkeypatch.setattr(Path, "glob", late_glob)
    path = common.next_free_path(tmp_path, "cat", ".safetensors")
    assert path.name == "cat_00002.safetensors" and path.exists()
    assert (tmp_path / "cat_00001.safetensors").read_bytes() == b"someone else's"


def test_a_failed_save_leaves_no_file_and_frees_the_name(tmp_path):
    def write(path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        common.save_output(tmp_path, "cat", write, "test")
    assert list(tmp_path.iterdir()) == []
    ok = common.save_output(tmp_path, "cat", lambda p: atomic_save_safetensors({"x": torch.ones(1)}, p), "test")
    assert ok.ui["text"] == ["cat_00001.safetensors"]


def test_atomic_image_write(tmp_path, monkeypatch):
    img = Image.new("RGB", (8, 6), "red")
    path = atomic_write_image(img, tmp_path / "out" / "a.png")
    assert Image.open(path).size == (8, 6) and [p.name for p in path.parent.iterdir()] == ["a.png"]
    with pytest.raises(ValueError, match="cannot write images"):
        atomic_write_image(img, tmp_path / "a.txt")

    def broken_save(self, fp, format=None, **kw):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_image(img, tmp_path / "out" / "a.png")
    assert [p.name for p in path.parent.iterdir()] == ["a.png"] and Image.open(path).size == (8, 6)
