"""Two real ranks (torchrun, gloo) choose a checkpoint to resume from together: a damage only one rank can see
makes every rank refuse it and fall back alike.

The checkpoint manager is driven directly (no training): each rank writes its files as DeepSpeed does (rank 0 the
model states, every rank its optimizer partition), and verification splits the files between the ranks, so the
damaged file below is hashed by rank 1 only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = '''
import json, sys
from pathlib import Path

import torch
import torch.distributed as dist

from g3dr.errors import WeightsError
from g3dr.log import setup_logging
from g3dr.train import checkpoint as ckpt

setup_logging("INFO")
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
run = Path(sys.argv[1])
root = run / "checkpoints"


class Engine:
    """Writes like DeepSpeed: rank 0 the model states, every rank its own optimizer partition."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if rank == 0:
            torch.save({"w": torch.arange(1000.0)}, folder / "mp_rank_00_model_states.pt")
        torch.save({"part": torch.full((500,), float(rank))}, folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        dist.barrier()


if rank == 0:
    root.mkdir(parents=True)
dist.barrier()
for step in (2, 4):
    ckpt.save_checkpoint(Engine(), root, step, {"step": step}, {"rank": rank}, rank, world, keep_last=3)
bad = None
if rank == 0:  # damage a file of step-4 in rank 1's share of the verification (every 2nd file, from the 2nd)
    names = sorted(ckpt.read_meta(root / "step-4")["files"])
    bad = names[1::2][0]
    data = bytearray((root / "step-4" / bad).read_bytes())
    data[-10] ^= 0xFF
    (root / "step-4" / bad).write_bytes(bytes(data))
    shares = {r: names[r::world] for r in range(world)}
dist.barrier()
report = {"rank": rank}
try:
    ckpt.resolve_resume(str(root / "step-4"), run, rank, world)
    report["explicit"] = "accepted"
except WeightsError as err:
    report["explicit"] = str(err)
report["auto"] = str(ckpt.resolve_resume("auto", run, rank, world))
if rank == 0:
    report.update(bad=bad, shares=shares)
with open(run / f"rank-{rank}.json", "w") as f:
    json.dump(report, f)
dist.barrier()
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_rank_refuses_a_damaged_checkpoint_and_falls_back_alike(tmp_path, repo_root):
    torchrun = Path(sys.executable).parent / "torchrun"
    (tmp_path / "worker.py").write_text(WORKER)
    run = tmp_path / "run"
    run.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(tmp_path / "worker.py"), str(run)]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((run / f"rank-{r}.json").read_text()) for r in (0, 1)]
    bad = ranks[0]["bad"]
    assert bad in ranks[0]["shares"]["1"] and bad not in ranks[0]["shares"]["0"]  # only rank 1 hashed it
    for report in ranks:  # ... yet both ranks refused the explicit path and fell back to the same checkpoint
        assert report["explicit"].startswith(f"--resume {run / 'checkpoints' / 'step-4'}: the checkpoint is damaged: "
                                             f"{bad}: sha256 differs")
        assert report["auto"] == str(run / "checkpoints" / "step-2")
    aside = run / "checkpoints" / "set-aside" / "step-4.corrupt"
    assert aside.is_dir() and (aside / bad).is_file()  # set aside by rank 0, not deleted
    assert f"checkpoint {run / 'checkpoints' / 'step-4'} is damaged: {bad}" in proc.stderr
