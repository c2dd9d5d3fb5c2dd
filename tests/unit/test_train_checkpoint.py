"""Checkpoint names, completeness, find_latest, pruning and the derived DeepSpeed config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from g3dr.config import load_config
from g3dr.errors import ConfigError
from g3dr.train import checkpoint as ckpt
from g3dr.train.ds_config import deepspeed_config


class FileEngine:
    """Stand-in for a DeepSpeed engine: writes one file per save, like DeepSpeed's tag directory."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # the checkpoint module owns `latest`
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"client": client_state}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")
        if self.fail_at is not None and client_state["step"] == self.fail_at:
            raise KeyboardInterrupt("killed mid-write")


def _save(root, step, engine=None, keep=3):
    return ckpt.save_checkpoint(engine or FileEngine(), root, step, {"step": step}, {"rng": ckpt.rng_state()},
                                rank=0, world_size=1, keep_last=keep)


def test_names_and_completeness(tmp_path):
    assert ckpt.checkpoint_name(120) == "step-120"
    assert ckpt.step_of("a/step-120") == 120 and ckpt.step_of("step-120.partial") is None
    root = tmp_path / "checkpoints"
    assert ckpt.find_latest(root) is None
    path = _save(root, 5)
    assert path == root / "step-5" and ckpt.is_complete(path)
    assert ckpt.read_meta(path)["client_state"] == {"step": 5}
    assert (root / "latest").read_text().strip() == "step-5"
    assert (path / "rank-0.pt").is_file()


def test_kill_mid_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 10)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 20, FileEngine(fail_at=20))
    assert (root / "step-20.partial").is_dir() and not (root / "step-20").exists()
    assert ckpt.find_latest(root) == root / "step-10"
    assert ckpt.resolve_resume("auto", tmp_path) == root / "step-10"
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(root / "step-20.partial"), tmp_path)
    # A later save of the same step replaces the partial directory; stale partials are pruned.
    _save(root, 20)
    _save(root, 30)
    assert not (root / "step-20.partial").exists()
    assert ckpt.find_latest(root) == root / "step-30"


def test_directory_without_meta_is_not_complete(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    (root / "step-9").mkdir()  # e.g. copied by hand, or a foreign tool
    assert ckpt.find_latest(root) == root / "step-1"


def test_keep_last_k(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        _save(root, step, keep=2)
    assert [p.name for p in ckpt.list_complete(root)] == ["step-4", "step-5"]
    assert ckpt.resolve_resume(None, tmp_path) is None


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = torch.rand(3)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_deepspeed_config_is_derived():
    cfg = load_config("configs/imagenet128.yaml", ["train.global_batch_size=64", "train.micro_batch_size=8", "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=4, device_type="cuda")
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["bf16"] == {"enabled": True} and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.99] and ds["optimizer"]["params"]["torch_adam"] is False
    assert deepspeed_config(cfg, 4, "cpu")["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(ConfigError, match="not divisible"):
        deepspeed_config(cfg, world_size=3, device_type="cuda")


def test_deepspeed_accepts_the_bf16_config_with_fp32_accumulation():
    """The derived config builds real engines: bf16 weights, fp32 gradient accumulation, ZeRO 1 and 2."""
    import deepspeed

    from g3dr.distributed import DistEnv
    from g3dr.train.trainer import init_process_group

    with pytest.raises(ConfigError, match="zero_stage=1 or 2"):
        deepspeed_config(load_config("configs/tiny.yaml", ["train.precision=bf16", "train.zero_stage=0"]), 1, "cpu")
    for stage in (1, 2):
        cfg = load_config("configs/tiny.yaml", ["train.precision=bf16", f"train.zero_stage={stage}",
                                                "train.global_batch_size=4"])
        init_process_group(cfg, DistEnv(), torch.device("cpu"))
        model = torch.nn.Linear(4, 3)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                       config=deepspeed_config(cfg, 1, "cpu"), dist_init_required=False)
        assert engine.get_data_types() == (torch.bfloat16, torch.float32)
        assert engine.gradient_accumulation_steps() == 2
        for _ in range(2):
            loss = engine(torch.randn(2, 4, dtype=torch.bfloat16)).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        assert engine.global_steps == 1
        assert next(engine.module.parameters()).dtype == torch.bfloat16
