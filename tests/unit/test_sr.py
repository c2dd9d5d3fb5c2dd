"""The super-resolution stage (g3dr/models/sr.py): the [-1, 1] wrapper around spandrel's RCAN, our .safetensors
round trip, reading foreign RCAN state dicts of different sizes (architecture detected by spandrel, rgb_range
read back from the mean shift), and clear errors for files that are missing, not RCAN or not a state dict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from spandrel.architectures.RCAN import RCAN

from g3dr.config import SRConfig, load_config
from g3dr.errors import ConfigError, WeightsError
from g3dr.models.sr import FORMAT, SuperResolution, build_sr, load_sr, read_state_dict, save_sr

TINY = SRConfig(n_resgroups=1, n_resblocks=1, n_feats=8, reduction=4)

# Two foreign configurations that differ in every detectable size (groups, blocks, features, reduction, scale).
FOREIGN = [
    dict(scale=2, n_resgroups=2, n_resblocks=1, n_feats=16, reduction=4),
    dict(scale=4, n_resgroups=1, n_resblocks=3, n_feats=8, reduction=2),
]


def rgb(b=2, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def random_rcan(seed=0, **kwargs) -> RCAN:
    """A spandrel RCAN with every trainable tensor random (the mean shift stays the published constant)."""
    torch.manual_seed(seed)
    net = RCAN(**kwargs).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "_mean." not in name:
                p.normal_(0, 0.05)
    return net


def reference_sr(net: RCAN, x: torch.Tensor, clamp=True) -> torch.Tensor:
    """The reference's visualize.py, written out: [-1, 1] -> [0, 1], the network, clamp, back to [-1, 1]."""
    with torch.no_grad():
        y = net(((x.double() + 1) / 2).float().clone())
    return (y.clamp(0, 1) if clamp else y) * 2 - 1


def test_forward_shape_range_and_reference():
    torch.manual_seed(0)
    model = build_sr(TINY).eval()
    x = rgb()
    before = x.clone()
    with torch.no_grad():
        y = model(x)
        raw = model(x, clamp=False)
    assert y.shape == (2, 3, 24, 20) and model.scale == 2
    assert y.min() >= -1 and y.max() <= 1
    assert torch.equal(x, before), "the input must not be modified (RCAN scales its input in place)"
    torch.testing.assert_close(y, reference_sr(model.rcan, x), rtol=0, atol=1e-6)
    torch.testing.assert_close(raw, reference_sr(model.rcan, x, clamp=False), rtol=0, atol=1e-6)
    assert json.loads(json.dumps(model.architecture)) == model.architecture
    assert model.architecture == dict(scale=2, n_resgroups=1, n_resblocks=1, n_feats=8, n_colors=3, rgb_range=255,
                                       norm=True, kernel_size=3, reduction=4, res_scale=1, act_mode="relu",
                                       unshuffle_mod=False)


def test_mean_shift_is_frozen_and_gradients_flow():
    torch.manual_seed(0)
    model = build_sr(TINY)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"rcan.sub_mean.weight", "rcan.sub_mean.bias", "rcan.add_mean.weight", "rcan.add_mean.bias"}
    x = rgb().requires_grad_(True)
    model(x, clamp=False).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert model.rcan.head[0].weight.grad.abs().sum() > 0


def test_forward_rejects_non_rgb():
    model = build_sr(TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(1, 4, 8, 8))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = build_sr(TINY).eval()
    path = save_sr(model, tmp_path / "sr.safetensors", metadata={"source": "train", "step": 7})
    loaded = load_sr(path)
    assert loaded.architecture == model.architecture and loaded.scale == 2 and loaded.source == "train"
    assert not loaded.training
    x = rgb(seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    state, meta = read_state_dict(path)
    assert meta["format"] == FORMAT and meta["step"] == "7" and json.loads(meta["architecture"]) == model.architecture
    assert all(t.dtype == torch.float32 for t in state.values())
    # RCAN's own tensor names: spandrel (and other RCAN tools) read our file as an RCAN.
    from spandrel import ModelLoader
    assert ModelLoader().load_from_state_dict(state).architecture.id == "RCAN"


def test_save_refuses_reserved_metadata_and_other_suffixes(tmp_path):
    model = build_sr(TINY)
    with pytest.raises(ValueError, match="reserved"):
        save_sr(model, tmp_path / "sr.safetensors", metadata={"architecture": "x"})
    with pytest.raises(WeightsError, match=r"\.safetensors"):
        save_sr(model, tmp_path / "sr.pth")


@pytest.mark.parametrize("arch", FOREIGN, ids=["x2-2g16f", "x4-1g8f"])
@pytest.mark.parametrize("wrap", ["bare", "params", "state_dict-module"])
def test_foreign_rcan_state_dicts_are_detected(tmp_path, arch, wrap):
    net = random_rcan(**arch)
    sd = net.state_dict()
    if wrap == "params":
        obj = {"params": sd, "iter": 1000}
    elif wrap == "state_dict-module":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    else:
        obj = sd
    torch.save(obj, tmp_path / "rcan.pth")
    model = load_sr(tmp_path / "rcan.pth")
    assert model.source == "foreign" and model.scale == arch["scale"]
    assert {k: model.architecture[k] for k in arch} == arch
    assert model.architecture["rgb_range"] == 255 and model.architecture["norm"] is True
    x = rgb(b=1, h=8, w=6, seed=4)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, 8 * arch["scale"], 6 * arch["scale"])
    torch.testing.assert_close(y, reference_sr(net, x), rtol=0, atol=1e-6)


