"""No data-induced hangs (issue 10 item 5), with two real processes (torchrun, gloo) under a hard timeout.

- Training: 3 shards of uneven size (2, 4 and 8 samples) on 2 ranks x 2 workers (fewer shards than
  readers): every rank yields the same number of batches per epoch (from the manifest), and the ranks
  run in lockstep through three epochs with a collective after every batch, as the trainer does.
- Exact eval: the same 3 shards on 2 ranks: rank 0 reads shards 0 and 2 (10 samples, 5 batches), rank 1
  shard 1 (4 samples, 2 batches); per-sample rows are gathered (uneven gather) and moments all-reduced:
  every key arrives exactly once, nothing waits. A second pass where rank 1's only shard is entirely
  corrupt gives rank 1 no batch at all, and the gather still completes with every good key once.

- A rank stopped by a DataError (all its data corrupt) does not leave the other waiting in a collective:
  the launcher (torchrun) tears the job down within seconds.

Also: a tiny real training logs its loader's skip counts to MLflow (issue 10 item 10).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from g3dr_test_support import load_test_helper

SIZES = (2, 4, 8)
WORKER = r'''
import json, sys
from datetime import timedelta

import torch
import torch.distributed as tdist

from g3dr.config import load_config
from g3dr.data import build_eval_loader, build_train_loader
from g3dr.distributed import resolve_dist_env
from g3dr.metrics.fid import FeatureMoments
from g3dr.metrics.gather import all_reduce_moments, gather_rows

out, folder, corrupt = sys.argv[1], sys.argv[2], sys.argv[3]
env = resolve_dist_env()
tdist.init_process_group("gloo", rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=60))
base = ["data.source=shards", f"data.shards={folder}", "data.resolution=32", "renderer.plane_resolutions=[32,16]",
        "model.channel_mults=[1,2]", "train.micro_batch_size=2", "train.global_batch_size=4",
        "data.shuffle_buffer=4", "data.max_skip_fraction=1.0"]
result = {"rank": env.rank}

# ---- training: 2 workers per rank, epoch length from the manifest, lockstep collective per batch ----
loader = build_train_loader(load_config(None, [*base, "data.num_workers=2"]), env)
result["batches_per_epoch"] = len(loader)
per_epoch, keys = {}, []
it = iter(loader)
for _ in range(3 * len(loader)):
    batch = next(it)
    epoch = loader.epoch
    per_epoch[epoch] = per_epoch.get(epoch, 0) + 1
    keys.append(batch["key"])
    step = torch.ones(1)
    tdist.all_reduce(step)  # what the optimizer step's gradient all-reduce does: both ranks must arrive
    assert step.item() == env.world_size
loader.close()
result["train_per_epoch"] = per_epoch
result["train_keys"] = keys

# ---- exact eval: shards split by rank, uneven batch counts; gather per-sample rows and moments ----
def eval_pass(shards):
    cfg = load_config(None, [*base, "data.num_workers=0"])
    loader = build_eval_loader(cfg, env, shards=shards, batch_size=2)
    ids, feats, batches = [], [], 0
    for batch in loader:
        batches += 1
        ids += [int(k.split("_")[1]) for k in batch["key"]]
        feats.append(batch["rgb"].double().mean(dim=(2, 3)))  # (B, 3) per-sample "features"
    local_ids = torch.tensor(ids, dtype=torch.int64)
    local_feats = torch.cat(feats) if feats else torch.zeros(0)  # a rank without data passes any empty tensor
    moments = FeatureMoments(3)
    if feats:
        moments.update(local_feats)
    total = all_reduce_moments(moments)
    return {"batches": batches, "local": ids, "ids": gather_rows(local_ids).tolist(),
            "feats": gather_rows(local_feats).tolist(), "count": total.count, "sum": total.sum.tolist(),
            "skipped": loader.counts.skipped}

shards = [f"{folder}/part-{i}.tar" for i in range(3)]
result["eval"] = eval_pass(shards)
result["eval_corrupt"] = eval_pass([shards[0], corrupt, shards[2]])
with open(f"{out}/rank{env.rank}.json", "w") as f:
    json.dump(result, f)
tdist.barrier()
tdist.destroy_process_group()
'''


_tar = load_test_helper("tar_members")
_members, _write = _tar.read_members, _tar.write_members


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, Path]:
    """``part-0/1/2.tar`` with 2, 4 and 8 samples (keys 0-1, 2-5, 6-13) and their manifest, plus a copy of
    part 1 whose every JPEG is broken."""
    from g3dr.data.synth import write_synthetic_shards

    root = tmp_path_factory.mktemp("uneven")
    write_synthetic_shards(str(root / "src"), sum(SIZES), (32,), seed=4, shard_size=sum(SIZES), progress=False)
    members = _members(root / "src" / "synth-000000.tar")
    by_key: dict[str, list] = {}
    for name, data in members:
        by_key.setdefault(name.split(".")[0], []).append((name, data))
    keys = sorted(by_key)
    folder = root / "shards"
    folder.mkdir()
    start, shards = 0, []
    for index, size in enumerate(SIZES):
        part = [m for key in keys[start:start + size] for m in by_key[key]]
        _write(folder / f"part-{index}.tar", part)
        shards.append({"name": f"part-{index}.tar", "samples": size})
        start += size
    (folder / "manifest.json").write_text(json.dumps({"shards": shards, "num_inputs": sum(SIZES)}))
    corrupt = root / "part-1-corrupt.tar"
    _write(corrupt, [(n, d[:40] if n.endswith(".jpg") else d) for n, d in _members(folder / "part-1.tar")])
    return folder, corrupt


def test_two_ranks_uneven_shards_no_hang_every_sample_once(uneven, tmp_path, repo_root):
    folder, corrupt = uneven
    (tmp_path / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(tmp_path / "worker.py"), str(tmp_path), str(folder), str(corrupt)]
    try:  # the hard timeout: a hang fails the test instead of blocking the suite
        proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"two-rank data run did not finish in 240 s (a hang): {str(err.stderr)[-3000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    # Training: 14 samples / 2 ranks / micro-batch 2 = 3 batches per epoch on both ranks, every epoch.
    for r in ranks:
        assert r["batches_per_epoch"] == 3
        assert r["train_per_epoch"] == {"0": 3, "1": 3, "2": 3}
    assert ranks[0]["train_keys"] != ranks[1]["train_keys"]  # ranks draw differently

    everything = list(range(sum(SIZES)))
    # Exact eval, uneven: rank 0 holds shards 0 and 2 (10 samples), rank 1 shard 1 (4 samples).
    e0, e1 = ranks[0]["eval"], ranks[1]["eval"]
    assert (e0["batches"], e1["batches"]) == (5, 2)
    assert sorted(e0["local"]) == [0, 1, *range(6, 14)] and sorted(e1["local"]) == [2, 3, 4, 5]
    for r in ranks:
        assert sorted(r["eval"]["ids"]) == everything  # every sample exactly once, on every rank
        assert r["eval"]["count"] == len(everything) and r["eval"]["ids"] == e0["local"] + e1["local"]
    assert ranks[0]["eval"]["feats"] == ranks[1]["eval"]["feats"]
    assert ranks[0]["eval"]["sum"] == pytest.approx(ranks[1]["eval"]["sum"], rel=1e-12)
    # the all-reduced sums equal the sum of the gathered rows
    gathered_sum = [sum(row[c] for row in e0["feats"]) for c in range(3)]
    assert e0["sum"] == pytest.approx(gathered_sum, rel=1e-12)

    # Rank 1's only shard is corrupt: it gets no batch, counts 4 skips, and nobody waits.
    c0, c1 = ranks[0]["eval_corrupt"], ranks[1]["eval_corrupt"]
    assert (c0["batches"], c1["batches"]) == (5, 0) and c1["skipped"] == {"undecodable_sample": 4}
    for r in ranks:
        assert sorted(r["eval_corrupt"]["ids"]) == [0, 1, *range(6, 14)]
        assert r["eval_corrupt"]["count"] == 10 and len(r["eval_corrupt"]["feats"]) == 10


FAILING_WORKER = r'''
import sys
from datetime import timedelta

import torch
import torch.distributed as tdist

from g3dr.config import load_config
from g3dr.data import build_train_loader
from g3dr.distributed import resolve_dist_env

good, bad = sys.argv[1], sys.argv[2]
env = resolve_dist_env()
# A long collective timeout: only the launcher's teardown can end rank 0's wait quickly.
tdist.init_process_group("gloo", rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=10))
cfg = load_config(None, ["data.source=shards", f"data.shards={good if env.rank == 0 else bad}", "data.resolution=32",
                         "renderer.plane_resolutions=[32,16]", "model.channel_mults=[1,2]", "data.num_workers=0",
                         "train.micro_batch_size=2", "train.global_batch_size=4", "data.epoch_length=8",
                         "data.max_skip_fraction=0.5", "data.skip_check_min_samples=2"])
for batch in build_train_loader(cfg, env):  # rank 1 raises a DataError before its first batch
    step = torch.ones(1)
    tdist.all_reduce(step)
'''


def test_a_rank_stopped_by_bad_data_does_not_leave_the_other_waiting(uneven, tmp_path, repo_root):
    """Rank 1's data is all corrupt: its DataError ends its process; torchrun then stops rank 0, which was
    waiting in the step's collective - within seconds, not after the 10-minute collective timeout."""
    import time

    folder, corrupt = uneven
    (tmp_path / "worker.py").write_text(FAILING_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(tmp_path / "worker.py"), str(folder / "part-2.tar"), str(corrupt)]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"rank 0 kept waiting for the failed rank 1: {str(err.stderr)[-3000:]}")
    assert proc.returncode != 0 and time.monotonic() - start < 180
    assert "too much bad data" in proc.stderr and "undecodable_sample" in proc.stderr


