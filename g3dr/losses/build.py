"""Which critics a run gets: :func:`build_critics` picks the source ``loss.critics`` names.

``pretrained`` loads the real CLIP and LPIPS-VGG files (:mod:`g3dr.losses.critics`), ``synthetic`` loads or trains
the small critics of :mod:`g3dr.losses.synthetic_critics`, ``random`` builds tiny random-weight ones. The choice lives
here, above both modules, so that neither imports the other's caller.
"""

from __future__ import annotations

import torch

from g3dr.config import LossConfig
from g3dr.losses.critics import (CLIP_HOWTO, TINY_CLIP_OVERRIDES, TINY_VGG_LAYERS, VGG_HOWTO, ClipCritic, Critics,
                                 VggCritic, build_clip_model, build_vgg_critic, build_vgg_features,
                                 require_weight_file)
from g3dr.losses.synthetic_critics import SyntheticCriticSpec, load_or_train_synthetic_critics
from g3dr.log import get_logger

log = get_logger("g3dr.losses")


def build_critics(loss_cfg: LossConfig, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, image_resolution: int | None = None) -> Critics:
    """Build the CLIP and VGG critics of ``loss_cfg`` (frozen, eval mode) on ``device`` in ``dtype``.

    ``image_resolution``: the size of the images the critics will see (``data.resolution``); only
    ``loss.critics=synthetic`` uses it, to train on images of that size (default ``loss.clip_resolution``).
    """
    if loss_cfg.critics == "pretrained":
        clip_file = require_weight_file(loss_cfg.clip_weights, "loss.clip_weights", CLIP_HOWTO)
        vgg_file = require_weight_file(loss_cfg.vgg_weights, "loss.vgg_weights", VGG_HOWTO)
        clip_model = build_clip_model(loss_cfg.clip_model, str(clip_file))
        vgg = build_vgg_critic(build_vgg_features(loss_cfg.vgg_model, str(vgg_file)), loss_cfg.perceptual_weights)
        log.info("critics: CLIP %s from %s, VGG %s from %s with %s channel weights", loss_cfg.clip_model, clip_file,
                 loss_cfg.vgg_model, vgg_file, loss_cfg.perceptual_weights)
    elif loss_cfg.critics == "synthetic":
        spec = SyntheticCriticSpec.from_config(loss_cfg, image_resolution)
        clip_model, features, _ = load_or_train_synthetic_critics(spec, loss_cfg.synthetic_critics.dir)
        vgg = VggCritic(features)  # the tiny VGG's channel counts are not VGG16's: unit weights, as random
        log.info("critics: tiny CLIP and VGG trained on synthetic primitives (loss.critics=synthetic; they know "
                 "primitives, not ImageNet: not for real training), unit perceptual channel weights")
    else:
        clip_model = build_clip_model(loss_cfg.clip_model, None, TINY_CLIP_OVERRIDES)
        # The tiny VGG's channel counts are not VGG16's: LPIPS has no weights for them, so unit weights.
        vgg = VggCritic(build_vgg_features(loss_cfg.vgg_model, None, TINY_VGG_LAYERS))
        log.info("critics: tiny random-weight CLIP and VGG, unit perceptual channel weights whatever "
                 "loss.perceptual_weights says (loss.critics=random; not for real training)")
    critics = Critics(clip=ClipCritic(clip_model, loss_cfg.clip_resolution), vgg=vgg)
    critics.clip.to(device=device, dtype=dtype)
    # Buffers used for normalisation stay fp32 for accuracy; inputs are cast to the weight dtype after it. The
    # VGG critic's buffers (LPIPS scaling, channel weights) never see ``dtype``: only its backbone does.
    critics.clip.mean, critics.clip.std = critics.clip.mean.float(), critics.clip.std.float()
    critics.vgg.to(device=device)
    critics.vgg.features.to(dtype=dtype)
    return critics
