"""Two real ranks (torchrun, gloo, ZeRO-2) train the tiny config for a few steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = '''
import json, sys
from g3dr.config import load_config
from g3dr.distributed import resolve_dist_env, shutdown_process_group
from g3dr.log import setup_logging
from g3dr.train.trainer import train

setup_logging("INFO")
out, overrides = sys.argv[1], sys.argv[2:]
result = train(load_config("configs/tiny.yaml", overrides))
rank = resolve_dist_env().rank
with open(f"{out}/rank-{rank}.json", "w") as f:
    json.dump({"digest": result.param_digest, "draws": result.view_draws, "losses": result.losses,
               "run_id": result.run_id, "step": result.step,
               "export": str(result.export) if result.export else None}, f)
shutdown_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_train_with_zero2(tmp_path, repo_root):
    from mlflow.tracking import MlflowClient

    from g3dr.config import load_config
    from g3dr.train import checkpoint as ckpt
    from g3dr.tracking import tracking_uri

    torchrun = Path(sys.executable).parent / "torchrun"
    (tmp_path / "worker.py").write_text(WORKER)
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", f"data.synthetic_dir={tmp_path}/synthetic", "train.zero_stage=2",
                 "train.micro_batch_size=2", "train.global_batch_size=4", "train.total_steps=3",
                 "train.checkpoint_every=3", "train.image_every=3", "train.log_every=1",
                 "loss.tau=1.0"]  # Eq. 1 then makes step 2 (of 0..2) a novel view on every micro-batch
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(tmp_path / "worker.py"), str(tmp_path), *overrides]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert all(x == x and abs(x) < 1e6 for r in ranks for x in r["losses"])  # finite
    assert ranks[0]["digest"] == ranks[1]["digest"]  # replicas agree after ZeRO-2 steps
    assert ranks[0]["draws"] != ranks[1]["draws"]  # per-rank randomness differs
    assert ranks[1]["run_id"] is None and ranks[1]["export"] is None  # only rank 0 tracks and exports
    final = ckpt.find_latest(run_dir / "checkpoints")
    assert final is not None and ckpt.step_of(final) == 3
    assert (final / "rank-0.pt").is_file() and (final / "rank-1.pt").is_file()
    assert ckpt.read_meta(final)["world_size"] == 2
    assert Path(ranks[0]["export"]).is_file()
    cfg = load_config("configs/tiny.yaml", overrides)
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.logging.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ranks[0]["run_id"]]  # exactly one MLflow run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["train.zero_stage"] == "2"
    assert {"loss/total", "lr", "samples_per_second", "seconds_per_step", "peak_memory_mb"} <= set(run.data.metrics)
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    assert len(grids) == 1 and grids[0].startswith("images/samples+step+3+"), grids  # rank 0 alone logs it
    # Schedules count optimizer steps, whatever the world size: the same LR per step as a single rank.
    from g3dr.train.schedules import learning_rate

    lrs = sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)
    assert [m.step for m in lrs] == [1, 2, 3]
    assert [m.value for m in lrs] == pytest.approx([learning_rate(s, cfg.train) for s in range(3)], rel=1e-6)

    # The same run on one rank accumulates 2 micro-batches per step: the LR and the CLIP ramp (and Eq. 1's
    # progress) are the same functions of the optimizer step, never of micro-batches or ranks.
    from g3dr.train.trainer import train

    single_cfg = load_config("configs/tiny.yaml", [*overrides, f"run_dir={tmp_path / 'single'}"])
    assert single_cfg.train.grad_accumulation(1) == 2 and cfg.train.grad_accumulation(2) == 1
    single = train(single_cfg, export=False)
    single_client = MlflowClient(tracking_uri(single_cfg))

    def history(c, run_id, key):
        return {m.step: m.value for m in c.get_metric_history(run_id, key)}

    assert history(single_client, single.run_id, "lr") == pytest.approx(history(client, run.info.run_id, "lr"),
                                                                        rel=1e-12)
    clip_logged = 0
    for c, run_id in ((client, run.info.run_id), (single_client, single.run_id)):
        for step, value in history(c, run_id, "weight/novel/clip").items():  # logged at steps with a novel view
            assert value == pytest.approx(cfg.loss.novel.clip.at(step - 1, cfg.train.total_steps), rel=1e-9), (run_id, step)
            clip_logged += 1
    assert clip_logged >= 2  # seeded: novel views occur in both runs, so the ramp was checked
