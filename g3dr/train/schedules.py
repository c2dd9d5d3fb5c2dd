"""Schedules of G3DR training, all counted in optimizer steps (never micro-batches, never per rank).

``step`` is the number of optimizer steps already taken (0 for the first update), so a schedule does not
change with world size or gradient accumulation.
"""

from __future__ import annotations

import math

from g3dr.config import LossConfig, TrainConfig


def learning_rate(step: int, train: TrainConfig) -> float:
    """Linear warmup ``lr_start -> lr`` over ``warmup_steps``, then cosine ``lr -> lr_min`` at ``total_steps``."""
    if step < train.warmup_steps:
        return train.lr_start + (train.lr - train.lr_start) * step / train.warmup_steps
    decay_steps = max(1, train.total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    return train.lr_min + 0.5 * (train.lr - train.lr_min) * (1.0 + math.cos(math.pi * progress))


def clip_weight(step: int, loss: LossConfig) -> float:
    """CLIP weight: linear ramp ``clip_start -> clip`` over ``clip_ramp_steps``, then constant."""
    if loss.clip_ramp_steps == 0:
        return loss.clip
    t = min(1.0, step / loss.clip_ramp_steps)
    return loss.clip_start + (loss.clip - loss.clip_start) * t


def weight_sum_weight(step: int, loss: LossConfig, total_steps: int) -> float:
    """Weight-sum term: linear ramp ``0 -> weight_sum`` over ``weight_sum_ramp_fraction`` of training."""
    ramp = loss.weight_sum_ramp_fraction * total_steps
    return loss.weight_sum * min(1.0, step / ramp) if ramp > 0 else loss.weight_sum


def novel_view_threshold(step: int, total_steps: int, tau: float) -> float:
    """``min(tau, 2 * step / total_steps)``: the probability of a novel view at ``step`` (Eq. 1)."""
    return min(tau, 2.0 * step / total_steps)


def is_canonical(r: float, step: int, total_steps: int, tau: float) -> bool:
    """Eq. 1: the step trains the canonical view if ``r > min(tau, 2 * step / total_steps)``, ``r ~ U(0, 1)``."""
    return r > novel_view_threshold(step, total_steps, tau)