def test_foreign_rgb_range_is_read_from_the_mean_shift(tmp_path):
    """spandrel assumes rgb_range 255; a network trained with rgb_range 1 must run as it was trained."""
    net = random_rcan(scale=2, n_resgroups=1, n_resblocks=1, n_feats=8, reduction=4, rgb_range=1)
    torch.save(net.state_dict(), tmp_path / "rcan1.pth")
    model = load_sr(tmp_path / "rcan1.pth")
    assert model.architecture["rgb_range"] == 1
    x = rgb(b=1, h=8, w=8, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(x, clamp=False), reference_sr(net, x, clamp=False), rtol=0, atol=1e-6)


def test_foreign_without_mean_shift(tmp_path):
    net = random_rcan(scale=2, n_resgroups=1, n_resblocks=1, n_feats=8, reduction=4, norm=False)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    model = load_sr(tmp_path / "plain.pt")
    assert model.architecture["norm"] is False
    x = rgb(b=1, h=6, w=6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_sr(net, x), rtol=0, atol=1e-6)


def test_foreign_safetensors_without_our_metadata(tmp_path):
    from safetensors.torch import save_file

    net = random_rcan(**FOREIGN[0])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "rcan.safetensors"))
    model = load_sr(tmp_path / "rcan.safetensors")
    assert model.source == "foreign" and model.architecture["n_feats"] == 16


# ----------------------------------------------------------------------------- errors


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(WeightsError, match=r"nope\.safetensors do not exist.*import-official --sr"):
        load_sr(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="is a folder"):
        load_sr(tmp_path)


def test_another_architecture_is_named(tmp_path):
    from spandrel.architectures.Compact import Compact

    torch.save(Compact(num_feat=8, num_conv=2, upscale=2).state_dict(), tmp_path / "compact.pth")
    with pytest.raises(WeightsError, match=r"compact\.pth are not an RCAN state dict: spandrel detects a Compact"):
        load_sr(tmp_path / "compact.pth")


def test_unrecognised_state_dict(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3, 1, 1), "conv.bias": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="spandrel recognises no architecture in it"):
        load_sr(tmp_path / "other.pth")


