"""f_trigen checkpoints: fp32 safetensors round trip with strict loading, metadata, clear errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from g3dr.config import config_to_dict, load_config
from g3dr.errors import ConfigError, WeightsError
from g3dr.models import FTrigen, load_f_trigen, save_f_trigen
from g3dr.models.checkpoint_io import read_f_trigen_metadata


def randomised_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = FTrigen(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the init values, which a bug could reproduce
    return model


@pytest.fixture
def tiny_cfg(tiny_config_path):
    return load_config(tiny_config_path)


def test_round_trip_is_exact_and_strict(tiny_cfg, tmp_path):
    model = randomised_model(tiny_cfg)
    path = save_f_trigen(model, tiny_cfg, tmp_path / "ckpt.safetensors", step=1234)
    loaded, cfg, meta = load_f_trigen(path)
    assert config_to_dict(cfg) == config_to_dict(tiny_cfg)
    assert meta["step"] == 1234 and meta["plane_convention"] == "eg3d" and meta["source"] == "train"
    original, restored = model.state_dict(), loaded.state_dict()
    assert set(original) == set(restored)
    assert all(k.startswith(("generator.", "decoder.")) for k in restored)  # renderer holds no weights
    for k in original:
        assert torch.equal(original[k], restored[k]), k
    assert not loaded.training
    with safe_open(str(path), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())


def test_reduced_precision_model_is_saved_as_fp32(tiny_cfg, tmp_path):
    model = randomised_model(tiny_cfg).to(torch.bfloat16)
    path = save_f_trigen(model, tiny_cfg, tmp_path / "bf16.safetensors", step=3)
    tensors = load_file(str(path))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v.float())


def test_wrapped_model_is_unwrapped(tiny_cfg, tmp_path):
    class Engine(torch.nn.Module):  # stands in for a DeepSpeed engine / DDP, which keep the model in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = randomised_model(tiny_cfg)
    path = save_f_trigen(Engine(model), tiny_cfg, tmp_path / "wrapped.safetensors")
    assert set(load_file(str(path))) == set(model.state_dict())


def test_missing_and_unexpected_tensors_are_listed(tiny_cfg, tmp_path):
    path = save_f_trigen(randomised_model(tiny_cfg), tiny_cfg, tmp_path / "ok.safetensors", step=5)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors.pop("decoder.out.bias")
    tensors["generator.extra.weight"] = torch.zeros(2)
    tensors["generator.init_conv.bias"] = torch.zeros(3)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(WeightsError) as err:
        load_f_trigen(bad)
    message = str(err.value)
    assert "1 missing: decoder.out.bias" in message
    assert "1 unexpected: generator.extra.weight" in message
    assert "generator.init_conv.bias: (3,) vs model (16,)" in message


def test_render_time_overrides_and_refused_convention_change(tiny_cfg, tmp_path):
    path = save_f_trigen(randomised_model(tiny_cfg), tiny_cfg, tmp_path / "c.safetensors")
    _, cfg, _ = load_f_trigen(path, overrides=["renderer.sigma_scale=5", "renderer.deterministic=true"])
    assert cfg.renderer.sigma_scale == 5.0 and cfg.renderer.deterministic
    with pytest.raises(ConfigError, match="plane convention 'eg3d'"):
        load_f_trigen(path, overrides=["renderer.plane_convention=orthogonal"])
    with pytest.raises(WeightsError, match="wrong shape"):
        load_f_trigen(path, overrides=["model.triplane_channels=4"])


def test_orthogonal_convention_is_recorded(tiny_config_path, tmp_path):
    cfg = load_config(tiny_config_path, ["renderer.plane_convention=orthogonal"])
    path = save_f_trigen(randomised_model(cfg), cfg, tmp_path / "o.safetensors")
    assert read_f_trigen_metadata(path)["plane_convention"] == "orthogonal"
    _, loaded_cfg, _ = load_f_trigen(path)
    assert loaded_cfg.renderer.plane_convention == "orthogonal"


def test_unreadable_inputs_are_clear_errors(tiny_cfg, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_f_trigen(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable .safetensors"):
        load_f_trigen(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="not a g3dr f_trigen checkpoint"):
        load_f_trigen(foreign)
    with pytest.raises(WeightsError, match="must end in .safetensors"):
        save_f_trigen(FTrigen(tiny_cfg), tiny_cfg, tmp_path / "x.pt")


def test_stored_config_keys_unknown_to_this_version_are_dropped(tiny_cfg, tmp_path, caplog):
    path = save_f_trigen(randomised_model(tiny_cfg), tiny_cfg, tmp_path / "old.safetensors", step=2)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    stored = yaml.safe_load(metadata["config"])
    stored["renderer"]["retired_option"] = 3
    stored["retired_section"] = {"x": 1}
    metadata["config"] = yaml.safe_dump(stored)
    old = tmp_path / "older.safetensors"
    save_file(load_file(str(path)), str(old), metadata=metadata)
    with caplog.at_level("WARNING", logger="g3dr"):
        _, cfg, _ = load_f_trigen(old)
    assert config_to_dict(cfg) == config_to_dict(tiny_cfg)
    assert "renderer.retired_option" in caplog.text and "retired_section" in caplog.text
    # Values that are invalid for the current schema are still errors.
    stored["renderer"]["num_coarse"] = 1
    metadata["config"] = yaml.safe_dump(stored)
    save_file(load_file(str(path)), str(old), metadata=metadata)
    with pytest.raises(ConfigError, match="renderer.num_coarse"):
        load_f_trigen(old)
