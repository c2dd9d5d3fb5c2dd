"""Schedules of G3DR training, all counted in optimizer steps (never micro-batches, never per rank).

``step`` is the number of optimizer steps already taken (0 for the first update), so a schedule does not
change with world size or gradient accumulation. Loss weights are :class:`~g3dr.config.WeightSchedule`
values of the config (``loss.canonical.*``, ``loss.novel.*``); this module holds the learning rate, Adam's
beta1 and the view choice, and :class:`StepSchedule`, which applies the first two to an optimizer.
"""

from __future__ import annotations

import math

import torch

from g3dr.config import TrainConfig


def _cosine(start: float, end: float, pct: float) -> float:
    """``OneCycleLR``'s cosine annealing from ``start`` (pct 0) to ``end`` (pct 1)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def _one_cycle_phase(step: int, train: TrainConfig) -> tuple[int, float]:
    """(phase, progress in it) of ``OneCycleLR`` (two phases) with ``pct_start = warmup_steps / total_steps``.

    The rising phase ends at step ``warmup_steps - 1``, the falling one at ``total_steps - 1`` (torch's
    boundaries); past the end the falling phase is held at its end.
    """
    rise_end = float(train.warmup_steps) - 1.0
    fall_end = float(train.total_steps) - 1.0
    if step <= rise_end and rise_end > 0:
        return 0, step / rise_end
    if rise_end <= 0 and step <= 0:
        return 0, 1.0
    span = fall_end - rise_end
    return 1, min(1.0, (step - rise_end) / span) if span > 0 else 1.0


def learning_rate(step: int, train: TrainConfig) -> float:
    """The learning rate at ``step`` (``train.lr_schedule``).

    ``warmup_cosine``: linear ``lr_start -> lr`` over ``warmup_steps``, then cosine ``lr -> lr_min`` at
    ``total_steps``. ``one_cycle``: ``torch.optim.lr_scheduler.OneCycleLR`` with cosine annealing,
    ``max_lr = lr``, ``div_factor = lr / lr_start``, ``final_div_factor = lr_start / lr_min`` and
    ``pct_start = warmup_steps / total_steps``.
    """
    match train.lr_schedule:
        case "warmup_cosine":
            if step < train.warmup_steps:
                return train.lr_start + (train.lr - train.lr_start) * step / train.warmup_steps
            decay_steps = max(1, train.total_steps - train.warmup_steps)
            progress = min(1.0, (step - train.warmup_steps) / decay_steps)
            return train.lr_min + 0.5 * (train.lr - train.lr_min) * (1.0 + math.cos(math.pi * progress))
        case "one_cycle":
            phase, pct = _one_cycle_phase(step, train)
            if phase == 0:
                return _cosine(train.lr_start, train.lr, pct)
            return _cosine(train.lr, train.lr_min, pct)
    raise ValueError(f"unknown train.lr_schedule {train.lr_schedule!r}")


def adam_beta1(step: int, train: TrainConfig) -> float:
    """Adam's beta1 at ``step``: ``betas[0]``, or with ``beta1_cycle = [max, base]`` ``OneCycleLR``'s momentum
    cycle (cosine ``max -> base`` while the LR rises, ``base -> max`` while it falls)."""
    if not train.beta1_cycle:
        return train.betas[0]
    high, base = train.beta1_cycle
    phase, pct = _one_cycle_phase(step, train)
    return _cosine(high, base, pct) if phase == 0 else _cosine(base, high, pct)


class StepSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Sets every param group's ``lr`` (and, with ``train.beta1_cycle``, Adam's beta1) for the step to come.

    Stepped once per optimizer step (DeepSpeed does it after each ``optimizer.step()``); ``last_epoch`` is
    the number of optimizer steps taken. Its state (``last_epoch``) goes into DeepSpeed checkpoints, so a
    resumed run continues the schedule; the config is not part of the state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig):
        self.train_cfg = train
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:  # noqa: D102
        return [learning_rate(self.last_epoch, self.train_cfg) for _ in self.optimizer.param_groups]

    def step(self, epoch: int | None = None) -> None:  # noqa: D102
        super().step(epoch)
        if self.train_cfg.beta1_cycle:
            beta1 = adam_beta1(self.last_epoch, self.train_cfg)
            for group in self.optimizer.param_groups:
                group["betas"] = (beta1, *tuple(group["betas"])[1:])

    def state_dict(self) -> dict:  # noqa: D102
        return {k: v for k, v in super().state_dict().items() if k != "train_cfg"}


def novel_view_threshold(step: int, total_steps: int, tau: float) -> float:
    """``min(tau, 2 * step / total_steps)``: the probability of a novel view at ``step`` (Eq. 1)."""
    return min(tau, 2.0 * step / total_steps)


def is_canonical(r: float, step: int, total_steps: int, tau: float) -> bool:
    """Eq. 1: the step trains the canonical view if ``r > min(tau, 2 * step / total_steps)``, ``r ~ U(0, 1)``."""
    return r > novel_view_threshold(step, total_steps, tau)
