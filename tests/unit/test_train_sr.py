"""The super-resolution stage's pieces (``g3dr/train/sr.py``): the task's loss and gradients, the critics at the
target size (LPIPS-VGG16 at 256 px), the config keys and their checks, the training grid, the submit job."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from g3dr.config import load_config
from g3dr.errors import ConfigError, WeightsError


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory) -> Path:
    from g3dr.models.checkpoint_io import save_f_trigen
    from g3dr.models.f_trigen import FTrigen

    cfg = load_config("configs/tiny.yaml")
    torch.manual_seed(3)
    return save_f_trigen(FTrigen(cfg), cfg, tmp_path_factory.mktemp("gen") / "f_trigen.safetensors", source="test")


def _cfg(generator_file: Path, *overrides: str):
    return load_config("configs/tiny.yaml", [f"sr.generator={generator_file}", *overrides])


def _batch(n: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"rgb": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, "depth": 4.5 + torch.rand(n, 1, 32, 32, generator=g),
            "rgb_target": torch.rand(n, 3, 64, 64, generator=g) * 2 - 1}


def test_task_loss_is_l1_plus_half_lpips_of_the_sr_output_and_trains_only_the_sr_network(generator_file):
    from g3dr.losses import build_critics, l1_loss
    from g3dr.models.sr import build_sr
    from g3dr.train.sr import SRTask, load_generator, render_canonical

    cfg = _cfg(generator_file, "renderer.deterministic=true")
    generator, g_cfg = load_generator(cfg, torch.device("cpu"))
    assert not generator.training and not any(p.requires_grad for p in generator.parameters())
    assert g_cfg.renderer.deterministic  # this run's render settings reach the frozen f_trigen
    critics = build_critics(cfg.loss, "cpu", torch.float32, 64)
    torch.manual_seed(1)
    sr = build_sr(cfg.sr)
    task = SRTask(cfg, generator, g_cfg, critics)
    batch = _batch()
    loss, report = task(sr, batch, step=0)

    # An independent recomputation of the same objective.
    render = render_canonical(generator, g_cfg, batch["rgb"], batch["depth"])
    out = sr(render, clamp=False)
    assert out.shape == (2, 3, 64, 64)
    l1, lpips = l1_loss(out, batch["rgb_target"]), critics.vgg(out, batch["rgb_target"], (1.0,) * 5)
    assert float(loss) == pytest.approx(float(l1 + 0.5 * lpips), rel=1e-6)
    assert report["loss/sr/l1"] == pytest.approx(float(l1), rel=1e-6)
    assert report["loss/sr/perceptual"] == pytest.approx(float(lpips), rel=1e-6)
    assert report["weight/sr/l1"] == 1.0 and report["weight/sr/perceptual"] == 0.5
    assert "view_r" not in report and "canonical" not in report
    assert report["images"]["sr"].shape == (2, 3, 64, 64) and report["images"]["render"].shape == (2, 3, 32, 32)

    loss.backward()
    trainable = [p for p in sr.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert any(float(p.grad.abs().max()) > 0 for p in trainable)
    assert all(p.grad is None for p in generator.parameters())

    with pytest.raises(ValueError, match="rgb_target"):
        task(sr, {"rgb": batch["rgb"], "depth": batch["depth"]}, step=0)


def test_weights_follow_their_schedules_and_a_zero_term_is_not_computed(generator_file):
    from g3dr.losses import build_critics
    from g3dr.models.sr import build_sr
    from g3dr.train.sr import SRTask, load_generator

    cfg = _cfg(generator_file, "sr.loss.perceptual={knots: [[0, 0], [10, 1]]}", "sr.loss.l1=2", "train.total_steps=20")
    generator, g_cfg = load_generator(cfg, torch.device("cpu"))
    task = SRTask(cfg, generator, g_cfg, build_critics(cfg.loss, "cpu", torch.float32, 64))
    assert task.weights_at(0) == {"l1": 2.0, "perceptual": 0.0} and task.weights_at(5)["perceptual"] == 0.5
    _, report = task(build_sr(cfg.sr), _batch(), step=0)
    assert "loss/sr/perceptual" not in report and report["loss/total"] == pytest.approx(2 * report["loss/sr/l1"])


def test_the_perceptual_critic_takes_the_target_size():
    """LPIPS on VGG16 (the pretrained critic's architecture, random weights here) at 256 px, the paper's SR size:
    five taps down to 16 px, zero for identical images, finite gradients."""
    from timm.models.vgg import VGG, cfgs

    from g3dr.losses.critics import VggCritic

    torch.manual_seed(0)
    vgg = VggCritic(VGG(cfgs["vgg16"], num_classes=0, mlp_ratio=1 / 512).features)
    image = (torch.rand(1, 3, 256, 256) * 2 - 1).requires_grad_(True)
    target = torch.rand(1, 3, 256, 256) * 2 - 1
    assert [f.shape[-1] for f in vgg.layer_features(target)] == [256, 128, 64, 32, 16]
    assert float(vgg(target, target)) == 0.0
    distance = vgg(image, target)
    distance.backward()
    assert float(distance) > 0 and torch.isfinite(image.grad).all() and float(image.grad.abs().max()) > 0


def test_the_stage_builds_its_critics_for_the_target_size(generator_file, monkeypatch):
    import g3dr.losses as losses
    from g3dr.train.sr import SR_STAGE

    sizes = []
    real = losses.build_critics

    def spy(loss_cfg, device, dtype, image_resolution=None):
        sizes.append(image_resolution)
        return real(loss_cfg, device, dtype, image_resolution)

    monkeypatch.setattr(losses, "build_critics", spy)
    SR_STAGE.build_task(_cfg(generator_file, "sr.scale=4"), torch.device("cpu"), torch.float32)
    assert sizes == [128]  # sr.scale x data.resolution, not data.resolution


def test_config_checks(generator_file, tmp_path):
    from g3dr.losses import build_critics
    from g3dr.train.sr import SRTask, check_sr_config, load_generator

    check_sr_config(_cfg(generator_file))
    with pytest.raises(ConfigError, match="sr.generator is empty.*sr.generator=outputs/run/f_trigen.safetensors"):
        check_sr_config(load_config("configs/tiny.yaml"))
    with pytest.raises(WeightsError, match="sr.generator: checkpoint .*nope.safetensors does not exist"):
        check_sr_config(_cfg(tmp_path / "nope.safetensors"))
    not_f_trigen = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(not_f_trigen))
    with pytest.raises(WeightsError, match="sr.generator: .*not a g3dr f_trigen checkpoint"):
        check_sr_config(_cfg(not_f_trigen))
    with pytest.raises(ConfigError, match="renders at data.resolution=32, but this run has data.resolution=64"):
        check_sr_config(_cfg(generator_file, "data.resolution=64", "renderer.plane_resolutions=[64,32,16]"))
    with pytest.raises(ConfigError, match="both 0 at every step"):
        check_sr_config(_cfg(generator_file, "sr.loss.l1=0", "sr.loss.perceptual=0"))
    with pytest.raises(ConfigError, match=r"sr.loss.l1.knots: weights must be >= 0"):
        _cfg(generator_file, "sr.loss.l1=-1")
    with pytest.raises(ConfigError, match="unknown key 'sr.loss.clip'"):
        _cfg(generator_file, "sr.loss.clip=0.35")
    cfg = _cfg(generator_file, "sr.loss.perceptual={knots: [[0, 0.5]], layers: [1, 1]}")
    generator, g_cfg = load_generator(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="sr.loss.perceptual.layers has 2 block weights, the perceptual critic has 5"):
        SRTask(cfg, generator, g_cfg, build_critics(cfg.loss, "cpu", torch.float32, 64))


def test_training_grid_shows_every_column_at_the_target_size():
    from g3dr.assets.sheet import HEADER_PX
    from g3dr.train.sr import GRID_COLUMNS, sr_image_grid

    b = _batch(3)
    images = {"input": b["rgb"], "render": b["rgb"] * 0.5, "sr": b["rgb_target"] * 0.5, "target": b["rgb_target"]}
    grid = sr_image_grid(images)
    assert grid.dtype.name == "uint8" and grid.shape == (HEADER_PX + 3 * 65 + 1, len(GRID_COLUMNS) * 65 + 1, 3)
    # The first tile is the input by pixel repetition: its 2 x 2 blocks are constant.
    tile = grid[HEADER_PX + 1:HEADER_PX + 65, 1:65].astype(int)
    assert (tile[0::2, 0::2] == tile[1::2, 1::2]).all()


def test_submit_job_runs_train_sr_and_requeues_itself():
    from g3dr.launchers.jobs import train_job

    job = train_job("configs/tiny.yaml", ["sr.generator=g.safetensors"], "train-sr")
    assert job.stage == "sr" and job.config == load_config("configs/tiny.yaml", ["sr.generator=g.safetensors"])
    again = pickle.loads(pickle.dumps(job))
    requeued = again.checkpoint().function
    assert (requeued.config, requeued.stage) == (job.config, job.stage) and again.name == "train-sr"
    with pytest.raises(ValueError, match="g3dr train or g3dr train-sr"):
        train_job("configs/tiny.yaml", [], "eval")
