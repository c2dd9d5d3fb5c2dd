"""The G3DR training task: one forward of f_trigen (through its engine) plus the weighted objective.

Per micro-batch (paper S.1, S.2; reference ``train.py``):

- choose the view by Eq. 1: canonical if ``r > min(tau, 2 * step / total_steps)``, ``r ~ U(0, 1)``;
- canonical view (with the pseudo-depth handed to the renderer: depth-prior fine samples, depth kernel):
  ``l1 * L1(render, input) + depth * L1(depth, pseudo-depth) + perceptual * VGG(render, input)``;
- novel view (camera from the novel-view schedule):
  ``clip(step) * L1(CLIP(render), CLIP(input)) + tv * TV(depth) + perceptual_second * VGG_deep(render, input)``;
- both: ``weight_sum(step) * mean(1 - sum w)`` (reference code; 0 by default).

``perceptual_second``: the paper's second perceptual term belongs to its 128 -> 256 super-resolution
module, which this project does not train; we apply that weight where the reference code applies its
second perceptual loss: the novel view, on the two deepest VGG blocks (relu4_3, relu5_3).

The task draws its randomness (``r``, novel cameras; the renderer's jitter) from the global torch RNG,
which the trainer seeds per rank and saves in every checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from g3dr.config import Config
from g3dr.losses import Critics, depth_l1_loss, l1_loss, tv_loss, weight_sum_loss
from g3dr.render.cameras import camera_to_world_from_angles, canonical_angles, sample_novel_angles
from g3dr.train.schedules import clip_weight, is_canonical, weight_sum_weight

# The novel-view perceptual term uses the two deepest VGG blocks (relu4_3, relu5_3 of VGG16), as the reference.
NOVEL_VGG_DEEPEST = 2


class G3DRTask:
    """Holds the frozen critics and the loss config; ``__call__(model, batch, step) -> (loss, report)``."""

    def __init__(self, cfg: Config, critics: Critics, model_dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.critics = critics
        self.model_dtype = model_dtype  # bf16 engines take bf16 inputs; losses are computed in fp32
        n = critics.vgg.num_layers
        deep = min(n, NOVEL_VGG_DEEPEST)
        self.canonical_layers = (1.0,) * n
        self.novel_layers = (0.0,) * (n - deep) + (1.0,) * deep

    def choose_view(self, step: int, batch: int, device: torch.device) -> tuple[bool, float, torch.Tensor]:
        """Eq. 1 and the camera of the chosen view: ``(canonical, r, cam2world (B, 4, 4))``."""
        total, cam = self.cfg.train.total_steps, self.cfg.camera
        r = float(torch.rand(()))
        canonical = is_canonical(r, step, total, self.cfg.loss.tau)
        if canonical:
            yaw, pitch = canonical_angles(batch, cam, device=device)
        else:
            yaw, pitch = sample_novel_angles(batch, step / total, cam, device=device)
        return canonical, r, camera_to_world_from_angles(yaw, pitch, cam.radius)

    def __call__(self, model: Any, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward ``model`` (FTrigen or its engine) on one micro-batch at optimizer step ``step``.

        Returns the weighted total loss (a differentiable scalar) and a report: each unweighted term
        (``loss/<name>``), each weight in effect (``weight/<name>``), ``loss/total``, ``canonical`` and the
        Eq. 1 draw ``view_r``;
        ``images`` holds the detached renders for image grids.
        """
        loss_cfg = self.cfg.loss
        rgb, depth = batch["rgb"], batch["depth"]
        canonical, r, cam2world = self.choose_view(step, rgb.shape[0], rgb.device)
        dt = self.model_dtype
        out = model(rgb.to(dt), depth.to(dt), cam2world.to(dt), canonical)
        render = out["rgb"].float()
        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        if canonical:
            terms["l1"], weights["l1"] = l1_loss(render, rgb), loss_cfg.l1
            terms["depth"], weights["depth"] = depth_l1_loss(out["depth"].float(), depth), loss_cfg.depth
            if loss_cfg.perceptual > 0:
                terms["perceptual"] = self.critics.vgg(render, rgb, self.canonical_layers)
                weights["perceptual"] = loss_cfg.perceptual
        else:
            with torch.no_grad():
                target = self.critics.clip(rgb)
            terms["clip"] = (self.critics.clip(render) - target).abs().mean()
            weights["clip"] = clip_weight(step, loss_cfg)
            terms["tv"], weights["tv"] = tv_loss(out["depth"].float()), loss_cfg.tv
            if loss_cfg.perceptual_second > 0:
                terms["perceptual_second"] = self.critics.vgg(render, rgb, self.novel_layers)
                weights["perceptual_second"] = loss_cfg.perceptual_second
        ws = weight_sum_weight(step, loss_cfg, self.cfg.train.total_steps)
        if ws > 0:
            terms["weight_sum"], weights["weight_sum"] = weight_sum_loss(out["weight_sum"].float()), ws
        total = sum(weights[k] * terms[k] for k in terms)
        report: dict[str, Any] = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
        report.update({f"weight/{k}": float(w) for k, w in weights.items()})
        report["loss/total"] = float(total.detach())
        report["canonical"] = canonical
        report["view_r"] = r
        report["images"] = {"input": rgb.detach(), "render": render.detach(), "depth": out["depth"].detach(),
                            "pseudo_depth": depth.detach()}
        return total, report
