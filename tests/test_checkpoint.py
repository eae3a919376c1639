"""Saved directories: HF layout, safetensors only, plugin lock, exact round trip.

Loading one with transformers' Auto classes in a fresh process: test_hf_ecosystem.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_model

from dharma_kernel import checkpoint
from dharma_kernel.errors import DharmaError
from dharma_kernel.model import DharmaModel


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("routed", top_k=1)
    directory = checkpoint.save(model, tmp_path / "model")
    return model, directory


def test_round_trip_gives_equal_logits(saved):
    model, directory = saved
    loaded = DharmaModel.from_pretrained(directory).eval()
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # tied embeddings stay tied after loading
    assert loaded.backbone.lm_head.weight.data_ptr() == loaded.backbone.transformer.wte.weight.data_ptr()


def test_directory_layout(saved):
    _, directory = saved
    assert (directory / "model.safetensors").exists()
    assert not list(directory.glob("*.bin"))
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "dharma"
    assert [m["ref"] for m in config["layout"]["modules"]] == ["paths.dharma", "darshanas.vedanta"]
    lock = {entry["ref"]: entry for entry in config["lock"]}
    assert lock["darshanas.vedanta"]["distribution"] == "dharma-plugin-vedanta"
    assert lock["darshanas.vedanta"]["version"] == "0.1.0"
    assert lock["paths.dharma"]["module_api"] == "1.0"
    with safe_open(directory / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "stacks.0.members.darshanas__vedanta.attention.query.weight" in keys
    assert "stacks.1.router.weight" in keys


def test_pickled_weights_are_refused(saved, tmp_path):
    model, directory = saved
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    with pytest.raises(DharmaError, match=r"pickled \(pytorch_model.bin\).*safetensors only"):
        DharmaModel.from_pretrained(directory)


def test_missing_plugin_names_the_distribution(saved):
    _, directory = saved
    config = json.loads((directory / "config.json").read_text())
    config["lock"][0] = {
        "kind": "module",
        "ref": "paths.tantra",
        "distribution": "dharma-plugin-tantra",
        "version": "0.1.0",
        "module_api": "1.0",
    }
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        DharmaError, match=r"paths.tantra is not installed; run: pip install 'dharma-plugin-tantra==0.1.0'"
    ):
        DharmaModel.from_pretrained(directory)


def test_major_version_mismatch_refuses(saved):
    _, directory = saved
    config = json.loads((directory / "config.json").read_text())
    config["lock"][0]["version"] = "0.9.0"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(DharmaError, match=r"saved with dharma-plugin-dharma 0.9.0, but 0.1.0 is installed"):
        DharmaModel.from_pretrained(directory)


def test_save_replaces_atomically(saved, monkeypatch):
    model, directory = saved
    before = (directory / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        checkpoint.save(model, directory)
    assert (directory / "model.safetensors").read_bytes() == before
    assert [p.name for p in directory.parent.iterdir()] == ["model"]  # no staging left behind


def test_save_refuses_to_replace_what_is_not_a_model(tmp_path):
    model = tiny_model()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(DharmaError, match="exists and is not a saved Dharma model; refusing to replace it"):
        checkpoint.save(model, notes)
    assert (notes / "notes.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DharmaError, match="refusing to replace it"):
        checkpoint.save(model, afile)
    assert afile.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "notes"]


def test_saved_directory_is_readable_by_others(saved):
    _, directory = saved
    assert directory.stat().st_mode & 0o055 == 0o055  # not the 0700 of a temporary directory


def test_saved_files_are_readable_by_others(saved):
    _, directory = saved
    private = [p.name for p in directory.iterdir() if p.stat().st_mode & 0o044 != 0o044]
    assert private == []  # safetensors writes its weights 0600


def test_sharded_weights_load(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    loaded = DharmaModel.from_pretrained(tmp_path / "sharded").eval()
    ids = torch.randint(1, 97, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_other_module_api_major_refuses(saved):
    _, directory = saved
    config = json.loads((directory / "config.json").read_text())
    config["lock"][1]["module_api"] = "2.0"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        DharmaError, match="saved with MODULE_API 2.0, the installed dharma-plugin-vedanta speaks 1.0"
    ):
        DharmaModel.from_pretrained(directory)


def test_corrupt_config_is_a_clear_error(saved):
    _, directory = saved
    (directory / "config.json").write_text("{not json")
    with pytest.raises(DharmaError, match=r"config.json: unreadable"):
        DharmaModel.from_pretrained(directory)
