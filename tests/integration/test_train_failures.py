"""Failure paths of a long run, on tiny real trainings (the tiny config, a few steps, one CPU process):
rollbacks, damaged checkpoints, a run folder deleted mid-run, resuming at or past the end.

Read-only folders and full disks are in ``test_train_outputs.py`` (they need a private mount namespace).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from g3dr.config import load_config
from g3dr.train import checkpoint as ckpt

DETERMINISTIC = ["train.precision=fp32", "renderer.deterministic=true", "renderer.impl=reference", "train.image_every=0"]


def _cfg(tmp_path: Path, name: str, *overrides: str):
    synth = tmp_path.parent / "synthetic-tiny-failures"  # shared by the tests of this module
    return load_config("configs/tiny.yaml", [f"run_dir={tmp_path / name}", f"data.synthetic_dir={synth}",
                                             "train.log_every=1", *DETERMINISTIC, *overrides])


def _history(cfg, run_id: str, key: str = "loss/total") -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    from g3dr.tracking import tracking_uri

    return {m.step: m.value for m in MlflowClient(tracking_uri(cfg)).get_metric_history(run_id, key)}


def test_rollback_then_resume_auto_follows_latest_and_forks_the_mlflow_run(tmp_path):
    """Roll back to step-2 of a 6-step run, save again at 4, and requeue with --resume auto: the new step-4 is
    resumed (not the abandoned step-6), the abandoned checkpoints are set aside, and the MLflow curves of the new
    lineage hold no step of the abandoned stretch."""
    from mlflow.tracking import MlflowClient

    from g3dr.tracking import tracking_uri
    from g3dr.train.trainer import train

    cfg = _cfg(tmp_path, "run", "train.total_steps=6", "train.checkpoint_every=2", "train.keep_last=5")
    first = train(cfg, export=False)
    root = tmp_path / "run" / "checkpoints"
    assert [ckpt.step_of(p) for p in ckpt.list_complete(root)] == [2, 4, 6]

    rolled = train(cfg, resume=str(root / "step-2"), stop_at=4, export=False)  # roll back past steps 3-6
    assert rolled.run_id != first.run_id  # the MLflow run forked
    assert sorted(p.name for p in (root / "set-aside").iterdir()) == ["step-4.abandoned", "step-6.abandoned"]
    assert rolled.start_step == 2 and rolled.abandoned == ["step-4", "step-6"]
    new_four = root / "step-4"
    meta = ckpt.read_meta(new_four)
    assert meta["parent"] == "step-2" and meta["client_state"]["mlflow_run_id"] == rolled.run_id

    requeued = train(cfg, resume="auto")  # a SLURM requeue
    assert requeued.start_step == 4 and requeued.step == 6  # the new step-4, not the abandoned step-6
    assert requeued.run_id == rolled.run_id
    assert [ckpt.step_of(p) for p in ckpt.list_complete(root)] == [2, 4, 6]
    assert ckpt.read_meta(root / "step-6")["parent"] == "step-4"
    # The rollback resumed exactly: the new lineage repeats the straight run's losses.
    assert rolled.losses + requeued.losses == pytest.approx(first.losses[2:], abs=1e-6, rel=0)

    client = MlflowClient(tracking_uri(cfg))
    assert sorted(_history(cfg, first.run_id)) == [1, 2, 3, 4, 5, 6]  # the old run keeps what it logged ...
    assert sorted(_history(cfg, rolled.run_id)) == [3, 4, 5, 6]  # ... the new one only its own steps
    old_tags, new_tags = client.get_run(first.run_id).data.tags, client.get_run(rolled.run_id).data.tags
    assert old_tags["g3dr.abandoned_after_step"] == "2" and old_tags["g3dr.continued_in"] == rolled.run_id
    assert new_tags["g3dr.forked_from_run"] == first.run_id and new_tags["g3dr.forked_at_step"] == "2"
    assert new_tags["mlflow.parentRunId"] == first.run_id
    assert client.get_run(rolled.run_id).info.run_name == "run-from-step-2"


def test_a_truncated_newest_checkpoint_is_set_aside_and_resume_auto_takes_the_previous(tmp_path, caplog):
    from g3dr.train.trainer import train

    common = ["train.total_steps=4", "train.checkpoint_every=2"]
    straight = train(_cfg(tmp_path, "run", *common), stop_at=4, export=False)
    root = tmp_path / "run" / "checkpoints"
    model_states = root / "step-4" / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:1000])

    with caplog.at_level(logging.ERROR, logger="g3dr"):
        resumed = train(_cfg(tmp_path, "run", *common), resume="auto", export=False)
    assert "mp_rank_00_model_states.pt: 1000 bytes" in caplog.text
    assert resumed.start_step == 2 and resumed.step == 4
    assert resumed.losses == pytest.approx(straight.losses[2:], abs=1e-6, rel=0)
    assert (root / "set-aside" / "step-4.corrupt" / "mp_rank_00_model_states.pt").stat().st_size == 1000
    assert ckpt.verify_checkpoint(root / "step-4") == []  # the new step-4

    # An explicit path to a damaged checkpoint is a one-line error, not a traceback from DeepSpeed.
    from g3dr.errors import WeightsError

    (root / "step-2" / "rank-0.pt").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"step-2: the checkpoint is damaged: rank-0.pt: 0 bytes"):
        train(_cfg(tmp_path, "run", *common), resume=str(root / "step-2"), export=False)


def test_resuming_at_or_past_total_steps_trains_nothing_and_leaves_the_config(tmp_path, caplog):
    from g3dr.errors import ConfigError
    from g3dr.train.trainer import train

    cfg = _cfg(tmp_path, "run", "train.total_steps=2", "train.checkpoint_every=2")
    done = train(cfg)
    config_yaml = tmp_path / "run" / "config.yaml"
    saved = config_yaml.read_text()
    stamp = config_yaml.stat().st_mtime_ns
    (tmp_path / "run" / "f_trigen.safetensors").unlink()  # as if the job was stopped before its export

    with pytest.raises(ConfigError, match=r"step-2 is at step 2, past train.total_steps=1: nothing was trained and "
                                          r".*config.yaml was left as it was"):
        train(_cfg(tmp_path, "run", "train.total_steps=1"), resume="auto")
    with caplog.at_level(logging.WARNING, logger="g3dr"):
        again = train(cfg, resume="auto")
    assert again.already_finished and again.step == 2 and again.losses == [] and again.run_id == done.run_id
    assert "nothing to train" in caplog.text
    assert config_yaml.read_text() == saved and config_yaml.stat().st_mtime_ns == stamp
    assert again.export is not None and again.export.is_file()  # the missing export of the final checkpoint

    # Raising total_steps trains further, with a warning that the schedules move.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="g3dr"):
        longer = train(_cfg(tmp_path, "run", "train.total_steps=4", "train.checkpoint_every=2"), resume="auto",
                       export=False)
    assert longer.start_step == 2 and longer.step == 4
    assert "train.total_steps changed from 2 to 4 on resume at step 2" in caplog.text
    assert "the LR at step 2" in caplog.text


class _Batches:
    """Fixed random RGB-D micro-batches of 2 at 32 px; calls ``after(i)`` after yielding batch ``i``."""

    def __init__(self, after):
        g = torch.Generator().manual_seed(3)
        self.rgb = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        self.depth = 4.5 + torch.rand(2, 1, 32, 32, generator=g)
        self.after = after

    def __iter__(self):
        i = 0
        while True:
            yield {"rgb": self.rgb, "depth": self.depth, "label": torch.zeros(2, dtype=torch.long), "key": ["a", "b"]}
            self.after(i)
            i += 1


def test_a_run_folder_deleted_during_training_stops_with_a_clear_error(tmp_path):
    from g3dr.errors import OutputError
    from g3dr.train.trainer import train

    run_dir = tmp_path / "run"

    def delete_after_the_second_batch(i):  # called when step 3 asks for its batch
        if i == 1:
            # Moved away first, in one step: the run's MLflow queue may still be writing mlflow.db's journal into
            # it, and a plain rmtree racing that write fails with "directory not empty" (seen in CI).
            gone = tmp_path / "deleted-run"
            run_dir.rename(gone)
            shutil.rmtree(gone, ignore_errors=True)

    cfg = _cfg(tmp_path, "run", "train.total_steps=6", "train.checkpoint_every=4")
    with pytest.raises(OutputError, match=r"the run folder .*run was deleted or moved during training \(config.yaml or "
                                          r"checkpoints/ is gone\) at step 3; stopping"):
        train(cfg, build_loader=lambda c, d: _Batches(delete_after_the_second_batch))
    assert not run_dir.exists()  # not silently recreated by a later save