def test_rcan_with_missing_tensors(tmp_path):
    sd = random_rcan(**FOREIGN[0]).state_dict()
    del sd["body.0.body.0.body.2.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"broken\.pth look like RCAN but do not load"):
        load_sr(tmp_path / "broken.pth")


class _Payload:
    """Unpickling this would create a file: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_arbitrary_objects_are_never_unpickled(tmp_path):
    marker = tmp_path / "was-unpickled"
    torch.save({"params": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match=r"evil\.pth hold more than tensors.*\(they reference .*\) and are not"):
        load_sr(tmp_path / "evil.pth")
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(WeightsError, match=r"tensor\.pth hold a Tensor, not a state dict"):
        load_sr(tmp_path / "tensor.pth")
    torch.save({"a": 1, "b": "x"}, tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match=r"plain\.pth are not a state dict of tensors"):
        load_sr(tmp_path / "plain.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match=r"junk\.pth are not a torch file"):
        load_sr(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match=r"junk\.safetensors are not a readable \.safetensors"):
        load_sr(tmp_path / "junk.safetensors")


# ----------------------------------------------------------------------------- config


def test_config_section(tiny_config_path):
    assert SRConfig() == SRConfig(checkpoint="", scale=2, n_resgroups=10, n_resblocks=20, n_feats=64, reduction=16)
    tiny = load_config(tiny_config_path).sr
    assert (tiny.checkpoint, tiny.scale, tiny.n_resgroups, tiny.n_resblocks, tiny.n_feats, tiny.reduction) == \
        ("", 2, 1, 1, 8, 4)
    with pytest.raises(ConfigError, match=r"sr\.reduction: must divide sr\.n_feats \(8\)"):
        load_config(tiny_config_path, ["sr.reduction=3"])
    with pytest.raises(ConfigError, match=r"sr\.scale: must be one of 2, 3, 4, 8"):
        load_config(tiny_config_path, ["sr.scale=5"])


# ----------------------------------------------------------------------------- g3dr import-official --sr


@pytest.mark.parametrize("arch", FOREIGN, ids=["x2-2g16f", "x4-1g8f"])
def test_import_official_sr(tmp_path, capsys, arch):
    from g3dr.launchers.main import main

    net = random_rcan(seed=2, **arch)
    torch.save({"params_ema": net.state_dict()}, tmp_path / "RCAN.pth")
    dst = tmp_path / "out" / "sr.safetensors"
    assert main(["import-official", "--sr", str(tmp_path / "RCAN.pth"), str(dst)]) == 0
    out = capsys.readouterr().out
    assert (f"detected RCAN x{arch['scale']}: {arch['n_resgroups']} residual groups x {arch['n_resblocks']} blocks, "
            f"{arch['n_feats']} features, channel-attention reduction {arch['reduction']}") in out
    printed = json.loads(out.split("architecture: ", 1)[1].splitlines()[0])
    assert {k: printed[k] for k in arch} == arch and printed["rgb_range"] == 255
    state, meta = read_state_dict(dst)
    assert meta["source"] == "import-official" and meta["imported_from"] == "RCAN.pth"
    assert len(meta["imported_sha256"]) == 64
    model = load_sr(dst)
    assert model.source == "import-official" and model.architecture == printed
    x = rgb(b=1, h=6, w=6, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_sr(net, x), rtol=0, atol=1e-6)


def test_import_official_sr_errors(tmp_path, capsys):
    from spandrel.architectures.Compact import Compact

    from g3dr.launchers.main import main

    torch.save(Compact(num_feat=8, num_conv=2, upscale=2).state_dict(), tmp_path / "compact.pth")
    dst = tmp_path / "sr.safetensors"
    assert main(["import-official", "--sr", str(tmp_path / "compact.pth"), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "compact.pth are not an RCAN state dict: spandrel detects a Compact" in err and "Traceback" not in err
    assert not dst.exists()
    net = random_rcan(**FOREIGN[0])
    torch.save(net.state_dict(), tmp_path / "rcan.pth")
    assert main(["import-official", "--sr", str(tmp_path / "rcan.pth"), str(tmp_path / "sr.pth")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert main(["import-official", "--sr", str(tmp_path / "rcan.pth"), str(dst), "model.base_width=8"]) == 2
    assert "with --sr give FILE and one output" in capsys.readouterr().err
    assert main(["import-official", "--sr", str(tmp_path / "rcan.pth"), "--allow-pickle", str(dst)]) == 2
    assert "--allow-pickle does not apply to --sr" in capsys.readouterr().err
    assert main(["import-official", "--sr", str(tmp_path / "missing.pth"), str(dst)]) == 2
    assert "missing.pth do not exist" in capsys.readouterr().err
    assert main(["import-official", str(tmp_path / "rcan.pth")]) == 2
    assert "give SRC DST" in capsys.readouterr().err


# ----------------------------------------------------------------------------- g3dr bench sr


def test_bench_sr_prints_one_json_line(tiny_config_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "g3dr.launchers.main", "bench", "sr", "--configs", "tiny", "--tiny-config",
                           str(tiny_config_path), "--resolution", "16", "--batch", "2", "--repeats", "2",
                           "--warmup", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["bench"] == "sr" and out["device"] == "cpu" and out["batch"] == 2 and out["input_resolution"] == 16
    assert "ru_maxrss" in out["memory_measure"] and set(out["cases"]) == {"tiny"}
    tiny = out["cases"]["tiny"]
    assert tiny["architecture"]["n_feats"] == 8 and tiny["output_resolution"] == 32
    assert tiny["params"] == sum(p.numel() for p in build_sr(TINY).parameters())
    assert tiny["images_per_s"] == pytest.approx(2 / tiny["s_per_batch"], rel=0.05)
    assert 0 < tiny["s_per_batch_best"] <= tiny["s_per_batch"] and tiny["peak_rss_mib"] > tiny["peak_mib"]
