"""Checkpoint names, completeness, lineage (rollbacks), verification, failed saves, pruning and the derived
DeepSpeed config."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch

from g3dr.config import load_config
from g3dr.errors import ConfigError, OutputError, WeightsError
from g3dr.train import checkpoint as ckpt
from g3dr.train.ds_config import deepspeed_config


class FileEngine:
    """Stand-in for a DeepSpeed engine: writes one file per save, like DeepSpeed's tag directory."""

    def __init__(self, fail_at: int | None = None, error: BaseException | None = None):
        self.fail_at = fail_at
        self.error = error or KeyboardInterrupt("killed mid-write")

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # the checkpoint module owns `latest`
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"client": client_state, "weights": torch.arange(64.0)},
                   Path(save_dir) / tag / "mp_rank_00_model_states.pt")
        if self.fail_at is not None and client_state["step"] == self.fail_at:
            raise self.error


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
    from g3dr.distributed import init_process_group

    with pytest.raises(ConfigError, match="zero_stage=1 or 2"):
        deepspeed_config(load_config("configs/tiny.yaml", ["train.precision=bf16", "train.zero_stage=0"]), 1, "cpu")
    for stage in (1, 2):
        cfg = load_config("configs/tiny.yaml", ["train.precision=bf16", f"train.zero_stage={stage}",
                                                "train.global_batch_size=4"])
        init_process_group(DistEnv(), "cpu", cfg.distributed.backend, cfg.distributed.timeout_minutes, via="deepspeed")
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


# --------------------------------------------------------------------------------------------------
# Lineage: a rollback is followed, abandoned checkpoints are never loaded or kept over newer work
# --------------------------------------------------------------------------------------------------


def test_resume_auto_follows_latest_not_the_highest_step(tmp_path):
    """`latest` is the truth: after a rollback to step-20 and a new save at 25, `--resume auto` takes step-25, not
    the abandoned step-40, and keep_last prunes the lineage, never the new checkpoint."""
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        _save(root, step, keep=10)
    (root / "latest").write_text("step-20\n")  # the run was rolled back to step-20 ...
    _save(root, 25, keep=2)  # ... and saved again (keep_last=2)
    assert ckpt.read_meta(root / "step-25")["parent"] == "step-20"
    assert ckpt.find_latest(root) == root / "step-25"
    assert ckpt.resolve_resume("auto", tmp_path) == root / "step-25"
    names = [p.name for p in ckpt.list_complete(root)]
    assert "step-25" in names and "step-20" in names and "step-10" not in names  # pruned within the lineage
    # Resuming sets the abandoned stretch aside (never deleted), so nothing newer than the head is left in root.
    assert ckpt.set_aside_newer(root, root / "step-25") == ["step-30", "step-40"]
    assert [p.name for p in ckpt.list_complete(root)] == ["step-20", "step-25"]
    assert sorted(p.name for p in (root / "set-aside").iterdir()) == ["step-30.abandoned", "step-40.abandoned"]
    assert (root / "set-aside" / "step-40.abandoned" / "mp_rank_00_model_states.pt").is_file()


