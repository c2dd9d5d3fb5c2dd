"""Resuming on another world size (issue 10, item 1) and the fp32 export's parity with the engine.

The slow test trains 2 real ranks (torchrun, gloo, ZeRO-2) to step 2, then resumes copies of that run on 1 rank
(ZeRO-2, a plain process) and on 3 ranks (torchrun, ZeRO-1) to step 4 with ``--resume auto``: the ZeRO partitions
are converted to DeepSpeed's universal format and re-partitioned by the trainer itself. A worker script wraps
``deepspeed.initialize`` and ``checkpoint.load_checkpoint`` to record, right after the load, every parameter's fp32
master weight and Adam moments gathered from the new partitions; the test compares them with its own
consolidation of the 2-rank partition files (written here, independent of DeepSpeed's converter).

The fast tests drive the same code in this process with a small linear model (1 rank, the checkpoint's world
size marked as 2 to force the conversion) and check the pure helpers.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from g3dr.errors import ConfigError
from g3dr.train import checkpoint as ckpt

WORKER = '''
import json, math, sys
import deepspeed
import torch
from g3dr.config import load_config
from g3dr.distributed import resolve_dist_env, shutdown_process_group
from g3dr.log import setup_logging
from g3dr.render.cameras import camera_to_world_from_angles
from g3dr.train import checkpoint as ckpt
from g3dr.train.trainer import train

setup_logging("INFO")
out, resume, stop_at, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
rank = resolve_dist_env().rank
engines = []
real_initialize, real_load = deepspeed.initialize, ckpt.load_checkpoint


def initialize(*args, **kwargs):
    result = real_initialize(*args, **kwargs)
    engines.append(result[0])
    return result


def full_state(engine, moments=True):
    """Per parameter: fp32 master weight (and Adam moments) gathered from every rank's partition; collective."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = {}
    for name, p in engine.module.named_parameters():
        entry = {"fp32": safe_get_full_fp32_param(p).detach().clone(), "module": p.detach().clone()}
        for key in ("exp_avg", "exp_avg_sq") if moments else ():
            entry[key] = safe_get_full_optimizer_state(p, key).detach().clone()
        params[name] = entry
    base = engine.optimizer.optimizer
    steps = [base.state[g["params"][0]].get("step") for g in base.param_groups]
    return {"params": params, "adam_steps": [None if s is None else float(s) for s in steps]}


def probe(engine):
    """The engine's forward pass on fixed inputs: a canonical and a novel render (deterministic renderer)."""
    g = torch.Generator().manual_seed(11)
    rgb = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    depth = 4.5 + torch.rand(2, 1, 32, 32, generator=g)
    cam2world = camera_to_world_from_angles(torch.tensor([math.pi / 2, math.pi / 2 + 0.2]),
                                            torch.tensor([math.pi / 2, math.pi / 2 - 0.05]), 5.0)
    result = {"rgb": rgb, "depth": depth, "cam2world": cam2world}
    with torch.no_grad(), torch.random.fork_rng():
        for canonical in (True, False):
            o = engine(rgb, depth, cam2world, canonical)
            result["canonical" if canonical else "novel"] = {k: o[k].clone() for k in ("planes", "rgb", "depth")}
    return result


def load_checkpoint(engine, path, rank, world_size=None):
    before = full_state(engine, moments=False)  # a fresh engine: no Adam moments yet
    result = real_load(engine, path, rank, world_size)
    after = full_state(engine)
    forward = probe(engine)
    if rank == 0:
        torch.save({"before": before, "after": after, "lr": float(engine.get_lr()[0]),
                    "scheduler_epoch": engine.lr_scheduler.last_epoch, "global_steps": engine.global_steps,
                    "forward": forward, "rank_state_is_none": result[1] is None}, f"{out}/loaded.pt")
    return result


deepspeed.initialize, ckpt.load_checkpoint = initialize, load_checkpoint
result = train(load_config("configs/tiny.yaml", overrides), resume=None if resume == "none" else resume,
               stop_at=stop_at or None)
if rank == 0:
    torch.save(probe(engines[0]), f"{out}/final-forward.pt")
