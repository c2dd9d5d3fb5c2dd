"""The G3DR objective: pixel terms (``terms``) and the frozen critics (``critics``: CLIP, VGG perceptual).

Nothing here owns an optimizer or knows about DeepSpeed; the task module (``g3dr.train.task``) weights the
terms with the per-view weight schedules of the config (``loss.canonical.*``, ``loss.novel.*``).
"""

from g3dr.losses.build import build_critics
from g3dr.losses.critics import ClipCritic, Critics, VggCritic
from g3dr.losses.terms import depth_l1_loss, kl_depth_loss, l1_loss, tv_loss, weight_sum_loss

__all__ = [
    "ClipCritic",
    "Critics",
    "VggCritic",
    "build_critics",
    "depth_l1_loss",
    "kl_depth_loss",
    "l1_loss",
    "tv_loss",
    "weight_sum_loss",
]
