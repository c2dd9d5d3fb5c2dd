"""``g3dr import-official``: a checkpoint saved in the reference's format (built here from the reference
layout) converts to our checkpoint with the same network function; bad checkpoints are clear errors."""

from __future__ import annotations

import datetime
import os
import pickle

import pytest
import torch

from g3dr.launchers.main import main
from g3dr.config import load_config
from g3dr.errors import ConfigError, WeightsError
from g3dr.models import load_f_trigen
from g3dr.models.reference_import import import_official, read_reference_checkpoint
from g3dr_test_support import load_test_helper


def load_helper(name: str):
    return load_test_helper(name)


ref = load_helper("reference_unet")

# The tiny widths with the reference's two ResNet blocks per level.
OVERRIDES = ["model.num_res_blocks=2"]


@pytest.fixture
def cfg(tiny_config_path):
    return load_config(tiny_config_path, OVERRIDES)


def reference_state(cfg, seed=0):
    m = cfg.model
    layout = ref.reference_layout(dim=m.base_width, dim_mults=m.channel_mults, image_size=cfg.data.resolution,
                                  pos_channels=m.pos_emb_channels, feature_dim=m.triplane_channels,
                                  heads=m.attn_heads, dim_head=m.attn_head_dim, decoder_hidden=m.decoder_hidden)
    return ref.random_reference_state(layout, seed=seed, dtype=torch.float32)


def save_reference_checkpoint(path, state, prefix="module.", step=4321, scheduler=None, **extra):
    """What the reference's ``save()`` writes: step, model, optimizer and scheduler state dicts."""
    model = {f"{prefix}{k}": v for k, v in state.items()}
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
           "param_groups": [{"lr": 5e-5, "betas": (0.9, 0.99), "params": [0]}]}
    scheduler = {"total_steps": 1800000, "last_epoch": step, "_step_count": step + 1, **(scheduler or {})}
    torch.save({"step": step, "model": model, "opt": opt, "scheduler": scheduler, **extra}, str(path))
    return path


def test_import_reproduces_the_reference_network(cfg, tmp_path):
    state = reference_state(cfg)
    src = save_reference_checkpoint(tmp_path / "checkpoint_generic.pt", state)
    summary = import_official(src, tmp_path / "imported.safetensors", cfg)
    assert summary["step"] == 4321 and summary["tensors"] == len(state)
    model, loaded_cfg, meta = load_f_trigen(tmp_path / "imported.safetensors")
    assert meta["step"] == 4321 and meta["plane_convention"] == "eg3d" and meta["source"] == "import-official"
    assert meta["imported_from"] == "checkpoint_generic.pt"
    assert loaded_cfg.model.num_res_blocks == 2
    sd = model.state_dict()
    assert torch.equal(sd["generator.pos_embed"], state["pos_embed"])
    assert torch.equal(sd["decoder.hidden.weight"], state["decoder.net.0.weight"])
    assert torch.equal(sd["generator.up.1.resample.conv.weight"], state["ups.1.3.weight"])
    assert torch.equal(sd["generator.down.0.resample.conv.weight"], state["downs.0.3.1.weight"])

    # The imported model computes the reference network's function (float64 evaluation of both).
    x = torch.randn(1, 4, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.generator.double()(x)
        expected = ref.reference_unet_forward({k: v.double() for k, v in state.items()}, x, cfg.model.channel_mults,
                                              heads=cfg.model.attn_heads, groups=cfg.model.norm_groups)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9)
        feats = torch.randn(1, 20, cfg.model.triplane_channels, dtype=torch.float64)
        rgb, sigma = model.decoder.double()(feats, None, None)
        rgb_ref, sigma_ref = ref.reference_decoder_forward({k: v.double() for k, v in state.items()}, feats)
        torch.testing.assert_close((rgb, sigma), (rgb_ref, sigma_ref), rtol=0, atol=1e-12)


def test_import_without_wrapper_prefix(cfg, tmp_path):
    state = reference_state(cfg, seed=3)
    src = save_reference_checkpoint(tmp_path / "plain.pt", state, prefix="")
    import_official(src, tmp_path / "plain.safetensors", cfg)
    model, _, _ = load_f_trigen(tmp_path / "plain.safetensors")
    assert torch.equal(model.state_dict()["generator.final_conv.weight"], state["final_conv.weight"])


