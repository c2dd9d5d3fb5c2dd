"""``g3dr train-sr``: tiny real trainings of the super-resolution stage on the CPU (32 -> 64 px, a 5 k-parameter
RCAN on the renders of a tiny random-weight f_trigen, through the real DeepSpeed engine): the loss falls, resume
is exact, the export loads with ``load_sr``, and the errors are clear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from g3dr.config import load_config
from g3dr.errors import ConfigError, DataError, WeightsError
from g3dr.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Path:
    """A tiny f_trigen (the tiny config's, random weights, seeded) as a .safetensors file."""
    from g3dr.models.checkpoint_io import save_f_trigen
    from g3dr.models.f_trigen import FTrigen

    cfg = load_config("configs/tiny.yaml")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = FTrigen(cfg)
    return save_f_trigen(model, cfg, tmp_path_factory.mktemp("generator") / "f_trigen.safetensors", step=0,
                         source="test")


def _cfg(tmp_path: Path, name: str, generator: Path, *overrides: str):
    synth = tmp_path.parent / "synthetic-tiny-sr"  # shared by the tests of this module (written at 32 and 64 px)
    return load_config("configs/tiny.yaml", [f"run_dir={tmp_path / name}", f"data.synthetic_dir={synth}",
                                             f"sr.generator={generator}", "train.precision=fp32",
                                             "train.image_every=0", "train.log_every=1", *overrides])


def test_resume_is_exact_and_the_export_loads(tmp_path, generator):
    """4 steps straight vs 2 + resume: the same losses and weights bit for bit (the renderer's jitter and
    depth-prior draws come from the checkpointed RNG: the generator renders with renderer.deterministic=false)."""
    from mlflow.tracking import MlflowClient

    from g3dr.models.sr import load_sr
    from g3dr.train.checkpointer import export_checkpoint
    from g3dr.train.sr import SR_STAGE
    from g3dr.tracking import tracking_uri
    from g3dr.train.trainer import parameter_digest, train

    common = ["train.total_steps=4", "train.checkpoint_every=2"]
    straight = train(_cfg(tmp_path, "straight", generator, *common), stage=SR_STAGE)
    assert len(straight.losses) == 4 and all(torch.isfinite(torch.tensor(straight.losses)))
    assert straight.view_draws == []  # no Eq. 1 in this stage

    cfg = _cfg(tmp_path, "resumed", generator, *common)
    first = train(cfg, stop_at=2, export=False, stage=SR_STAGE)
    assert ckpt.read_meta(first.checkpoint)["client_state"]["stage"] == "sr"
    second = train(cfg, resume="auto", stage=SR_STAGE)
    assert second.start_step == 2 and second.step == 4 and second.run_id == first.run_id
    assert first.losses + second.losses == straight.losses  # exact, not approximate
    assert second.param_digest == straight.param_digest

    model = load_sr(second.export)
    assert second.export == tmp_path / "resumed" / "sr.safetensors"
    assert model.source == "train" and model.scale == 2 and parameter_digest(model) == straight.param_digest
    from safetensors import safe_open

    with safe_open(str(second.export), framework="pt") as f:
        meta = f.metadata()
    assert meta["step"] == "4" and meta["generator"] == str(generator) and meta["mlflow_run_id"] == first.run_id

    # g3dr export of an SR checkpoint writes an SR file (the stage recorded in the checkpoint), equal to the export.
    again = load_sr(export_checkpoint(tmp_path / "resumed" / "checkpoints" / "step-4"))
    assert parameter_digest(again) == straight.param_digest

    client = MlflowClient(tracking_uri(cfg))
    history = sorted(client.get_metric_history(first.run_id, "loss/total"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx(first.losses + second.losses, abs=1e-6)
    run = client.get_run(first.run_id).data
    assert run.tags["g3dr.stage"] == "sr" and "loss/sr/perceptual" in run.metrics and "loss/sr/l1" in run.metrics
    assert "canonical_fraction" not in run.metrics


class RepeatFirst:
    """The first batch of the real loader (with its 64 px target), forever (an overfitting check)."""

    def __init__(self, cfg, dist):
        from g3dr.data import build_train_loader
        from g3dr.data.loader import ensure_synthetic

        ensure_synthetic(cfg, target_resolution=64)
        loader = build_train_loader(cfg, dist, target_resolution=64)
        self.batch = next(iter(loader))
        loader.close()

    def __iter__(self):
        while True:
            yield self.batch


class InputAsRender(torch.nn.Module):
    """A stand-in f_trigen whose canonical render is its input image (the 32 px picture)."""

    def forward(self, rgb, depth, cam2world, canonical, generator=None):
        return {"rgb": rgb}


def test_training_a_tiny_rcan_lowers_its_loss(tmp_path, generator, monkeypatch):
    """The renders of a random f_trigen carry almost nothing of its input (the L1 floor, ~0.27, is reached in three
    steps), so this overfitting check feeds the input image as the render: the RCAN then learns real 32 -> 64 px
    super-resolution of one batch."""
    import g3dr.train.sr as sr
    from g3dr.train.trainer import train

    monkeypatch.setattr(sr, "load_generator", lambda cfg, device: (InputAsRender(), cfg))
    # Perceptual off: the tiny critics are random.
    cfg = _cfg(tmp_path, "fit", generator, "train.total_steps=12", "train.warmup_steps=0", "train.lr=3e-3",
               "train.lr_min=3e-3", "train.micro_batch_size=4", "train.global_batch_size=4",
               "sr.loss.perceptual=0.0", "train.checkpoint_every=100")
    result = train(cfg, build_loader=RepeatFirst, export=False, stage=sr.SR_STAGE)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    print(f"SR L1: first 3 steps {first:.4f}, last 3 steps {last:.4f}")  # measured: 0.271 -> 0.136
    assert last < 0.7 * first


def test_clear_errors(tmp_path, generator):
    from g3dr.train.sr import SR_STAGE
    from g3dr.train.trainer import train

    with pytest.raises(ConfigError, match="sr.generator is empty"):
        train(_cfg(tmp_path, "a", ""), stage=SR_STAGE)
    with pytest.raises(WeightsError, match=r"sr.generator: checkpoint .*missing.safetensors does not exist"):
        train(_cfg(tmp_path, "b", tmp_path / "missing.safetensors"), stage=SR_STAGE)
    with pytest.raises(ConfigError, match="renders at data.resolution=32, but this run has data.resolution=64"):
        train(_cfg(tmp_path, "c", generator, "data.resolution=64", "renderer.plane_resolutions=[64,32,16]"),
              stage=SR_STAGE)
    # Shards holding only the input size: the error names the command that writes both.
    from g3dr.data.synth import write_synthetic_shards

    small = tmp_path / "shards-32"
    write_synthetic_shards(str(small), 4, (32,), seed=5, shard_size=2, progress=False)
    with pytest.raises(DataError, match=r"never upsampled.*g3dr prep shards \.\.\. --resolution 32 64"):
        train(_cfg(tmp_path, "d", generator, "data.source=shards", f"data.shards={small}"), stage=SR_STAGE)


def test_a_checkpoint_of_another_stage_is_refused(tmp_path, generator):
    from g3dr.train.sr import SR_STAGE
    from g3dr.train.trainer import train

    synth = f"data.synthetic_dir={tmp_path / 'synthetic-32'}"  # g3dr train writes its set at 32 px only
    train(load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'f'}", "train.total_steps=1", synth,
                                            "train.image_every=0"]), export=False)
    with pytest.raises(ConfigError, match="checkpoint of the f_trigen stage, not of sr"):
        train(_cfg(tmp_path, "f", generator), resume="auto", stage=SR_STAGE)
    train(_cfg(tmp_path, "s", generator, "train.total_steps=1"), export=False, stage=SR_STAGE)
    with pytest.raises(ConfigError, match="checkpoint of the sr stage, not of f_trigen"):
        train(load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 's'}", synth]), resume="auto")


