"""The DeepSpeed config, derived from the g3dr :class:`~g3dr.config.Config` (the one source of truth).

Nothing here is read from a separate DeepSpeed JSON: batch sizes, ZeRO stage, precision, clipping and Adam
come from ``cfg.train``; micro-batch x world size x accumulation is checked by
:meth:`~g3dr.config.TrainConfig.grad_accumulation` (a ConfigError when they do not divide).
"""

from __future__ import annotations

from typing import Any

from g3dr.config import Config
from g3dr.errors import ConfigError

# DeepSpeed prints its own step summary every N steps; the trainer logs instead.
_NEVER = 2**62


def deepspeed_config(cfg: Config, world_size: int, device_type: str) -> dict[str, Any]:
    """The DeepSpeed config dict for ``world_size`` ranks on ``device_type`` (``cpu`` or ``cuda``).

    - bf16 keeps fp32 master weights and accumulates gradients in fp32 (``data_types.grad_accum_dtype``,
      set explicitly rather than left to DeepSpeed's default).
    - Adam (no decoupled weight decay) with ``cfg.train.betas``; on CPU DeepSpeed's ``torch_adam`` path
      (plain ``torch.optim.Adam``), on CUDA its fused kernel.
    - The LR schedule is not in this dict: the trainer passes a ``LambdaLR`` over
      :func:`g3dr.train.schedules.learning_rate`, stepped once per optimizer step.
    """
    train = cfg.train
    accumulation = train.grad_accumulation(world_size)
    if train.precision == "bf16" and train.zero_stage == 0:
        # DeepSpeed accumulates bf16 gradients in fp32 only in its ZeRO optimizers (stage 0 refuses the mix).
        raise ConfigError("train.precision=bf16 needs train.zero_stage=1 or 2 (fp32 gradient accumulation is "
                          "done by DeepSpeed's ZeRO optimizers); set train.zero_stage=1 or train.precision=fp32")
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.grad_clip,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": train.eps,
                "weight_decay": train.weight_decay,
                "adam_w_mode": False,
                "torch_adam": device_type != "cuda",
            },
        },
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": False},
        "data_types": {"grad_accum_dtype": "fp32"},
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