with open(f"{out}/rank-{rank}.json", "w") as f:
    json.dump({"losses": result.losses, "start": result.start_step, "step": result.step, "run_id": result.run_id,
               "digest": result.param_digest, "export": str(result.export) if result.export else None}, f)
shutdown_process_group()
'''

# micro 2 x global 12: accumulation 3 on 2 ranks, 6 on 1, 2 on 3.
COMMON = ["train.micro_batch_size=2", "train.global_batch_size=12", "train.total_steps=4", "train.checkpoint_every=2",
          "train.image_every=0", "train.log_every=1", "renderer.deterministic=true", "renderer.impl=reference"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, repo_root: Path, nproc: int, name: str, resume: str, stop_at: int,
            overrides: list[str]) -> Path:
    """Run the worker on ``nproc`` ranks (torchrun; one rank: a plain process); returns its output folder."""
    out = tmp_path / name
    out.mkdir()
    worker = tmp_path / "worker.py"
    if not worker.exists():
        worker.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = [str(worker), str(out), resume, str(stop_at), *overrides]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
               str(_free_port()), *args]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    (out / "stderr.txt").write_text(proc.stderr)
    return out


def consolidate_zero_checkpoint(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per parameter fp32 master weight and Adam moments of a ZeRO 1/2 checkpoint, from its partition files.

    Independent of DeepSpeed's converters: each ``*optim_states.pt`` holds one flat slice per parameter group
    (fp32 weights, and Adam's ``exp_avg``/``exp_avg_sq`` of that slice); concatenated in rank order they are the
    group's parameters flattened in the order of ``param_shapes`` (then padding).
    """
    files = sorted(path.glob("*optim_states.pt"), key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name)[1]))
    parts = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    assert [p["partition_count"] for p in parts] == [[len(files)]] * len(files)
    shapes = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["param_shapes"]
    state: dict[str, dict[str, torch.Tensor]] = {}
    for group, group_shapes in enumerate(shapes):
        flat = {k: torch.cat([p["base_optimizer_state"]["state"][group][k] for p in parts])
                for k in ("exp_avg", "exp_avg_sq")}
        flat["fp32"] = torch.cat([p["single_partition_of_fp32_groups"][group] for p in parts])
        offset = 0
        for name, shape in group_shapes.items():
            n = math.prod(shape)
            state[name] = {k: v[offset:offset + n].view(tuple(shape)) for k, v in flat.items()}
            offset += n
        assert flat["fp32"].numel() - offset == parts[-1]["group_paddings"][group]  # only the tail is padding
    steps = {float(p["base_optimizer_state"]["state"][g]["step"]) for p in parts for g in range(len(shapes))}
    assert len(steps) == 1
    state["__adam_step__"] = {"step": torch.tensor(steps.pop())}
    return state


def _assert_state_equals(loaded: dict, reference: dict) -> None:
    """Exact equality of every parameter's fp32 weight, module weight and Adam moments."""
    assert set(loaded["params"]) == set(reference) - {"__adam_step__"}
    for name, entry in loaded["params"].items():
        ref = reference[name]
        assert torch.equal(entry["fp32"], ref["fp32"]), name
        assert torch.equal(entry["module"], ref["fp32"]), name  # fp32 training: the module holds the master weights
        assert torch.equal(entry["exp_avg"], ref["exp_avg"]), name
        assert torch.equal(entry["exp_avg_sq"], ref["exp_avg_sq"]), name
    assert loaded["adam_steps"] == [float(reference["__adam_step__"]["step"])]


def _assert_forward_equal(a: dict, b: dict, atol: float = 1e-6) -> None:
    for view in ("canonical", "novel"):
        for key in ("planes", "rgb", "depth"):
            torch.testing.assert_close(a[view][key], b[view][key], atol=atol, rtol=0, msg=f"{view} {key}")


@pytest.mark.slow
def test_resume_saved_by_two_ranks_on_one_and_three(tmp_path, repo_root):
    from mlflow.tracking import MlflowClient

    from g3dr.config import load_config
    from g3dr.models.checkpoint_io import load_f_trigen
    from g3dr.train.schedules import learning_rate
    from g3dr.tracking import tracking_uri

    synth = f"data.synthetic_dir={tmp_path / 'synthetic'}"
    saved_run = tmp_path / "run-2"
    first = _launch(tmp_path, repo_root, 2, "two", "none", 2, [f"run_dir={saved_run}", synth, "train.zero_stage=2",
                                                               *COMMON])
    two = json.loads((first / "rank-0.json").read_text())
    checkpoint = ckpt.find_latest(saved_run / "checkpoints")
    assert ckpt.step_of(checkpoint) == 2 and ckpt.saved_world_size(checkpoint) == 2
    reference = consolidate_zero_checkpoint(checkpoint)
    # The state that must carry over is not trivial: Adam has moved the weights and filled its moments.
    assert all(float(ref["exp_avg"].abs().max()) > 0 for name, ref in reference.items() if name != "__adam_step__")

    # The fp32 export of the 2-rank ZeRO-2 run loads strictly and reproduces that engine's forward pass.
    exported, _, meta = load_f_trigen(two["export"])
    assert meta["step"] == 2
    engine_forward = torch.load(first / "final-forward.pt", weights_only=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker ranks: another thread count sums convolutions in another order (1e-6)
    try:
        with torch.no_grad():
            export_forward = {("canonical" if c else "novel"): exported(engine_forward["rgb"], engine_forward["depth"],
                                                                        engine_forward["cam2world"], c)
                              for c in (True, False)}
    finally:
        torch.set_num_threads(threads)
    _assert_forward_equal(export_forward, engine_forward)
    for name, p in exported.named_parameters():
        assert torch.equal(p.detach(), reference[name]["fp32"]), name

    for nproc, zero_stage in ((1, 2), (3, 1)):
        run_dir = tmp_path / f"run-{nproc}"
        shutil.copytree(saved_run, run_dir)
        out = _launch(tmp_path, repo_root, nproc, f"resumed-{nproc}", "auto", 0,
                      [f"run_dir={run_dir}", synth, f"train.zero_stage={zero_stage}", *COMMON])
        stderr = (out / "stderr.txt").read_text()
        assert "saved by 2 ranks, this run has %d" % nproc in stderr and "universal checkpoint" in stderr
        assert (run_dir / "checkpoints" / "step-2" / ckpt.UNIVERSAL_DIRNAME / "zero").is_dir()
        results = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(nproc)]
        assert all(r["start"] == 2 and r["step"] == 4 for r in results)
        assert len({r["digest"] for r in results}) == 1  # the replicas agree after the re-partitioned steps

        loaded = torch.load(out / "loaded.pt", weights_only=False)
        # Negative control: the engine before the load (what a skipped or failed conversion would train on)
        # has other weights and no Adam state, and the comparison below tells them apart.
        assert loaded["before"]["adam_steps"] == [None]
        assert max(float((e["fp32"] - reference[n]["fp32"]).abs().max())
                   for n, e in loaded["before"]["params"].items()) > 1e-6
        _assert_state_equals(loaded["after"], reference)
        assert loaded["global_steps"] == 2 and loaded["scheduler_epoch"] == 2
        assert loaded["rank_state_is_none"]  # per-rank RNG and data state are re-derived, not reused
        cfg = load_config("configs/tiny.yaml", [f"run_dir={run_dir}", *COMMON])
        assert loaded["lr"] == pytest.approx(learning_rate(2, cfg.train), rel=1e-6)
        # Same weights, same batch: the resumed engine computes what the saved one did (losses continue).
        _assert_forward_equal(loaded["forward"], engine_forward)

        losses = [x for r in results for x in r["losses"]]
        assert len(results[0]["losses"]) == 2 and all(math.isfinite(x) for x in losses)
        assert max(losses) < 2 * max(two["losses"])

        # One MLflow run continues; the LR of every step is the schedule's value for that optimizer step.
        assert results[0]["run_id"] == two["run_id"]
        client = MlflowClient(tracking_uri(cfg))
        lrs = sorted(client.get_metric_history(two["run_id"], "lr"), key=lambda m: m.step)
        assert [m.step for m in lrs] == [1, 2, 3, 4]
        assert [m.value for m in lrs] == pytest.approx([learning_rate(s, cfg.train) for s in range(4)], rel=1e-6)
        final = ckpt.find_latest(run_dir / "checkpoints")
        assert ckpt.step_of(final) == 4 and ckpt.saved_world_size(final) == nproc
        assert len(list(final.glob("*optim_states.pt"))) == nproc  # saved re-partitioned for the new world


# ---------------------------------------------------------------------------------------------------------------
# Fast: the conversion and the universal load in this process (a linear model, 1 rank), and the helpers.


def _linear_engine(zero_stage: int, load_universal: bool = False):
    import deepspeed

    from g3dr.config import load_config
    from g3dr.distributed import DistEnv
    from g3dr.train.ds_config import deepspeed_config
    from g3dr.distributed import init_process_group

    cfg = load_config("configs/tiny.yaml", [f"train.zero_stage={zero_stage}", "train.global_batch_size=2"])
    init_process_group(DistEnv(), "cpu", cfg.distributed.backend, cfg.distributed.timeout_minutes, via="deepspeed")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model.register_buffer("marker", torch.zeros(2))
    ds_config = deepspeed_config(cfg, 1, "cpu")
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                           lr_scheduler=schedule, dist_init_required=False)
    return engine


def _train_steps(engine, n: int) -> None:
    g = torch.Generator().manual_seed(5)
    for _ in range(n):
        loss = engine(torch.randn(2, 5, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()


def _save(engine, root: Path, step: int, world_size: int) -> Path:
    path = ckpt.save_checkpoint(engine, root, step, {"step": step}, {"rng": ckpt.rng_state()}, rank=0,
                                world_size=1, keep_last=3)
    if world_size != 1:  # pretend another world saved it (the partition layout is the same for this test)
        meta = ckpt.read_meta(path)
        meta["world_size"] = world_size
        (path / ckpt.META_FILENAME).write_text(json.dumps(meta))
    return path


def test_universal_conversion_and_load_restore_the_exact_state(tmp_path):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    saver = _linear_engine(zero_stage=2)
    _train_steps(saver, 3)
    with torch.no_grad():
        saver.module.marker.fill_(7.0)
    path = _save(saver, tmp_path / "checkpoints", 3, world_size=2)
    reference = consolidate_zero_checkpoint(path)
    for name, p in saver.module.named_parameters():  # the test's own consolidation agrees with the live engine
        assert torch.equal(reference[name]["exp_avg"], safe_get_full_optimizer_state(p, "exp_avg"))
        assert torch.equal(reference[name]["fp32"], safe_get_full_fp32_param(p))

    assert ckpt.needs_universal(path, 1) and not ckpt.needs_universal(path, 2)
    # An engine built without checkpoint.load_universal cannot take the converted state: a clear error.
    with pytest.raises(RuntimeError, match="load_universal"):
        ckpt.load_checkpoint(_linear_engine(zero_stage=1), path, rank=0, world_size=1)

    (path / "universal.partial").mkdir()  # left by a conversion that was killed: replaced, never used
    engine = _linear_engine(zero_stage=1, load_universal=True)
    client, rank_state = ckpt.load_checkpoint(engine, path, rank=0, world_size=1)
    assert client == {"step": 3} and rank_state is None
    assert (path / "universal" / "zero").is_dir() and not (path / "universal.partial").exists()
    assert not (path / "latest_universal").exists()
    for name, p in engine.module.named_parameters():
        assert torch.equal(safe_get_full_fp32_param(p), reference[name]["fp32"]), name
        assert torch.equal(p.detach(), reference[name]["fp32"]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(safe_get_full_optimizer_state(p, key), reference[name][key]), (name, key)
    base = engine.optimizer.optimizer
    assert float(base.state[base.param_groups[0]["params"][0]]["step"]) == 3.0
    assert engine.global_steps == 3 and engine.lr_scheduler.last_epoch == 3
    assert engine.get_lr()[0] == pytest.approx(saver.get_lr()[0])
    assert torch.equal(engine.module.marker, torch.full((2,), 7.0))  # buffers come from the saved module state

    # The loaded engine trains on exactly like the saver.
    _train_steps(saver, 1)
    _train_steps(engine, 1)
    for (name, a), b in zip(saver.module.named_parameters(), engine.module.parameters()):
        assert torch.equal(a, b), name

    # The conversion is cached: a second load reuses it.
    stamp = (path / "universal" / "zero").stat().st_mtime_ns
    ckpt.load_checkpoint(_linear_engine(zero_stage=2, load_universal=True), path, rank=0, world_size=1)
    assert (path / "universal" / "zero").stat().st_mtime_ns == stamp


def test_a_failed_conversion_is_an_error(tmp_path):
    engine = _linear_engine(zero_stage=2)
    _train_steps(engine, 1)
    path = _save(engine, tmp_path / "checkpoints", 1, world_size=3)
    next(path.glob("*optim_states.pt")).write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="converting .* to a universal checkpoint failed on rank 0"):
        ckpt.load_checkpoint(_linear_engine(zero_stage=2, load_universal=True), path, rank=0, world_size=1)
    assert not (path / "universal").exists()


def test_a_step_0_checkpoint_loads_on_another_world_size_without_conversion(tmp_path):
    """Before the first optimizer step there is no Adam state: the weights load, nothing is converted (DeepSpeed's
    converter would write the whole flat weight buffer once per parameter for such a checkpoint)."""
    from deepspeed.utils import safe_get_full_fp32_param

    saver = _linear_engine(zero_stage=2)
    with torch.no_grad():
        for p in saver.module.parameters():
            p.add_(1.0)
    path = _save(saver, tmp_path / "checkpoints", 0, world_size=2)
    assert not ckpt.needs_universal(path, 1)
    engine = _linear_engine(zero_stage=2)
    client, rank_state = ckpt.load_checkpoint(engine, path, rank=0, world_size=1)
    assert client == {"step": 0} and rank_state is None
    assert not (path / ckpt.UNIVERSAL_DIRNAME).exists()
    for a, b in zip(saver.module.parameters(), engine.module.parameters()):
        assert torch.equal(a, b) and torch.equal(safe_get_full_fp32_param(b), a)


def test_zero_stage_switch_that_would_lose_the_optimizer_state_is_refused(tmp_path):
    zero = tmp_path / "step-1"
    zero.mkdir()
    (zero / ckpt.META_FILENAME).write_text(json.dumps({"step": 1, "world_size": 2, "client_state": {}}))
    (zero / "mp_rank_00_model_states.pt").write_bytes(b"")
    partitioned = tmp_path / "step-2"
    shutil.copytree(zero, partitioned)
    for r in range(2):
        (partitioned / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")

    ckpt.check_zero_stage(zero, 0)
    ckpt.check_zero_stage(partitioned, 1)
    ckpt.check_zero_stage(partitioned, 2)
    with pytest.raises(ConfigError, match="train.zero_stage=0"):
        ckpt.check_zero_stage(zero, 1)
    with pytest.raises(ConfigError, match="train.zero_stage=1 or 2"):
        ckpt.check_zero_stage(partitioned, 0)
    # ZeRO 0 keeps the whole optimizer state in one file: any world size loads it without conversion.
    assert not ckpt.needs_universal(zero, 3)
    assert ckpt.needs_universal(partitioned, 1) and ckpt.needs_universal(partitioned, 3)
    assert not ckpt.needs_universal(partitioned, 2)


def test_data_position_on_a_new_world_starts_an_unused_epoch():
    from g3dr.train.checkpointer import fresh_data_position

    class Loader:
        def state_dict(self):
            return {"epoch": 0, "batches_done": 0, "consumed": {}, "num_workers": 2, "batches_per_epoch": 9}

    saved = [{"data": {"epoch": 4, "batches_done": 3, "consumed": {"0": 5}}},
             {"data": {"epoch": 5, "batches_done": 1, "consumed": {"1": 2}}}]
    position = fresh_data_position(Loader(), saved)
    assert position == {"epoch": 6, "batches_done": 0, "consumed": {}, "num_workers": 2, "batches_per_epoch": 9}
    assert fresh_data_position(Loader(), [{"data": None}])["epoch"] == 0