@pytest.mark.slow
def test_cli_trains_then_resume_auto_continues(tmp_path, generator, repo_root):
    """``g3dr train-sr`` as a user runs it (two processes: the CLI ends its process group on exit)."""
    import os
    import subprocess
    import sys

    from g3dr.models.sr import load_sr

    g3dr = str(Path(sys.executable).parent / "g3dr")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [g3dr, "train-sr", "--config", "configs/tiny.yaml", "--no-progress"]
    overrides = [f"run_dir={tmp_path / 'cli'}", f"data.synthetic_dir={tmp_path.parent / 'synthetic-tiny-sr'}",
                 f"sr.generator={generator}", "train.image_every=2", "train.checkpoint_every=2"]
    first = subprocess.run([*command, *overrides, "train.total_steps=2"], cwd=repo_root, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run([*command, "--resume", "auto", *overrides, "train.total_steps=3"], cwd=repo_root, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {tmp_path / 'cli' / 'checkpoints' / 'step-2'} at step 2" in again.stderr
    assert "g3dr.train: step 3/3 | sr/l1 " in again.stderr and "| sr/perceptual " in again.stderr
    assert ckpt.step_of(ckpt.find_latest(tmp_path / "cli" / "checkpoints")) == 3
    assert load_sr(tmp_path / "cli" / "sr.safetensors").source == "train"