@pytest.mark.slow
def test_training_logs_the_skip_counts_to_mlflow(uneven, tmp_path):
    """A tiny real training (one process) on a good and an all-corrupt shard logs data/skipped, data/read,
    data/skip_fraction and data/shard_errors of its loader at every logged step."""
    from mlflow.tracking import MlflowClient

    from g3dr.config import load_config
    from g3dr.data import build_train_loader
    from g3dr.tracking import tracking_uri
    from g3dr.train.trainer import train

    folder, corrupt = uneven
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'run'}", "data.source=shards",
                                            f"data.shards={folder}/part-2.tar,{corrupt}", "data.epoch_length=16",
                                            "data.shuffle_buffer=1", "data.num_workers=0", "data.max_skip_fraction=1.0",
                                            "train.total_steps=3", "train.log_every=1", "train.image_every=0",
                                            "train.checkpoint_every=100"])
    loaders = []

    def build(c, d):
        loaders.append(build_train_loader(c, d))
        return loaders[0]

    result = train(cfg, build_loader=build, export=False)
    assert result.step == 3
    counts = loaders[0].counts
    assert counts.skipped_total > 0  # the corrupt shard was drawn
    client = MlflowClient(tracking_uri(cfg))
    history = {name: sorted(client.get_metric_history(result.run_id, name), key=lambda m: m.step)
               for name in ("data/skipped", "data/read", "data/skip_fraction", "data/shard_errors")}
    assert [m.step for m in history["data/skipped"]] == [1, 2, 3]
    assert history["data/skipped"][-1].value == counts.skipped_total
    assert history["data/read"][-1].value == counts.read == 6 + counts.skipped_total  # 3 steps x 2 delivered
    assert history["data/skip_fraction"][-1].value == pytest.approx(counts.skip_fraction)
    assert history["data/shard_errors"][-1].value == 0