def test_rollback_sets_newer_checkpoints_aside_and_new_saves_of_those_steps_are_written(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        _save(root, step, keep=10)
    chosen = ckpt.resolve_resume(str(root / "step-20"), tmp_path)
    assert ckpt.set_aside_newer(root, chosen) == ["step-30", "step-40"]
    assert (root / "latest").read_text().strip() == "step-20"
    assert ckpt.resolve_resume("auto", tmp_path) == root / "step-20"  # a requeue before the next save
    new = _save(root, 30, keep=10)  # the new step-30 is saved, not mistaken for the abandoned one
    assert ckpt.read_meta(new)["parent"] == "step-20"
    assert ckpt.find_latest(root) == new
    assert (root / "set-aside" / "step-30.abandoned" / "meta.json").is_file()
    note = (root / "set-aside" / "step-30.abandoned" / ckpt.SET_ASIDE_NOTE).read_text()
    assert "step-20" in note


def test_a_save_killed_between_its_rename_and_latest_is_still_the_head(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 10)
    _save(root, 20)
    (root / "latest").write_text("step-10\n")  # killed after renaming step-20 into place, before `latest`
    assert ckpt.find_latest(root) == root / "step-20"  # its meta.json names step-10 as its parent


# --------------------------------------------------------------------------------------------------
# Verification: a damaged newest checkpoint is set aside and the previous one taken
# --------------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated model states": ("mp_rank_00_model_states.pt", _truncate),
    "truncated rank state": ("rank-0.pt", _truncate),
    "empty meta.json": ("meta.json", lambda p: p.write_text("")),
    "one byte changed, same size": ("mp_rank_00_model_states.pt", _flip_a_byte),
    "a file deleted": ("rank-0.pt", Path.unlink),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_is_set_aside_and_auto_takes_the_previous_one(tmp_path, caplog, damage):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _save(root, step)
    name, spoil = DAMAGES[damage]
    spoil(root / "step-30" / name)
    with caplog.at_level(logging.ERROR, logger="g3dr"):
        assert ckpt.resolve_resume("auto", tmp_path) == root / "step-20"
    assert name in caplog.text and "set aside" in caplog.text  # the log names the bad file
    aside = root / "set-aside" / "step-30.corrupt"
    assert aside.is_dir() and not (root / "step-30").exists()  # set aside, never deleted
    assert name in (aside / ckpt.SET_ASIDE_NOTE).read_text()
    assert (root / "latest").read_text().strip() == "step-20"
    assert ckpt.verify_checkpoint(root / "step-20") == []
    # Every later requeue resumes at once: the damaged folder is out of the way.
    assert ckpt.resolve_resume("auto", tmp_path) == root / "step-20"


def test_every_checkpoint_damaged_is_a_fresh_start_for_auto(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 10)
    _truncate(root / "step-10" / "mp_rank_00_model_states.pt")
    assert ckpt.resolve_resume("auto", tmp_path) is None
    assert (root / "set-aside" / "step-10.corrupt").is_dir() and not (root / "latest").exists()


def test_explicit_resume_of_a_damaged_checkpoint_is_a_one_line_error(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 10)
    _save(root, 20)
    _truncate(root / "step-20" / "mp_rank_00_model_states.pt")
    with pytest.raises(WeightsError, match=r"--resume .*step-20: the checkpoint is damaged: "
                                           r"mp_rank_00_model_states.pt: \d+ bytes") as err:
        ckpt.resolve_resume(str(root / "step-20"), tmp_path)
    assert "\n" not in str(err.value)
    assert (root / "step-20").is_dir()  # an explicit choice is not moved


def test_checkpoints_without_recorded_sums_get_structural_checks(tmp_path):
    """Checkpoints saved before sizes and sums were recorded still load; an empty model file is caught."""
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        path = _save(root, step)
        meta = ckpt.read_meta(path)
        del meta["files"], meta["parent"]
        (path / "meta.json").write_text(json.dumps(meta))
    assert ckpt.verify_checkpoint(root / "step-20") == []
    (root / "step-20" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert ckpt.resolve_resume("auto", tmp_path) == root / "step-10"


# --------------------------------------------------------------------------------------------------
# A save that fails (disk full, read-only) is a clear error and keeps the previous checkpoint
# --------------------------------------------------------------------------------------------------


def test_a_save_that_fails_for_lack_of_space_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 10)
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OutputError, match=r"saving checkpoint step-20 to .* failed on rank 0: the disk is full"
                                          r".*ENOSPC.*the previous checkpoint .*step-10 is intact.*--resume auto"):
        _save(root, 20, FileEngine(fail_at=20, error=full))
    assert not (root / "step-20.partial").exists()  # its space is given back
    assert ckpt.find_latest(root) == root / "step-10" and ckpt.verify_checkpoint(root / "step-10") == []
    # An error that is not the disk's stays what it is (with its traceback).
    with pytest.raises(ValueError):
        _save(root, 20, FileEngine(fail_at=20, error=ValueError("a bug")))


def test_a_run_folder_deleted_during_training_is_not_recreated_by_a_save(tmp_path):
    import shutil

    root = tmp_path / "run" / "checkpoints"
    root.parent.mkdir()
    _save(root, 1)
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(OutputError, match="parent folder does not exist"):
        _save(root, 2)
    assert not (tmp_path / "run").exists()
