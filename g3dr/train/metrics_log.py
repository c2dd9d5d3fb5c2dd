"""The trainer's logging window: per-step reports gathered between logging steps, turned into MLflow metrics and
one plain log line, and the progress bar. :meth:`MetricsLogger.should_log` and
:meth:`MetricsLogger.should_log_images` say when; nothing here steps the model or touches checkpoints.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Any

import torch

from g3dr.config import Config
from g3dr.log import get_logger

log = get_logger("g3dr.train")


class MetricsLogger:
    """Means of the ``loss/...`` and ``weight/...`` terms (and the canonical-view fraction) over the micro-batches
    of a window of ``train.log_every`` optimizer steps, with lr, grad norm, throughput, data-wait fraction, peak
    memory, skipped micro-batches and the loader's data metrics; logged to ``tracker`` (MLflow on rank 0) and,
    on rank 0, as one :func:`step_line`. ``progress``: a bar on rank 0 when stderr is a terminal."""

    def __init__(self, cfg: Config, tracker: Any, device: torch.device, is_main: bool, start_step: int,
                 progress: bool):
        from tqdm import tqdm

        self.cfg, self.tracker, self.device, self.is_main = cfg, tracker, device, is_main
        self._reset()
        self.bar = tqdm(total=cfg.train.total_steps, initial=start_step, unit="step",
                        disable=not (progress and is_main and sys.stderr.isatty()), dynamic_ncols=True)

    def _reset(self) -> None:
        self.window: dict[str, list[float]] = {}
        self.start, self.steps, self.data_wait = time.time(), 0, 0.0

    def should_log(self, step: int) -> bool:
        """Every ``train.log_every`` steps and at the last one."""
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.total_steps

    def should_log_images(self, step: int) -> bool:
        """Rank 0, every ``train.image_every`` steps (0: never)."""
        image_every = self.cfg.train.image_every
        return self.is_main and bool(image_every) and step % image_every == 0

    def add(self, reports: list[dict[str, Any]], data_wait: float) -> None:
        """One optimizer step: the reports of its micro-batches and the seconds spent waiting for their data."""
        self.steps += 1
        self.data_wait += data_wait
        for r in reports:
            for k, v in r.items():
                if k.startswith(("loss/", "weight/")):
                    self.window.setdefault(k, []).append(v)
            if "canonical" in r:
                self.window.setdefault("canonical_fraction", []).append(float(r["canonical"]))
        self.bar.update(1)

    def log(self, step: int, lr: float, engine: Any, extra: dict[str, float]) -> None:
        """Log the window ending at ``step`` (``extra``: further metrics: skipped micro-batches,
        the loader's ``data/...``) and start a new one."""
        train_cfg = self.cfg.train
        elapsed = time.time() - self.start
        metrics = {k: sum(v) / len(v) for k, v in self.window.items()}
        if train_cfg.beta1_cycle:
            metrics["beta1"] = float(engine.optimizer.param_groups[0]["betas"][0])
        grad_norm = engine.get_global_grad_norm()
        metrics.update({"lr": lr, "seconds_per_step": elapsed / self.steps,
                        "samples_per_second": train_cfg.global_batch_size * self.steps / max(elapsed, 1e-9),
                        "data_wait_fraction": min(1.0, self.data_wait / max(elapsed, 1e-9)),
                        "peak_memory_mb": _peak_memory_mb(self.device)})
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["grad_norm"] = float(grad_norm)
        metrics.update(extra)
        self.tracker.log_metrics(metrics, step)
        self.bar.set_postfix(loss=f"{metrics['loss/total']:.4f}", lr=f"{lr:.2e}",
                             sps=f"{metrics['samples_per_second']:.1f}")
        if self.is_main:
            log.info("%s", step_line(step, train_cfg.total_steps, metrics))
        self._reset()

    def log_images(self, grid: Any, step: int) -> None:
        self.tracker.log_image(grid, key="samples", step=step)

    def close(self) -> None:
        self.bar.close()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """One plain log line per logging window (a SLURM log reads like a table): step, every loss term, lr,
    grad norm, samples/s, data-wait fraction, peak memory, ETA at the window's pace."""
    eta = max(total - step, 0) * metrics["seconds_per_step"]
    parts = [f"step {step}/{total}"]
    parts += [f"{k[5:]} {v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("loss/")]
    parts.append(f"lr {metrics['lr']:.3g}")
    if "grad_norm" in metrics:
        parts.append(f"grad_norm {metrics['grad_norm']:.3g}")
    parts += [f"{metrics['samples_per_second']:.3g} samples/s", f"data_wait {metrics['data_wait_fraction']:.0%}",
              f"peak_mem {metrics['peak_memory_mb']:.0f} MB", f"eta {_duration(eta)}"]
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