def test_missing_unknown_and_misshaped_keys_are_listed(cfg, tmp_path):
    state = reference_state(cfg)
    state.pop("mid_attn.fn.norm.g")
    state["renderer.some_buffer"] = torch.zeros(3)
    state["init_conv.bias"] = torch.zeros(5)
    src = save_reference_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(WeightsError) as err:
        import_official(src, tmp_path / "out.safetensors", cfg)
    message = str(err.value)
    assert "1 unknown reference tensors: module.renderer.some_buffer" in message
    assert "1 model tensors missing from the checkpoint: generator.mid.attn.norm.gain" in message
    assert "module.init_conv.bias: (5,) vs generator.init_conv.bias (16,)" in message
    assert not (tmp_path / "out.safetensors").exists()


def test_wrong_config_is_a_shape_error(tiny_config_path, tmp_path):
    state = reference_state(load_config(tiny_config_path, OVERRIDES))
    src = save_reference_checkpoint(tmp_path / "c.pt", state)
    with pytest.raises(WeightsError, match="shape mismatches"):
        import_official(src, tmp_path / "out.safetensors",
                        load_config(tiny_config_path, [*OVERRIDES, "model.base_width=32"]))
    with pytest.raises(WeightsError, match="missing from the checkpoint"):  # one ResNet block per level: extra names
        import_official(src, tmp_path / "out.safetensors", load_config(tiny_config_path, ["model.num_res_blocks=3"]))


def test_orthogonal_convention_is_refused(tiny_config_path, tmp_path):
    cfg = load_config(tiny_config_path, [*OVERRIDES, "renderer.plane_convention=orthogonal"])
    src = save_reference_checkpoint(tmp_path / "c.pt", reference_state(cfg))
    with pytest.raises(ConfigError, match="must be 'eg3d'"):
        import_official(src, tmp_path / "out.safetensors", cfg)


class AnnealingScheduler:
    """Like an old OneCycleLR: its state dict holds a bound method, pickled as getattr(self, name)."""

    def cosine(self, x):
        return x


class Payload:
    """An object whose unpickling would run code: os.makedirs(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_python_objects_outside_the_model_are_skipped_without_running_code(cfg, tmp_path):
    state = reference_state(cfg)
    marker = str(tmp_path / "code-ran")
    src = save_reference_checkpoint(tmp_path / "obj.pt", state, saved_at=datetime.datetime(2024, 1, 1),
                                    scheduler={"anneal_func": AnnealingScheduler().cosine, "payload": Payload(marker),
                                               "optimizer": torch.optim.Adam(torch.nn.Linear(2, 2).parameters())})
    with pytest.raises(pickle.UnpicklingError):  # the plain weights_only loader refuses this file
        torch.load(str(src), weights_only=True)
    loaded, step = read_reference_checkpoint(src)
    assert step == 4321 and not os.path.exists(marker)
    assert set(loaded) == {f"module.{k}" for k in state}
    assert all(torch.equal(loaded[f"module.{k}"], v) for k, v in state.items())
    import_official(src, tmp_path / "ok.safetensors", cfg)
    assert not os.path.exists(marker)
    # Full unpickling (trusted files only) does run the file's code.
    read_reference_checkpoint(src, allow_pickle=True)
    assert os.path.exists(marker)


def test_non_tensor_model_entries_are_refused(cfg, tmp_path):
    state = dict(reference_state(cfg))
    state["pos_embed"] = datetime.datetime(2024, 1, 1)
    src = save_reference_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(WeightsError, match="not tensors: module.pos_embed"):
        read_reference_checkpoint(src)


def test_not_a_reference_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, str(path))
    with pytest.raises(WeightsError, match="expected a dict with 'step', 'model'"):
        read_reference_checkpoint(path)
    with pytest.raises(WeightsError, match="does not exist"):
        read_reference_checkpoint(tmp_path / "missing.pt")


def test_cli(tiny_config_path, cfg, tmp_path, capsys):
    src = save_reference_checkpoint(tmp_path / "checkpoint_generic.pt", reference_state(cfg))
    dst = tmp_path / "out.safetensors"
    assert main(["import-official", "--config", str(tiny_config_path), str(src), str(dst), *OVERRIDES]) == 0
    assert "step 4321" in capsys.readouterr().out
    assert load_f_trigen(dst)[2]["step"] == 4321
    # A user error is one line on stderr and exit code 2, without a traceback.
    assert main(["import-official", "--config", str(tiny_config_path), str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "g3dr import-official: error:" in err and "Traceback" not in err
